"""Field types of a spec's `types:` section, normalised to one spelling.

Accepted: Int, Float, Bool, String, Tensor (optionally `Tensor[...]` with a shape note), List<T>,
Option<T>, Map<K, V>, a type declared in the same spec, and the spellings descriptive specs use
(`[]f32`, `?u32`, `usize`, `f16`, `str`, ...), which map onto the same few types.
"""

from __future__ import annotations

import re

PRIMITIVES = ("Int", "Float", "Bool", "String", "Tensor")
GENERICS = ("List", "Option", "Map")

ALIASES = {
    **{n: "Int" for n in ("int", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64", "usize", "isize", "Integer", "Long")},
    **{n: "Float" for n in ("float", "f16", "f32", "f64", "bf16", "Double", "Real")},
    **{n: "Bool" for n in ("bool", "Boolean")},
    **{n: "String" for n in ("str", "string", "Str", "[]const u8", "[]u8", "Text")},
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TypeSyntaxError(ValueError):
    """A type that cannot be read; `offset` is where in the type text it went wrong."""

    def __init__(self, message: str, offset: int = 0, hint: str | None = None):
        super().__init__(message)
        self.offset = offset
        self.hint = hint


def normalize_type(text: str, declared: set[str]) -> str:
    """The canonical spelling of a field type, or TypeSyntaxError."""
    text = str(text)
    result, end = _parse(text, 0, declared)
    if text[end:].strip():
        raise TypeSyntaxError(f"unexpected {text[end:].strip()!r} after type {result}", end)
    return result


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _parse(text: str, i: int, declared: set[str]) -> tuple[str, int]:
    i = _skip(text, i)
    for alias in ("[]const u8", "[]u8"):
        if text.startswith(alias, i):
            return "String", i + len(alias)
    if text.startswith("[]", i):
        inner, j = _parse(text, i + 2, declared)
        return f"List<{inner}>", j
    if text.startswith("?", i):
        inner, j = _parse(text, i + 1, declared)
        return f"Option<{inner}>", j
    m = _NAME.match(text, i)
    if not m:
        raise TypeSyntaxError(f"expected a type name, got {text[i:i + 10]!r}" if text[i:] else "expected a type name", i)
    name, j = m.group(0), m.end()
    j2 = _skip(text, j)
    if name in GENERICS:
        if not text.startswith("<", j2):
            raise TypeSyntaxError(f"{name} needs type arguments, e.g. {name}<Int>", j2)
        args = []
        k = j2 + 1
        while True:
            arg, k = _parse(text, k, declared)
            args.append(arg)
            k = _skip(text, k)
            if text.startswith(",", k):
                k += 1
                continue
            if text.startswith(">", k):
                k += 1
                break
            raise TypeSyntaxError(f"expected ',' or '>' in {name}<...>", k)
        want = 2 if name == "Map" else 1
        if len(args) != want:
            raise TypeSyntaxError(f"{name} takes {want} type argument{'s' if want > 1 else ''}, got {len(args)}", j2)
        return f"{name}<{', '.join(args)}>", k
    if name == "Tensor":
        if text.startswith("[", j2):  # Tensor[batch, heads, dim]: a shape note for readers
            close = text.find("]", j2)
            if close < 0:
                raise TypeSyntaxError("unclosed '[' in Tensor[...]", j2)
            return "Tensor", close + 1
        return "Tensor", j
    if name in PRIMITIVES or name in declared:
        return name, j
    if name in ALIASES:
        return ALIASES[name], j
    from vibee.frontend.errors import did_you_mean

    hint = did_you_mean(name, [*PRIMITIVES, *GENERICS, *declared])
    raise TypeSyntaxError(
        f"unknown type '{name}'; types are {', '.join(PRIMITIVES)}, List<T>, Option<T>, Map<K, V> or a type declared in this spec",
        i,
        hint,
    )
