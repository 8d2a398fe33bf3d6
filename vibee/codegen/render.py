"""The Jinja environment every template renders in: StrictUndefined, no autoescape, and the few
filters that turn IR values into safe Python source (nothing from a spec is pasted verbatim)."""

from __future__ import annotations

import keyword
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

# Templates shared by every kind (included as "common/..."); each kind's own sit in its folder.
COMMON_TEMPLATES = Path(__file__).resolve().parent / "templates"

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def py_literal(value: Any) -> str:
    """Deterministic Python source for a spec value (None, bool, int, float, str, list, dict)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return f"float({str(value)!r})"
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(str(k))}: {py_literal(v)}" for k, v in value.items()) + "}"
    if hasattr(value, "model_dump"):
        return py_literal(value.model_dump())
    raise TypeError(f"no Python literal for {type(value).__name__}")


def identifier(name: str) -> str:
    """A name that may appear as a Python identifier in generated code, or an error."""
    if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name):
        raise ValueError(f"{name!r} is not a valid identifier")
    return name


def docstring(text: str) -> str:
    """Text that is safe inside a triple-double-quoted docstring."""
    return str(text).replace("\\", "\\\\").replace('"""', '\\"\\"\\"').strip()


def comment(text: str) -> str:
    """Text for `# ...` comments: one line per line of input."""
    return "\n".join("# " + line if line else "#" for line in str(text).strip().splitlines())


_PRIMITIVES = {"Int": "int", "Float": "float", "Bool": "bool", "String": "str", "Tensor": "torch.Tensor"}
_DEFAULTS = {"int": "0", "float": "0.0", "bool": "False", "str": '""', "torch.Tensor": "None"}


def py_type(spec_type: str) -> str:
    """The Python annotation for a normalised IR type (see vibee/ir/types.py)."""
    t = spec_type.strip()
    if t in _PRIMITIVES:
        return _PRIMITIVES[t]
    if t.startswith("List<") and t.endswith(">"):
        return f"list[{py_type(t[5:-1])}]"
    if t.startswith("Option<") and t.endswith(">"):
        return f"{py_type(t[7:-1])} | None"
    if t.startswith("Map<") and t.endswith(">"):
        k, v = _split_pair(t[4:-1])
        return f"dict[{py_type(k)}, {py_type(v)}]"
    return f'"{identifier(t)}"'


def py_default(spec_type: str) -> str:
    """A default value expression for a dataclass field of this type."""
    ann = py_type(spec_type)
    if ann.startswith("list["):
        return "field(default_factory=list)"
    if ann.startswith("dict["):
        return "field(default_factory=dict)"
    if ann.endswith("| None") or ann.startswith('"'):
        return "None"
    return _DEFAULTS[ann]


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


def static_source(name: str) -> str:
    """The text of a kind's static file ("quantization/kernels.py") after its STATIC_COPY_MARKER,
    raw (not rendered); above the marker stay the imports that let the file stand alone."""
    from vibee.kinds.registry import KINDS

    kind, _, rest = name.partition("/")
    _, marker, body = (KINDS[kind].folder / rest).read_text(encoding="utf-8").partition(STATIC_COPY_MARKER)
    if not marker:
        raise ValueError(f"{name} has no line {STATIC_COPY_MARKER.strip()!r}")
    return body.strip("\n")


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
    )
    env.filters.update(py=py_literal, ident=identifier, doc=docstring, comment=comment, pytype=py_type, pydefault=py_default)
    env.globals["static_source"] = static_source
    return env


def render(template: str, **context: Any) -> str:
    text = environment().get_template(template).render(**context)
    return text.rstrip() + "\n"
