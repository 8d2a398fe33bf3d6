"""The torch lowering: the generated module's torch path evaluates it on broadcasting tensors
(score float32, positions int64). Fully parenthesised; constants re-printed by tree.literal."""

from __future__ import annotations

from vibee.expr import tree

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


def lower(node: tree.Node) -> str:
    if isinstance(node, tree.Const):
        return tree.literal(node.value)
    if isinstance(node, tree.Var):
        return node.name
    if isinstance(node, tree.Neg):
        return f"(-{lower(node.operand)})"
    if isinstance(node, (tree.Arith, tree.Compare)):
        return f"({lower(node.left)} {node.op} {lower(node.right)})"
    if isinstance(node, tree.Logic):
        return f"({lower(node.left)} {LOGIC[node.op]} {lower(node.right)})"
    if isinstance(node, tree.Not):
        return f"(~{lower(node.operand)})"
    if isinstance(node, tree.Call):
        # torch functions want tensors: a constant argument that survives folding is wrapped.
        args = [f"torch.as_tensor({lower(a)})" if isinstance(a, tree.Const) else lower(a) for a in node.args]
        return FUNCTIONS[node.name].format(*args)
    if isinstance(node, tree.ToFloat):
        return f"({lower(node.operand)} * 1.0)"
    raise TypeError(f"no torch lowering for {type(node).__name__}")
