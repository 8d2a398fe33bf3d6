"""Helpers shared by the expression-language tests: a positioned scalar as the spec parser would
give it, compiling it, and evaluating the torch lowering on small broadcasting tensors."""

from __future__ import annotations

import pytest
import torch

from vibee.ir.spec import Expr
from vibee.frontend.document import Scalar, Span
from vibee.frontend.errors import SpecError
from vibee.expr.language import compile_expr

PATH = "specs/tri/igla_flash_attention.vibee"
LINE, COL = 31, 15  # where the scalar starts in the (imaginary) spec file


def scalar(source, *, quoted=True, line=LINE, col=COL, path=PATH) -> Scalar:
    width = len(str(source)) + (2 if quoted else 0)
    return Scalar(source, Span(path, line, col, line, col + width), quoted=quoted)


def compile_ok(source: str, role="score_mod", params=None, quoted=True) -> Expr:
    return compile_expr(scalar(source, quoted=quoted), role=role, params=params or {})


def diagnostics(source, role="score_mod", params=None, quoted=True):
    with pytest.raises(SpecError) as caught:
        compile_expr(scalar(source, quoted=quoted), role=role, params=params or {})
    return caught.value.diagnostics


B, H, Q, K = 2, 4, 5, 7


def alibi_slope(h, num_heads):
    """What the generated module provides: the standard ALiBi slope 2 ** (-8 (h + 1) / n)."""
    return torch.exp2(-8.0 * (h + 1) / num_heads)


def context() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "score": torch.randn(B, H, Q, K, generator=gen) * 20.0,
        "b": torch.arange(B).view(B, 1, 1, 1),
        "h": torch.arange(H).view(1, H, 1, 1),
        "q_idx": torch.arange(Q).view(1, 1, Q, 1),
        "kv_idx": torch.arange(K).view(1, 1, 1, K),
    }


# No builtins but __import__: the lowering calls none, but torch's C++ code imports modules lazily
# (on the first as_tensor, the first float64 comparison ...) through the calling frame's builtins.
EVAL_BUILTINS = {"__builtins__": {"__import__": __import__}}


def eval_torch(expr: Expr, ctx: dict, num_heads: int = H):
    namespace = {"torch": torch, "alibi_slope": alibi_slope, "num_heads": num_heads, **ctx}
    return eval(expr.torch, EVAL_BUILTINS, namespace)
