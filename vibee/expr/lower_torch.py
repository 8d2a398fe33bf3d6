"""The torch lowering: the generated module's torch path evaluates it on broadcasting tensors
(score float32, positions int64). Fully parenthesised; constants re-printed by tree.literal."""

from __future__ import annotations

from vibee.expr import tree
from vibee.expr.lower_infix import lower_infix

# Per function: a format string over the lowered arguments.
FUNCTIONS = {
    "tanh": "torch.tanh({0})",
    "exp": "torch.exp({0})",
    "log": "torch.log({0})",
    "sqrt": "torch.sqrt({0})",
    "abs": "torch.abs({0})",
    "sigmoid": "torch.sigmoid({0})",
    "min": "torch.minimum({0}, {1})",
    "max": "torch.maximum({0}, {1})",
    "where": "torch.where({0}, {1}, {2})",
    # The generated module defines alibi_slope(h, num_heads) and has num_heads in scope.
    "alibi_slope": "alibi_slope({0}, num_heads)",
}
# Elementwise logic on bool tensors is bitwise in torch.
LOGIC = {"and": "&", "or": "|"}


def _call(node: tree.Call, lower) -> str:
    # torch functions want tensors: a constant argument that survives folding is wrapped.
    args = [f"torch.as_tensor({lower(a)})" if isinstance(a, tree.Const) else lower(a) for a in node.args]
    return FUNCTIONS[node.name].format(*args)


def lower(node: tree.Node) -> str:
    return lower_infix(node, call=_call, logic=LOGIC, target="torch")
