"""The checked expression: a small typed tree that every lowering walks. Constant
sub-expressions are already folded into Const nodes; names are context variables; calls name
an allowed function. Nothing in it is source text from the spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from vibee.expr.functions import Constant


@dataclass(frozen=True)
class Const:
    value: Constant
    type: str  # "int", "float" or "bool"


@dataclass(frozen=True)
class Var:
    name: str  # a key of CONTEXT_VARS
    type: str


@dataclass(frozen=True)
class Neg:
    operand: "Node"
    type: str


@dataclass(frozen=True)
class Arith:
    op: str  # + - * /
    left: "Node"
    right: "Node"
    type: str


@dataclass(frozen=True)
class Compare:
    op: str  # < <= > >= == !=
    left: "Node"
    right: "Node"
    type: str = "bool"


@dataclass(frozen=True)
class Logic:
    op: str  # "and" or "or"
    left: "Node"
    right: "Node"
    type: str = "bool"


@dataclass(frozen=True)
class Not:
    operand: "Node"
    type: str = "bool"


@dataclass(frozen=True)
class Call:
    name: str  # a key of FUNCTIONS
    args: tuple["Node", ...]
    type: str


@dataclass(frozen=True)
class ToFloat:
    """An int value where a float is expected (the int branch of a float where())."""

    operand: "Node"
    type: str = "float"


Node = Union[Const, Var, Neg, Arith, Compare, Logic, Not, Call, ToFloat]


def literal(value: Constant) -> str:
    """A constant as Python source, parenthesised when negative: the one way a number from a spec
    reaches generated code (re-printed by repr, never copied)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    text = repr(value)
    return f"({text})" if text.startswith("-") else text
