"""The one escaping rule: how a value becomes Python source in a generated file.

Every `{{ }}` of every template passes through `to_source` (the Jinja environment's finalize).
A plain value becomes a literal: a str its repr, a number re-printed, a list or mapping of them
element by element. Only `Source` is emitted as it is, and only the builders below make one: a
literal, a docstring, a comment, a validated identifier, a lowered spec expression. So a spec's
text reaches a generated file only inside a string literal or a comment, whatever the template.
"""

from __future__ import annotations

import keyword
import math
import re
import textwrap
from typing import Any

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DOC_WIDTH = 100  # docstring lines are wrapped to this column


class Source(str):
    """Python source vibee made from a value; the only str a template output takes verbatim."""


def to_source(value: Any) -> str:
    """What `{{ value }}` writes: Source as it is, anything else as a Python literal."""
    if isinstance(value, Source):
        return value
    return literal(value)


def literal(value: Any) -> Source:
    """Deterministic Python source for a value (None, bool, int, float, str, list, tuple, dict,
    or a pydantic model as its dump)."""
    if value is None or isinstance(value, bool):
        return Source(repr(value))
    if isinstance(value, int):
        return Source(repr(int(value)))
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return Source(f"float({str(value)!r})")
        return Source(repr(value))
    if isinstance(value, str):
        return Source(repr(str(value)))
    if isinstance(value, (list, tuple)):
        return Source("[" + ", ".join(literal(v) for v in value) + "]")
    if isinstance(value, dict):
        return Source("{" + ", ".join(f"{literal(str(k))}: {literal(v)}" for k, v in value.items()) + "}")
    if hasattr(value, "model_dump"):
        return literal(value.model_dump())
    raise TypeError(f"a template wrote a {type(value).__name__}, which has no Python literal")


def identifier(name: Any) -> Source:
    """A name that may stand as a Python identifier in generated code, or ValueError. The IR
    builder rejects such names with a positioned error first; this is the render-time guard."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or keyword.iskeyword(name):
        raise ValueError(f"{name!r} is not a valid identifier")
    return Source(name)


def printable(text: str) -> str:
    """text with every character that is not printable (newlines, NUL, \\r, tabs, separators)
    written as its escape, as repr writes it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def comment(text: Any, indent: int = 0) -> Source:
    """`# ` lines for text: one comment line per line of text, nothing unprintable in any."""
    pad = " " * indent
    lines = str(text).strip().split("\n") or [""]
    return Source("\n".join(f"{pad}# {printable(line)}".rstrip() for line in lines))


def _doc_body(text: str) -> str:
    """The inside of a triple-double-quoted literal whose value is text: backslashes doubled,
    unprintable characters escaped, and every quote that could join others into a closing
    triple quote (at either end, or next to another quote) escaped."""
    out = []
    for i, c in enumerate(text):
        if c == "\\":
            out.append("\\\\")
        elif c == '"' and (i == 0 or i == len(text) - 1 or text[i - 1] == '"' or text[i + 1] == '"'):
            out.append('\\"')
        elif c != "\n" and not c.isprintable():
            out.append(printable(c))
        else:
            out.append(c)
    return "".join(out)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for line in str(text).strip().split("\n"):
        lines.extend(textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False) or [""])
    return lines


def docstring(summary: Any, behavior: Any = None, indent: int = 0, details: str = "") -> Source:
    """A docstring literal: the summary, then a behavior's given/when/then (spec text), then
    details (template source, kept as written). Continuation lines are indented by `indent`;
    the first line is not (the template puts the literal where it belongs)."""
    width = max(40, DOC_WIDTH - indent)
    paragraphs = [_wrap(summary, width)]
    if behavior is not None and getattr(behavior, "known", True):
        told = [(label, getattr(behavior, key)) for label, key in (("Given", "given"), ("When", "when"), ("Then", "then"))]
        told = [f"{label} {str(text).strip()}" for label, text in told if str(text).strip()]
        if told:
            paragraphs.append([line for text in told for line in _wrap(text, width)])
    pad = " " * indent
    body = "\n\n".join("\n".join(lines) for lines in paragraphs)
    body = "\n".join((pad + line).rstrip() if i else line for i, line in enumerate(_doc_body(body).split("\n")))
    details = details.strip("\n").rstrip()
    if details:
        return Source(f'"""{body}\n\n{details}\n{pad}"""')
    if "\n" in body:
        return Source(f'"""{body}\n{pad}"""')
    return Source(f'"""{body}"""')
