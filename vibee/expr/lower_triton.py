"""The Triton lowering: the kernels evaluate it on tiles (score float32, positions int32), inside
@triton.jit helpers of the generated module. Fully parenthesised; constants re-printed by
tree.literal."""

from __future__ import annotations

from vibee.expr import tree
from vibee.expr.lower_infix import lower_infix

FUNCTIONS = {
    # Triton 3.6 has no tl.tanh; tanh(x) = 2 * sigmoid(2x) - 1 saturates cleanly at +-1.
    "tanh": "((2.0 * tl.sigmoid((2.0 * {0}))) - 1.0)",
    "exp": "tl.exp({0})",
    "log": "tl.log({0})",
    "sqrt": "tl.sqrt({0})",
    "abs": "tl.abs({0})",
    "sigmoid": "tl.sigmoid({0})",
    "min": "tl.minimum({0}, {1})",
    "max": "tl.maximum({0}, {1})",
    "where": "tl.where({0}, {1}, {2})",
    # The kernel template defines alibi_slope as a jit function and has num_heads in scope.
    "alibi_slope": "alibi_slope({0}, num_heads)",
}
# tl.exp & co. reject integer tensors: their int arguments are cast to fp32 first.
FLOAT_MATH = {"tanh", "exp", "log", "sqrt", "sigmoid"}
LOGIC = {"and": "&", "or": "|"}


def _call(node: tree.Call, lower) -> str:
    args = [f"({lower(a)}).to(tl.float32)" if node.name in FLOAT_MATH and a.type == "int" else lower(a)
            for a in node.args]
    return FUNCTIONS[node.name].format(*args)


def lower(node: tree.Node) -> str:
    return lower_infix(node, call=_call, logic=LOGIC, target="Triton")
