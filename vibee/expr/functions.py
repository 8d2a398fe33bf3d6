"""What an expression may name: the context variables the kernels and the reference bind, and
the allowed functions with their signatures and compile-time evaluation. How each is written in
a target language lives in that target's lowering (lower_torch, lower_triton, lower_numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

Constant = Union[int, float, bool]

# `score` is the attention logit (float32 in the kernels, float64 in the reference); the others
# are the batch, head, query and key positions (integers), all broadcasting against each other.
CONTEXT_VARS: dict[str, str] = {"score": "float", "b": "int", "h": "int", "q_idx": "int", "kv_idx": "int"}


def _sigmoid(x: float) -> float:
    # Written so that neither branch overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Function:
    """An allowed call: its argument and result types and how constant arguments are evaluated at
    compile time."""

    args: tuple[str, ...]  # per argument: "number" (int or float), "int" or "bool"
    result: str  # "float", or "promote": int when every number argument is int, else float
    fold: Callable[..., Constant] | None  # evaluates all-constant arguments; None: never folded
    description: str = ""

    @property
    def arity(self) -> int:
        return len(self.args)


FUNCTIONS: dict[str, Function] = {
    "tanh": Function(("number",), "float", math.tanh, "hyperbolic tangent"),
    "exp": Function(("number",), "float", math.exp, "e ** x"),
    "log": Function(("number",), "float", math.log, "natural logarithm"),
    "sqrt": Function(("number",), "float", math.sqrt, "square root"),
    "abs": Function(("number",), "promote", abs, "absolute value"),
    "sigmoid": Function(("number",), "float", _sigmoid, "1 / (1 + e ** -x)"),
    "min": Function(("number", "number"), "promote", min, "the smaller of a and b"),
    "max": Function(("number", "number"), "promote", max, "the larger of a and b"),
    # where() folds on a constant condition alone (the chosen branch need not be constant).
    "where": Function(("bool", "number", "number"), "promote", None, "a where cond holds, else b"),
    # The slope depends on num_heads, which only the generated code has: never folded.
    "alibi_slope": Function(("int",), "float", None, "the standard ALiBi slope of head h"),
}
