"""Reading document nodes as parts of a spec: the collector every check reports to, and the small
checks all sections share (a mapping here, a list there, known keys, an identifier)."""

from __future__ import annotations

import keyword
import re

from vibee.frontend.document import Mapping, Node, Scalar, Sequence, Span
from vibee.frontend.errors import Diagnostic, did_you_mean, one_of

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Collector:
    """Every diagnostic the checks of one spec find, errors and warnings, in source order."""

    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []

    def error(self, span: Span | None, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message, span, hint))

    def warn(self, span: Span | None, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message, span, hint, severity="warning"))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "warning"]


def scalar_str(node: Node | None, what: str, c: Collector, parent: Span | None) -> str | None:
    if node is None:
        return None
    if not isinstance(node, Scalar) or isinstance(node.value, bool) or node.value is None:
        c.error(span_of(node) or parent, f"'{what}' must be a single value (text or number)")
        return None
    return str(node.value)


def is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def span_of(node: Node | None) -> Span | None:
    return getattr(node, "span", None)


def expect_sequence(node: Node, what: str, c: Collector) -> list[Node]:
    if isinstance(node, Sequence):
        return node.items
    if isinstance(node, Scalar) and node.value is None:
        return []
    c.error(span_of(node), f"'{what}' must be a list of '- ' items")
    return []


def expect_mapping(node: Node, what: str, c: Collector) -> Mapping | None:
    if isinstance(node, Mapping):
        return node
    c.error(span_of(node), f"{what} must be a mapping (keys like `name:`)")
    return None


def canonical_keys(m: Mapping | None, known: tuple[str, ...]) -> Mapping | None:
    """Descriptive specs write `When:` as often as `when:`; known keys match in any case."""
    if m is None:
        return None
    items = []
    for k, v in m:
        lower = str(k.value).lower()
        if lower != k.value and lower in known and lower not in m:
            k = Scalar(lower, k.span, k.quoted)
        items.append((k, v))
    return Mapping(items, m.span)


def check_keys(m: Mapping, allowed: tuple[str, ...], what: str, c: Collector) -> None:
    for k, _ in m:
        if str(k.value) not in allowed:
            c.error(k.span, f"unknown key '{k.value}' in {what}", did_you_mean(str(k.value), allowed) or one_of(allowed))


def required_ident(m: Mapping, key: str, what: str, c: Collector) -> str | None:
    node = m.get(key)
    if node is None:
        c.error(m.span, f"{what} needs a '{key}'")
        return None
    if not isinstance(node, Scalar) or not isinstance(node.value, str) or not IDENT.match(node.value) or keyword.iskeyword(node.value):
        c.error(span_of(node), f"{what} {key} must be an identifier (letters, digits, _), got {getattr(node, 'value', node)!r}")
        return None
    return node.value
