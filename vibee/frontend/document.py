"""The spec document: what the surface grammar produces, before any meaning is given to it.

Every node keeps its source span so that later stages (IR building, validation) can point at the exact place a user has to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Union


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based, end_col is exclusive."""

    path: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


ScalarValue = Union[str, int, float, bool, None]


@dataclass
class Scalar:
    """A leaf. Plain scalars are resolved to bool/int/float/None where they look like one;
    quoted and block scalars always stay strings (``quoted`` is then True)."""

    value: ScalarValue
    span: Span
    quoted: bool = False

    def to_python(self) -> ScalarValue:
        return self.value


@dataclass
class Sequence:
    items: list["Node"]
    span: Span

    def __iter__(self) -> Iterator["Node"]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def to_python(self) -> list:
        return [item.to_python() for item in self.items]


@dataclass
class Mapping:
    """An ordered mapping. Keys are scalars (with spans); duplicate keys are rejected by the parser."""

    items: list[tuple[Scalar, "Node"]] = field(default_factory=list)
    span: Span | None = None

    def keys(self) -> list[str]:
        return [str(k.value) for k, _ in self.items]

    def get(self, key: str) -> "Node | None":
        for k, v in self.items:
            if str(k.value) == key:
                return v
        return None

    def key_node(self, key: str) -> Scalar | None:
        for k, _ in self.items:
            if str(k.value) == key:
                return k
        return None

    def __contains__(self, key: str) -> bool:
        return self.key_node(key) is not None

    def __iter__(self) -> Iterator[tuple[Scalar, "Node"]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def to_python(self) -> dict:
        return {str(k.value): v.to_python() for k, v in self.items}


Node = Union[Scalar, Sequence, Mapping]
