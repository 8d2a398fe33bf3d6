"""The tree walk the implementation's two lowerings share: torch and Triton spell constants,
names, arithmetic, comparisons, negation and `~` alike, and differ only in how a function is
called and how `and`/`or` are written. (The reference's numpy lowering walks on its own, so
that it stays an independent oracle.)"""

from __future__ import annotations

from typing import Callable

from vibee.expr import tree


def lower_infix(node: tree.Node, *, call: Callable[[tree.Call, Callable[[tree.Node], str]], str],
                logic: dict[str, str], target: str) -> str:
    """Fully parenthesised source for node; call(node, lower) writes a function call."""

    def lower(n: tree.Node) -> str:
        if isinstance(n, tree.Const):
            return tree.literal(n.value)
        if isinstance(n, tree.Var):
            return n.name
        if isinstance(n, tree.Neg):
            return f"(-{lower(n.operand)})"
        if isinstance(n, (tree.Arith, tree.Compare)):
            return f"({lower(n.left)} {n.op} {lower(n.right)})"
        if isinstance(n, tree.Logic):
            return f"({lower(n.left)} {logic[n.op]} {lower(n.right)})"
        if isinstance(n, tree.Not):
            return f"(~{lower(n.operand)})"
        if isinstance(n, tree.Call):
            return call(n, lower)
        if isinstance(n, tree.ToFloat):
            return f"({lower(n.operand)} * 1.0)"
        raise TypeError(f"no {target} lowering for {type(n).__name__}")

    return lower(node)
