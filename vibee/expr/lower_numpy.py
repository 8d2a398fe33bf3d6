"""The numpy lowering, for the reference oracle: float64 scores and int64 positions, every
operator a named numpy ufunc. It is written apart from the torch lowering on purpose: the
generated tests compare the torch path against the reference, so a wrong operator or function
in either lowering shows up as a failing test instead of agreeing with itself."""

from __future__ import annotations

from vibee.expr import tree

FUNCTIONS = {
    "tanh": "np.tanh({0})",
    "exp": "np.exp({0})",
    "log": "np.log({0})",
    "sqrt": "np.sqrt({0})",
    "abs": "np.absolute({0})",
    # 1 / (1 + e^-x) as exp(-log(1 + e^-x)): no overflow for large |x|.
    "sigmoid": "np.exp(np.negative(np.logaddexp(0.0, np.negative({0}))))",
    "min": "np.minimum({0}, {1})",
    "max": "np.maximum({0}, {1})",
    "where": "np.where({0}, {1}, {2})",
    # The reference defines its own alibi_slope(h, num_heads) over numpy arrays.
    "alibi_slope": "alibi_slope({0}, num_heads)",
}
ARITH = {"+": "np.add", "-": "np.subtract", "*": "np.multiply", "/": "np.true_divide"}
COMPARE = {"<": "np.less", "<=": "np.less_equal", ">": "np.greater", ">=": "np.greater_equal",
           "==": "np.equal", "!=": "np.not_equal"}
LOGIC = {"and": "np.logical_and", "or": "np.logical_or"}


def lower(node: tree.Node) -> str:
    if isinstance(node, tree.Const):
        return tree.literal(node.value)
    if isinstance(node, tree.Var):
        return node.name
    if isinstance(node, tree.Neg):
        return f"np.negative({lower(node.operand)})"
    if isinstance(node, tree.Arith):
        return f"{ARITH[node.op]}({lower(node.left)}, {lower(node.right)})"
    if isinstance(node, tree.Compare):
        return f"{COMPARE[node.op]}({lower(node.left)}, {lower(node.right)})"
    if isinstance(node, tree.Logic):
        return f"{LOGIC[node.op]}({lower(node.left)}, {lower(node.right)})"
    if isinstance(node, tree.Not):
        return f"np.logical_not({lower(node.operand)})"
    if isinstance(node, tree.Call):
        return FUNCTIONS[node.name].format(*(lower(a) for a in node.args))
    if isinstance(node, tree.ToFloat):
        return f"np.asarray({lower(node.operand)}, dtype=np.float64)"
    raise TypeError(f"no numpy lowering for {type(node).__name__}")
