"""vibee's expression language for attention variants: ``score_mod`` and ``mask_mod``.

An expression goes through four steps, one module each:
  scan, parse  vibee/expr/scan.py: every lexeme the language rejects is named at its own column
               (grammar.lark declares those too), then LALR; a syntax error lists what was expected;
  check        vibee/expr/check.py: names, calls and types, folding constant sub-expressions
               (params are constants) into the typed tree of vibee/expr/tree.py;
  lower        to torch (the torch path), Triton ``tl.*`` (the kernels) and numpy (the reference
               oracle), each in its own lower_<target>.py.
Only numbers re-printed by ``repr`` and names from fixed tables reach a lowering, so nothing a
spec writes can become code.
"""

from __future__ import annotations

from typing import Literal

from vibee.expr import lower_numpy, lower_torch, lower_triton
from vibee.expr.check import EXAMPLES, Checker
from vibee.expr.functions import CONTEXT_VARS, FUNCTIONS
from vibee.expr.scan import Where, nesting_depth, parse
from vibee.frontend.document import Scalar
from vibee.frontend.errors import SpecError
from vibee.ir.spec import Expr

__all__ = ["CONTEXT_VARS", "FUNCTIONS", "MAX_NESTING", "compile_expr"]

Role = Literal["score_mod", "mask_mod"]
# Far beyond any real variant, and well inside Python's recursion limit for the checker.
MAX_NESTING = 100


def compile_expr(node: Scalar, *, role: Role, params: dict[str, int | float | bool]) -> Expr:
    """Check the expression in ``node`` and lower it to torch, Triton and numpy.

    ``params`` are the variant's constants; they are inlined as numbers. Raises SpecError with one
    diagnostic per problem found, each pointing into the expression.
    """
    if role not in ("score_mod", "mask_mod"):
        raise ValueError(f"role must be 'score_mod' or 'mask_mod', got {role!r}")
    text = _expression_text(node, role)
    where = Where(node, text)
    if not text.strip():
        raise SpecError.at(where.span(0, 0), f"{role} is empty", hint="write an expression, e.g. " + EXAMPLES[role])

    parsed = parse(text, where)
    depth = nesting_depth(parsed)
    if depth > MAX_NESTING:
        start = len(text) - len(text.lstrip())
        raise SpecError.at(where.span(start, len(text.rstrip())),
                           f"{role} nests {depth} levels deep; the limit is {MAX_NESTING}",
                           hint="split it into simpler terms")

    checker = Checker(where, params)
    result = checker.transform(parsed)
    if result is not None:
        checker.check_result(result, role)
    if checker.diagnostics:
        raise SpecError(sorted(checker.diagnostics, key=lambda d: (d.span.line, d.span.col)))
    assert result is not None
    return Expr(source=text, torch=lower_torch.lower(result.node), triton=lower_triton.lower(result.node),
                numpy=lower_numpy.lower(result.node), span=node.span)


def _expression_text(node: Scalar, role: str) -> str:
    value = node.value
    if value is None:
        return ""
    if isinstance(value, bool):
        # A plain `true`/`false` was resolved by the document parser: the language has no literal for it.
        raise SpecError.at(node.span, f"{role} must be an expression, got the boolean {str(value).lower()}",
                           hint="write a comparison, e.g. " + EXAMPLES["mask_mod"])
    return value if isinstance(value, str) else repr(value)
