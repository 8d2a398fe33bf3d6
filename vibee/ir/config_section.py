"""The `config:` section: validated by the kind's pydantic model (vibee/kinds/<kind>/config.py),
each of its errors placed on the document node it is about, with a hint where the text is almost
right ("16" for 16, yes for true, 4.0 for 4) and the caret under the one list element at fault."""

from __future__ import annotations

import re

from pydantic import ValidationError

from vibee.frontend.document import Mapping, Node, Scalar, Sequence, Span
from vibee.frontend.errors import did_you_mean, one_of
from vibee.ir.reading import Collector, span_of
from vibee.ir.spec import KindConfig
from vibee.kinds.registry import config_model


def build_config(doc: Mapping, kind: str, c: Collector) -> tuple[KindConfig | None, dict[str, Span]]:
    """The kind's config (None when invalid: the errors went to c) and where each value was written."""
    model = config_model(kind)
    node = doc.get("config")
    if node is None:
        return model(), {}
    if not isinstance(node, Mapping):
        c.error(span_of(node), "'config' must be a mapping of settings", f"settings of {kind}: {', '.join(model.model_fields)}")
        return None, {}
    spans = _value_spans(node, "")
    try:
        return model.model_validate(node.to_python()), spans
    except ValidationError as exc:
        for err in exc.errors():
            _config_error(node, model, err, c)
        return None, spans


def _value_spans(node: Node, prefix: str) -> dict[str, Span]:
    out: dict[str, Span] = {}
    if isinstance(node, Mapping):
        for k, v in node:
            path = f"{prefix}{k.value}"
            out[path] = span_of(v) or k.span
            out.update(_value_spans(v, path + "."))
    return out


def _config_error(root: Mapping, model: type, err: dict, c: Collector) -> None:
    loc = tuple(err.get("loc", ()))
    node, key_node, parent = _locate(root, loc)
    where = ".".join(str(p) for p in loc) or "config"
    etype = err.get("type", "")
    if etype == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        c.error(key_node.span if key_node else span_of(node), f"unknown setting '{loc[-1]}' in {'config' if len(loc) == 1 else 'config.' + '.'.join(map(str, loc[:-1]))}",
                did_you_mean(str(loc[-1]), fields) or (one_of(fields) if fields else None))
        return
    if etype == "missing":
        c.error(span_of(parent) or root.span, f"config is missing required setting '{where}'")
        return
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    got = node.value if isinstance(node, Scalar) else None
    hint = None
    if etype == "literal_error":
        allowed = re.findall(r"'([^']*)'", msg)
        hint = (did_you_mean(str(got), allowed) if got is not None else None) or (one_of(allowed) if allowed else None)
        msg = f"{where} must be one of {', '.join(repr(a) for a in allowed)}, got {got!r}"
    elif etype in ("value_error", "assertion_error"):
        if not msg.startswith(str(loc[-1]) if loc else "config") and loc:
            msg = f"{where}: {msg}"
        if isinstance(node, Sequence):  # a check of the whole list that names one element
            node = _row_named(node, msg, str(loc[-1])) or _element_named(node, msg) or node
    else:
        hint = _literal_hint(node, etype)
        msg = f"{where}: {msg[0].lower() + msg[1:] if msg else msg}" + (f", got {got!r}" if got is not None and "got" not in msg else "")
    c.error(span_of(node) or (key_node.span if key_node else root.span), msg, hint)


def _literal_hint(node: Node | None, etype: str) -> str | None:
    """How to write the value the type wanted, when the text is almost it: "16" for 16, yes for
    true, 4.0 for 4."""
    if not isinstance(node, Scalar):
        return None
    value = node.value
    wants = next((t for t in ("int", "float", "bool") if etype.startswith(t)), None)
    if wants is None:
        return None
    if isinstance(value, str) and node.quoted:
        text = value.strip()
        if (wants == "bool" and text in ("true", "false")) or (wants != "bool" and _number(text, wants == "int")):
            return f"remove the quotes: {text}"
    if wants == "bool" and isinstance(value, str) and value.lower() in ("yes", "no", "on", "off", "y", "n"):
        return f"use true or false: {'true' if value.lower() in ('yes', 'on', 'y') else 'false'}"
    if wants == "int" and isinstance(value, float) and value.is_integer():
        return f"use {int(value)}"
    return None


def _number(text: str, integer: bool) -> bool:
    try:
        int(text) if integer else float(text)
    except ValueError:
        return False
    return True


def _row_named(seq: Sequence, message: str, field: str) -> Node | None:
    """The row of a table (a list of settings) that a check of the whole table names first:
    "gemv_tiles[3] is never used: ..." -> row 3, "the last row of gemv_tiles ..." -> the last."""
    m = re.search(rf"(?<![\w.]){re.escape(field)}\[(\d+)", message)
    if m and int(m.group(1)) < len(seq.items):
        return seq.items[int(m.group(1))]
    if seq.items and f"last row of {field}" in message:
        return seq.items[-1]
    return None


def _element_named(seq: Sequence, message: str) -> Node | None:
    """The element of seq whose value the message names first ("head dim 100 is not supported")."""
    found = []
    for item in seq.items:
        if isinstance(item, Scalar) and item.value is not None and not isinstance(item.value, bool):
            m = re.search(rf"(?<![\w.]){re.escape(str(item.value))}(?![\w.])", message)
            if m:
                found.append((m.start(), item))
    return min(found, key=lambda f: f[0])[1] if found else None


def _locate(root: Mapping, loc: tuple) -> tuple[Node | None, Scalar | None, Node | None]:
    """Walk a pydantic error location through the document: (value node, its key node, parent)."""
    node: Node | None = root
    key_node: Scalar | None = None
    parent: Node | None = None
    for part in loc:
        parent = node
        if isinstance(node, Mapping) and isinstance(part, str):
            key_node = node.key_node(part)
            node = node.get(part)
        elif isinstance(node, Sequence) and isinstance(part, int) and 0 <= part < len(node.items):
            node = node.items[part]
        else:
            break  # a model-level error or a union branch: point at the deepest node found
        if node is None:
            break
    return (node if node is not None else parent), key_node, parent


def _fields_at(model: type, loc: tuple) -> list[str]:
    current = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None or not hasattr(field.annotation, "model_fields"):
            return list(getattr(current, "model_fields", {})) if not loc else []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))
