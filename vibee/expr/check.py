"""Type-checking an expression's parse tree into the typed tree of vibee.expr.tree: names,
calls and types are checked, and constant sub-expressions (numbers, params and everything
computed only from them) are folded into numbers. One mistake is reported once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from lark import Transformer, v_args

from vibee.expr import tree
from vibee.expr.functions import CONTEXT_VARS, FUNCTIONS, Constant, Function
from vibee.expr.scan import COMPARE_TERMINALS, LOGIC_HINT, Where
from vibee.frontend.errors import did_you_mean, one_of

_INT64_MAX = 2**63 - 1
_ARITH = {"PLUS": "+", "MINUS": "-", "STAR": "*", "SLASH": "/"}
_FOLD_ARITH: dict[str, Callable[[Constant, Constant], Constant]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
}
_FOLD_COMPARE: dict[str, Callable[[Constant, Constant], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
EXAMPLES = {"score_mod": "'cap * tanh(score / cap)'", "mask_mod": "'q_idx >= kv_idx'"}


@dataclass(frozen=True)
class Typed:
    """A checked sub-expression: its tree, where it is, and its value when it is a constant."""

    node: tree.Node
    start: int
    end: int
    value: Constant | None = None

    @property
    def type(self) -> str:
        return self.node.type

    @property
    def constant(self) -> bool:
        return self.value is not None

    @property
    def number(self) -> bool:
        return self.type in ("int", "float")


def _promote(*types: str) -> str:
    return "int" if all(t == "int" for t in types) else "float"


@v_args(meta=True)
class Checker(Transformer):
    """One method per grammar rule: each returns a Typed, or None where the sub-expression has an
    error (already reported), so that no parent reports it again."""

    def __init__(self, where: Where, params: dict[str, int | float | bool]):
        super().__init__(visit_tokens=False)
        self.where = where
        self.params = params
        self.diagnostics = []

    def _error(self, start: int, end: int, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(self.where.diagnostic(start, end, message, hint))

    def _constant(self, value: Constant, type_: str, start: int, end: int) -> Typed | None:
        if type_ == "float":
            value = float(value)
            if not math.isfinite(value):
                self._error(start, end, f"this constant evaluates to {value}, which has no literal",
                            "keep constants finite")
                return None
        elif type_ == "int" and not -_INT64_MAX <= value <= _INT64_MAX:
            self._error(start, end, f"the integer {value} does not fit in 64 bits")
            return None
        return Typed(tree.Const(value, type_), start, end, value)

    # ---- leaves

    def number(self, meta, children) -> Typed | None:
        (tok,) = children
        if not tok.value.isdigit():
            return self._constant(float(tok.value), "float", tok.start_pos, tok.end_pos)
        if len(tok.value.lstrip("0")) > 19:  # beyond int64, and int() refuses very long digit strings
            self._error(tok.start_pos, tok.end_pos, f"the integer {tok.value[:20]}... does not fit in 64 bits")
            return None
        return self._constant(int(tok.value), "int", tok.start_pos, tok.end_pos)

    def name(self, meta, children) -> Typed | None:
        (tok,) = children
        word, start, end = tok.value, tok.start_pos, tok.end_pos
        if word in CONTEXT_VARS:
            if word in self.params:
                self._error(start, end, f"'{word}' is both a context variable and a param", "rename the param")
                return None
            return Typed(tree.Var(word, CONTEXT_VARS[word]), start, end)
        if word in self.params:
            value = self.params[word]
            if isinstance(value, bool):
                return self._constant(value, "bool", start, end)
            if isinstance(value, (int, float)):
                return self._constant(value, "int" if isinstance(value, int) else "float", start, end)
            self._error(start, end, f"param '{word}' must be a number or a boolean, got {type(value).__name__}")
            return None
        if word in FUNCTIONS:
            self._error(start, end, f"'{word}' is a function: call it, e.g. {word}(...)")
            return None
        known = [*CONTEXT_VARS, *self.params]
        hint = did_you_mean(word, [*known, *FUNCTIONS]) or ("known names: " + ", ".join(known))
        self._error(start, end, f"unknown name '{word}'", hint)
        return None

    # ---- arithmetic and comparisons

    def neg(self, meta, children) -> Typed | None:
        _minus, operand = children
        if operand is None:
            return None
        if not operand.number:
            self._error(operand.start, operand.end, f"unary '-' needs a number, got {operand.type}")
            return None
        if operand.constant:
            return self._constant(-operand.value, operand.type, meta.start_pos, meta.end_pos)
        return Typed(tree.Neg(operand.node, operand.type), meta.start_pos, meta.end_pos)

    def arith(self, meta, children) -> Typed | None:
        left, op_tok, right = children
        op = _ARITH[op_tok.type]
        if not self._numbers(op, left, right):
            return None
        if right.constant and op == "/" and right.value == 0:
            self._error(right.start, right.end, "division by zero", "the divisor is a constant 0 here")
            return None
        type_ = "float" if op == "/" else _promote(left.type, right.type)
        if left.constant and right.constant:
            return self._fold(lambda: _FOLD_ARITH[op](left.value, right.value), type_, meta, op)
        return Typed(tree.Arith(op, left.node, right.node, type_), meta.start_pos, meta.end_pos)

    def compare(self, meta, children) -> Typed | None:
        left, op_tok, right = children
        op = COMPARE_TERMINALS[op_tok.type]
        if not self._numbers(op, left, right, hint=LOGIC_HINT):
            return None
        if left.constant and right.constant:
            return self._fold(lambda: _FOLD_COMPARE[op](left.value, right.value), "bool", meta, op)
        return Typed(tree.Compare(op, left.node, right.node), meta.start_pos, meta.end_pos)

    def _numbers(self, op: str, *operands: Typed | None, hint: str | None = None) -> bool:
        ok = True
        for operand in operands:
            if operand is None:
                ok = False
            elif not operand.number:
                self._error(operand.start, operand.end, f"'{op}' needs numbers, got {operand.type}", hint)
                ok = False
        return ok

    def _fold(self, compute: Callable[[], Constant], type_: str, meta, what: str) -> Typed | None:
        try:
            value = compute()
        except (ArithmeticError, ValueError):  # overflow, math domain errors
            self._error(meta.start_pos, meta.end_pos, f"'{what}' has no finite value for these constants")
            return None
        return self._constant(value, type_, meta.start_pos, meta.end_pos)

    # ---- logic: folded when a side is constant, so no constant reaches a boolean operator

    def and_op(self, meta, children) -> Typed | None:
        return self._logic("and", meta, children)

    def or_op(self, meta, children) -> Typed | None:
        return self._logic("or", meta, children)

    def _logic(self, word: str, meta, children) -> Typed | None:
        left, right = children
        if not self._booleans(word, left, right):
            return None
        for side, other in ((left, right), (right, left)):
            if side.constant:
                # x and True == x; x and False == False; x or False == x; x or True == True
                decides = side.value if word == "or" else not side.value
                if decides:
                    return self._constant(side.value, "bool", meta.start_pos, meta.end_pos)
                return Typed(other.node, meta.start_pos, meta.end_pos, other.value)
        return Typed(tree.Logic(word, left.node, right.node), meta.start_pos, meta.end_pos)

    def not_op(self, meta, children) -> Typed | None:
        (operand,) = children
        if not self._booleans("not", operand):
            return None
        if operand.constant:
            return self._constant(not operand.value, "bool", meta.start_pos, meta.end_pos)
        return Typed(tree.Not(operand.node), meta.start_pos, meta.end_pos)

    def _booleans(self, word: str, *operands: Typed | None) -> bool:
        ok = True
        for operand in operands:
            if operand is None:
                ok = False
            elif operand.type != "bool":
                self._error(operand.start, operand.end, f"'{word}' needs booleans, got {operand.type}",
                            "write a comparison, e.g. 'x > 0'")
                ok = False
        return ok

    # ---- calls

    def arguments(self, meta, children) -> list[Typed | None]:
        return list(children)

    def call(self, meta, children) -> Typed | None:
        name_tok, args = children
        args = args or []
        fn = FUNCTIONS.get(name_tok.value)
        if fn is None:
            self._error(name_tok.start_pos, name_tok.end_pos, f"'{name_tok.value}' is not an allowed function",
                        did_you_mean(name_tok.value, FUNCTIONS) or one_of(FUNCTIONS))
            return None
        name = name_tok.value
        if len(args) != fn.arity:
            plural = "" if fn.arity == 1 else "s"
            self._error(meta.start_pos, meta.end_pos, f"{name}() takes {fn.arity} argument{plural}, got {len(args)}",
                        f"{name}({', '.join(fn.args)}): {fn.description}")
            return None
        if not self._arguments_fit(name, fn, args):
            return None
        numbers = [a.type for a, kind in zip(args, fn.args) if kind != "bool"]
        type_ = "float" if fn.result == "float" else _promote(*numbers)
        if name == "where" and args[0].constant:
            return self._chosen_branch(args[1] if args[0].value else args[2], type_, meta)
        if fn.fold is not None and all(a.constant for a in args):
            return self._fold(lambda: fn.fold(*(a.value for a in args)), type_, meta, f"{name}(...)")
        return Typed(tree.Call(name, tuple(a.node for a in args), type_), meta.start_pos, meta.end_pos)

    def _arguments_fit(self, name: str, fn: Function, args: list[Typed | None]) -> bool:
        ok = True
        for position, (arg, kind) in enumerate(zip(args, fn.args), start=1):
            if arg is None:
                ok = False
                continue
            fits = arg.number if kind == "number" else arg.type == kind
            if not fits:
                wanted = {"number": "a number", "int": "an int", "bool": "a boolean"}[kind]
                self._error(arg.start, arg.end, f"argument {position} of {name}() must be {wanted}, got {arg.type}",
                            f"{name}({', '.join(fn.args)}): {fn.description}")
                ok = False
        return ok

    def _chosen_branch(self, branch: Typed, type_: str, meta) -> Typed | None:
        """where() with a constant condition is the branch it picks, still of where()'s type."""
        if branch.constant:
            return self._constant(branch.value, type_, meta.start_pos, meta.end_pos)
        node = branch.node if branch.type == type_ else tree.ToFloat(branch.node)
        return Typed(node, meta.start_pos, meta.end_pos)

    # ---- the whole expression

    def check_result(self, result: Typed, role: str) -> None:
        text = self.where.text
        start, end = len(text) - len(text.lstrip()), len(text.rstrip())
        if role == "mask_mod" and result.type != "bool":
            self._error(start, end, f"mask_mod must be a boolean expression, got {result.type}",
                        "a mask keeps the positions where it is true, e.g. " + EXAMPLES["mask_mod"])
        elif role == "score_mod" and result.type == "bool":
            self._error(start, end, "score_mod must be a number, got bool",
                        "to change some scores only, use where(cond, new_score, score)")
        elif result.constant:
            self._error(start, end, f"{role} is the constant {tree.literal(result.value)} with these params",
                        "use at least one of " + ", ".join(CONTEXT_VARS))
