"""The Jinja environment every template renders in: StrictUndefined, no autoescape, and every
`{{ }}` finalized by vibee.codegen.source.to_source, the one escaping rule. The filters and
globals here only build Source for what is not a plain literal: identifiers, type annotations,
comments, docstrings and the lowered spec expressions."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from vibee.codegen.source import Source, comment, docstring, identifier, literal, to_source

# Templates shared by every kind (included as "common/..."); each kind's own sit in its folder.
COMMON_TEMPLATES = Path(__file__).resolve().parent / "templates"

_PRIMITIVES = {"Int": "int", "Float": "float", "Bool": "bool", "String": "str", "Tensor": "torch.Tensor"}
_DEFAULTS = {"int": "0", "float": "0.0", "bool": "False", "str": '""', "torch.Tensor": "None"}


def py_type(spec_type: str) -> Source:
    """The Python annotation for a normalised IR type (see vibee/ir/types.py)."""
    t = spec_type.strip()
    if t in _PRIMITIVES:
        return Source(_PRIMITIVES[t])
    if t.startswith("List<") and t.endswith(">"):
        return Source(f"list[{py_type(t[5:-1])}]")
    if t.startswith("Option<") and t.endswith(">"):
        return Source(f"{py_type(t[7:-1])} | None")
    if t.startswith("Map<") and t.endswith(">"):
        k, v = _split_pair(t[4:-1])
        return Source(f"dict[{py_type(k)}, {py_type(v)}]")
    return Source(f'"{identifier(t)}"')


def py_default(spec_type: str) -> Source:
    """A default value expression for a dataclass field of this type."""
    ann = py_type(spec_type)
    if ann.startswith("list["):
        return Source("field(default_factory=list)")
    if ann.startswith("dict["):
        return Source("field(default_factory=dict)")
    if ann.endswith("| None") or ann.startswith('"'):
        return Source("None")
    return Source(_DEFAULTS[ann])


def lowered(expr: Any, target: str, **renames: str) -> Source:
    """A checked spec expression (vibee.ir.spec.Expr) lowered for `target` ("torch" or "triton"),
    with functions renamed where the template supplies its own (renames: old=new)."""
    from vibee.ir.spec import Expr

    if not isinstance(expr, Expr):
        raise TypeError(f"lowered takes a spec expression, got {type(expr).__name__}")
    code = getattr(expr, target)
    for old, new in renames.items():
        code = code.replace(f"{identifier(old)}(", f"{identifier(new)}(")
    ast.parse(code, mode="eval")  # the expression language only makes expressions
    return Source(code)


def _docstring(summary: Any, behavior: Any = None, indent: int = 0, caller: Any = None) -> Source:
    """`{{ docstring(summary, behavior, indent) }}`, or `{% call docstring(...) %}details{% endcall %}`:
    the call block's lines lose their leading spaces and trailing newline to lstrip_blocks and
    trim_blocks, so the literal brings its own."""
    if caller is None:
        return docstring(summary, behavior, indent)
    return Source(" " * indent + docstring(summary, behavior, indent, details=caller()) + "\n")


def _split_pair(inner: str) -> tuple[str, str]:
    depth = 0
    for i, ch in enumerate(inner):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            return inner[:i].strip(), inner[i + 1 :].strip()
    raise ValueError(f"Map needs two type arguments, got {inner!r}")


def template_path(name: str) -> Path:
    """The file behind a template name: "common/x.j2" or "<kind>/x.j2"."""
    from vibee.kinds.registry import KINDS

    prefix, _, rest = name.partition("/")
    return (COMMON_TEMPLATES if prefix == "common" else KINDS[prefix].templates) / rest


# Static code of a kind (its kernels as plain .py) is pasted into generated modules from this line on.
STATIC_COPY_MARKER = "# ---- copied into generated modules from here ----\n"


def static_source(name: str) -> Source:
    """The text of a kind's static file ("quantization/kernels.py") after its STATIC_COPY_MARKER,
    raw (not rendered); above the marker stay the imports that let the file stand alone."""
    from vibee.kinds.registry import KINDS

    kind, _, rest = name.partition("/")
    _, marker, body = (KINDS[kind].folder / rest).read_text(encoding="utf-8").partition(STATIC_COPY_MARKER)
    if not marker:
        raise ValueError(f"{name} has no line {STATIC_COPY_MARKER.strip()!r}")
    return Source(body.strip("\n"))  # vibee's own code, written as it is


@lru_cache(maxsize=None)
def environment() -> jinja2.Environment:
    from vibee.kinds.registry import KINDS

    folders = {"common": jinja2.FileSystemLoader(str(COMMON_TEMPLATES))}
    folders.update({name: jinja2.FileSystemLoader(str(kind.templates)) for name, kind in KINDS.items()})
    env = jinja2.Environment(
        loader=jinja2.PrefixLoader(folders, delimiter="/"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=to_source,
    )
    env.filters.update(py=literal, ident=identifier, comment=comment, pytype=py_type, pydefault=py_default, lowered=lowered)
    env.globals.update(docstring=_docstring, static_source=static_source)
    return env


def render(template: str, **context: Any) -> str:
    text = environment().get_template(template).render(**context)
    return text.rstrip() + "\n"
