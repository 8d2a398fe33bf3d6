"""vibee's expression language for attention variants: ``score_mod`` and ``mask_mod``.

An expression goes through four steps:
  scan   lex every character (vibee/expr/grammar.lark declares the lexemes the language rejects too),
         so that a string, ``**``, ``.attr`` or ``[i]`` is named at its own column;
  parse  LALR over the same grammar; a syntax error lists what was expected;
  check  names, calls and types, folding constant sub-expressions (params are constants);
  lower  to torch (reference and torch target) and to Triton ``tl.*`` (kernels).
Only numbers re-printed by ``repr`` and names from the fixed tables below reach a lowering, so
nothing a spec writes can become code.
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from vibee.ir.spec import Expr
from vibee.frontend.document import Scalar, Span
from vibee.frontend.errors import Diagnostic, SpecError, did_you_mean, one_of

Role = Literal["score_mod", "mask_mod"]
Constant = Union[int, float, bool]

# What an expression can read. The kernels and the reference bind these names: `score` is the
# attention logit (float32), the others are the batch, head, query and key positions (int64 in
# torch, int32 in Triton), all broadcasting against each other.
CONTEXT_VARS: dict[str, str] = {"score": "float", "b": "int", "h": "int", "q_idx": "int", "kv_idx": "int"}

_INT64_MAX = 2**63 - 1
# Far beyond any real variant, and well inside Python's recursion limit for the checker.
MAX_NESTING = 100


def _sigmoid(x: float) -> float:
    # Written so that neither branch overflows for large |x|.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Function:
    """An allowed call: its argument and result types, how constant arguments are evaluated at
    compile time, and its two lowerings (format strings over the lowered arguments)."""

    args: tuple[str, ...]  # per argument: "number" (int or float), "int" or "bool"
    result: str  # "float", or "promote": int when every number argument is int, else float
    torch: str
    triton: str
    fold: Callable[..., Constant] | None  # evaluates all-constant arguments; None: see the table
    float_math: bool = False  # Triton's tl.exp & co. reject ints: int arguments are cast to fp32
    description: str = ""

    @property
    def arity(self) -> int:
        return len(self.args)


FUNCTIONS: dict[str, Function] = {
    "tanh": Function(
        ("number",), "float", "torch.tanh({0})",
        # Triton 3.6 has no tl.tanh; tanh(x) = 2 * sigmoid(2x) - 1 saturates cleanly at +-1.
        "((2.0 * tl.sigmoid((2.0 * {0}))) - 1.0)",
        math.tanh, float_math=True, description="hyperbolic tangent"),
    "exp": Function(("number",), "float", "torch.exp({0})", "tl.exp({0})", math.exp,
                    float_math=True, description="e ** x"),
    "log": Function(("number",), "float", "torch.log({0})", "tl.log({0})", math.log,
                    float_math=True, description="natural logarithm"),
    "sqrt": Function(("number",), "float", "torch.sqrt({0})", "tl.sqrt({0})", math.sqrt,
                     float_math=True, description="square root"),
    "abs": Function(("number",), "promote", "torch.abs({0})", "tl.abs({0})", abs,
                    description="absolute value"),
    "sigmoid": Function(("number",), "float", "torch.sigmoid({0})", "tl.sigmoid({0})", _sigmoid,
                        float_math=True, description="1 / (1 + e ** -x)"),
    "min": Function(("number", "number"), "promote", "torch.minimum({0}, {1})",
                    "tl.minimum({0}, {1})", min, description="the smaller of a and b"),
    "max": Function(("number", "number"), "promote", "torch.maximum({0}, {1})",
                    "tl.maximum({0}, {1})", max, description="the larger of a and b"),
    # where() folds on a constant condition alone (the chosen branch need not be constant).
    "where": Function(("bool", "number", "number"), "promote", "torch.where({0}, {1}, {2})",
                      "tl.where({0}, {1}, {2})", None, description="a where cond holds, else b"),
    # The generated module (torch) and kernel template (Triton) define alibi_slope(h, num_heads)
    # and have num_heads in scope; the slope depends on it, so it is never folded.
    "alibi_slope": Function(("int",), "float", "alibi_slope({0}, num_heads)",
                            "alibi_slope({0}, num_heads)", None,
                            description="the standard ALiBi slope of head h"),
}

_ARITH = {"PLUS": "+", "MINUS": "-", "STAR": "*", "SLASH": "/"}
_COMPARE = {"LT": "<", "LE": "<=", "GT": ">", "GE": ">=", "EQ": "==", "NE": "!="}
_FOLD_ARITH: dict[str, Callable[[Constant, Constant], Constant]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b,
}
_FOLD_COMPARE: dict[str, Callable[[Constant, Constant], bool]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}

# Lexemes the language rejects (declared at the bottom of grammar.lark): message and hint.
_REJECTED: dict[str, tuple[str, str | None]] = {
    "STRING": ("strings are not allowed in expressions", "expressions hold only numbers, names and calls"),
    "POWER": ("'**' is not supported", "multiply it out, e.g. x * x"),
    "FLOOR_DIV": ("'//' is not supported", "use '/'"),
    "ASSIGN": ("'=' is not allowed", "compare with '=='; functions take positional arguments only"),
    "BANG": ("'!' is not allowed", "use 'not' or '!='"),
}
_LOGIC_HINT = "combine conditions with 'and', 'or', 'not'"
_OTHER_HINTS = {"&": _LOGIC_HINT, "|": _LOGIC_HINT, "~": _LOGIC_HINT, "%": "'%' is not supported",
                "@": "there is no matrix product in an expression"}

_GRAMMAR = (Path(__file__).with_name("grammar.lark")).read_text()
# Lexer only: keeps every declared terminal, the rejected ones included.
_SCANNER = Lark(_GRAMMAR, parser=None, lexer="basic")
_PARSER = Lark(_GRAMMAR, parser="lalr", lexer="basic", propagate_positions=True, maybe_placeholders=True)


def compile_expr(node: Scalar, *, role: Role, params: dict[str, int | float | bool]) -> Expr:
    """Check the expression in ``node`` and lower it to torch and Triton.

    ``params`` are the variant's constants; they are inlined as numbers. Raises SpecError with one
    diagnostic per problem found, each pointing into the expression.
    """
    if role not in ("score_mod", "mask_mod"):
        raise ValueError(f"role must be 'score_mod' or 'mask_mod', got {role!r}")
    text = _expression_text(node, role)
    where = _Where(node, text)
    if not text.strip():
        raise SpecError.at(where.span(0, 0), f"{role} is empty",
                           hint="write an expression, e.g. " + _EXAMPLES[role])

    tokens = _scan(text, where)
    try:
        tree = _PARSER.parse(text)
    except UnexpectedInput as err:
        raise SpecError(_syntax_error(err, tokens, text, where)) from None

    depth = _nesting_depth(tree)
    if depth > MAX_NESTING:
        start = len(text) - len(text.lstrip())
        raise SpecError.at(where.span(start, len(text.rstrip())),
                           f"{role} nests {depth} levels deep; the limit is {MAX_NESTING}",
                           hint="split it into simpler terms")

    checker = _Checker(where, params)
    result: _Typed | None = checker.transform(tree)
    if result is not None:
        checker._check_result(result, role)
    if checker.diagnostics:
        raise SpecError(sorted(checker.diagnostics, key=lambda d: (d.span.line, d.span.col)))
    assert result is not None
    return Expr(source=text, torch=result.torch, triton=result.triton, span=node.span)


def _nesting_depth(tree: Tree) -> int:
    """Depth of the parse tree, found without recursion (checking it recurses once per level)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in node.children:
            if isinstance(child, Tree):  # a call's argument list is not a level of its own
                stack.append((child, depth if child.data == "arguments" else depth + 1))
    return deepest


_EXAMPLES = {"score_mod": "'cap * tanh(score / cap)'", "mask_mod": "'q_idx >= kv_idx'"}


def _expression_text(node: Scalar, role: str) -> str:
    value = node.value
    if value is None:
        return ""
    if isinstance(value, bool):
        # A plain `true`/`false` was resolved by the document parser: the language has no literal for it.
        raise SpecError.at(node.span, f"{role} must be an expression, got the boolean {str(value).lower()}",
                           hint="write a comparison, e.g. " + _EXAMPLES["mask_mod"])
    return value if isinstance(value, str) else repr(value)


class _Where:
    """Turns offsets into the expression text into spans of the spec file."""

    def __init__(self, node: Scalar, text: str):
        self.node = node
        self.text = text
        # A quoted scalar's first character is its opening quote.
        self.col0 = node.span.col + (1 if node.quoted else 0)

    def _line_col(self, offset: int) -> tuple[int, int]:
        newlines = self.text.count("\n", 0, offset)
        if newlines == 0:
            return self.node.span.line, self.col0 + offset
        # Later lines of a block scalar: the column inside the expression's own line.
        return self.node.span.line + newlines, offset - self.text.rfind("\n", 0, offset)

    def span(self, start: int, end: int) -> Span:
        line, col = self._line_col(start)
        end_line, end_col = self._line_col(max(end, start))
        return Span(self.node.span.path, line, col, end_line, end_col)

    def diagnostic(self, start: int, end: int, message: str, hint: str | None = None) -> Diagnostic:
        return Diagnostic(message, self.span(start, end), hint)


def _scan(text: str, where: _Where) -> list[Token]:
    """Lex the whole text; report every lexeme the language rejects, then raise if any."""
    try:
        tokens = list(_SCANNER.lex(text))
    except UnexpectedCharacters as err:  # the OTHER terminal should make this unreachable
        raise SpecError(where.diagnostic(err.pos_in_stream, err.pos_in_stream + 1,
                                         f"unexpected character {text[err.pos_in_stream]!r}")) from None
    problems: list[Diagnostic] = []
    open_brackets = 0
    for i, tok in enumerate(tokens):
        before = tokens[i - 1] if i > 0 else None
        after = tokens[i + 1] if i + 1 < len(tokens) else None
        start, end = tok.start_pos, tok.end_pos
        if tok.type == "NAME":
            if before is not None and before.type == "DOT":
                continue  # reported with its dot
            if keyword.iskeyword(tok.value):
                hint = ("the language has no boolean literals; write a comparison"
                        if tok.value in ("True", "False") else None)
                problems.append(where.diagnostic(start, end, f"'{tok.value}' is a Python keyword, "
                                                 "not part of the expression language", hint))
            elif "__" in tok.value:
                if after is not None and after.type == "_LPAR":
                    problems.append(where.diagnostic(start, end, f"'{tok.value}' is not an allowed function",
                                                     one_of(FUNCTIONS)))
                else:
                    problems.append(where.diagnostic(start, end, f"'{tok.value}' is not allowed: "
                                                     "names containing '__' are reserved"))
        elif tok.type == "DOT":
            if after is not None and after.type == "NAME":
                end = after.end_pos
            problems.append(where.diagnostic(start, end, f"attribute access is not allowed ('{text[start:end]}')",
                                             "only the context variables, params and functions are names"))
        elif tok.type == "BRACKET":
            if tok.value in "[{":
                open_brackets += 1
                what = "subscripts or lists" if tok.value == "[" else "sets or dicts"
                problems.append(where.diagnostic(start, end, f"'{tok.value}' is not allowed: "
                                                 f"expressions have no {what}"))
            elif open_brackets:
                open_brackets -= 1  # closes a bracket already reported
            else:
                problems.append(where.diagnostic(start, end, f"unmatched '{tok.value}'"))
        elif tok.type in _REJECTED:
            message, hint = _REJECTED[tok.type]
            problems.append(where.diagnostic(start, end, message, hint))
        elif tok.type == "OTHER":
            problems.append(where.diagnostic(start, end, f"unexpected character {tok.value!r}",
                                             _OTHER_HINTS.get(tok.value)))
    if problems:
        raise SpecError(problems)
    return tokens


_OPERAND_ENDS = ("NAME", "NUMBER", "_RPAR")


def _describe_terminal(name: str) -> str:
    if name == "$END":
        return "end of expression"
    if name == "NAME":
        return "a name"
    if name == "NUMBER":
        return "a number"
    return f"'{_PARSER.get_terminal(name).pattern.value}'"


def _syntax_error(err: UnexpectedInput, tokens: list[Token], text: str, where: _Where) -> Diagnostic:
    if not isinstance(err, UnexpectedToken):
        return where.diagnostic(err.pos_in_stream, err.pos_in_stream + 1, "syntax error")
    hint = one_of(_describe_terminal(t) for t in err.expected)
    tok = err.token
    if tok.type == "$END":
        end = len(text.rstrip())
        last = tokens[-1].value if tokens else ""
        return where.diagnostic(end, end + 1, f"the expression ends too early, after '{last}'", hint)
    before = next((t for t in reversed(tokens) if t.end_pos <= tok.start_pos), None)
    start, end = tok.start_pos, tok.end_pos
    if tok.type == "_LPAR" and before is not None and before.type == "_RPAR":
        return where.diagnostic(start, end, "only functions can be called, and only by their name",
                                one_of(FUNCTIONS))
    if tok.type in _COMPARE and before is not None and before.type in _OPERAND_ENDS:
        return where.diagnostic(start, end, "comparisons cannot be chained",
                                "write 'a < b and b < c'")
    shown = {"NAME": "name ", "NUMBER": "number "}.get(tok.type, "")
    return where.diagnostic(start, end, f"unexpected {shown}'{tok.value}'", hint)


@dataclass(frozen=True)
class _Typed:
    """A checked sub-expression: its type, both lowerings, where it is, and its value when it is
    a constant (numbers and params, and everything computed only from them)."""

    type: str  # "int", "float" or "bool"
    torch: str
    triton: str
    start: int
    end: int
    value: Constant | None = None

    @property
    def constant(self) -> bool:
        return self.value is not None

    @property
    def number(self) -> bool:
        return self.type in ("int", "float")


def _literal(value: Constant) -> str:
    """Re-print a constant as Python source, parenthesised when negative."""
    if isinstance(value, bool):
        return "True" if value else "False"
    text = repr(value)
    return f"({text})" if text.startswith("-") else text


def _promote(*types: str) -> str:
    return "int" if all(t == "int" for t in types) else "float"


@v_args(meta=True)
class _Checker(Transformer):
    """One method per grammar rule: each returns a _Typed, or None where the sub-expression has an
    error (already reported), so one mistake is reported once and not again by every parent."""

    def __init__(self, where: _Where, params: dict[str, int | float | bool]):
        super().__init__(visit_tokens=False)
        self.where = where
        self.params = params
        self.diagnostics: list[Diagnostic] = []

    def _error(self, start: int, end: int, message: str, hint: str | None = None) -> None:
        self.diagnostics.append(self.where.diagnostic(start, end, message, hint))

    def _constant(self, value: Constant, type_: str, start: int, end: int) -> _Typed | None:
        if type_ == "float":
            value = float(value)
            if not math.isfinite(value):
                self._error(start, end, f"this constant evaluates to {value}, which has no literal",
                            "keep constants finite")
                return None
        elif type_ == "int" and not -_INT64_MAX <= value <= _INT64_MAX:
            self._error(start, end, f"the integer {value} does not fit in 64 bits")
            return None
        text = _literal(value)
        return _Typed(type_, text, text, start, end, value)

    # ---- leaves

    def number(self, meta, children) -> _Typed | None:
        (tok,) = children
        if not tok.value.isdigit():
            return self._constant(float(tok.value), "float", tok.start_pos, tok.end_pos)
        if len(tok.value.lstrip("0")) > 19:  # beyond int64, and int() refuses very long digit strings
            self._error(tok.start_pos, tok.end_pos, f"the integer {tok.value[:20]}... does not fit in 64 bits")
            return None
        return self._constant(int(tok.value), "int", tok.start_pos, tok.end_pos)

    def name(self, meta, children) -> _Typed | None:
        (tok,) = children
        word, start, end = tok.value, tok.start_pos, tok.end_pos
        if word in CONTEXT_VARS:
            if word in self.params:
                self._error(start, end, f"'{word}' is both a context variable and a param",
                            "rename the param")
                return None
            # `word` equals a key of CONTEXT_VARS: a fixed name, not arbitrary spec text.
            return _Typed(CONTEXT_VARS[word], word, word, start, end)
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

    def neg(self, meta, children) -> _Typed | None:
        _minus, operand = children
        if operand is None:
            return None
        if not operand.number:
            self._error(operand.start, operand.end, f"unary '-' needs a number, got {operand.type}")
            return None
        if operand.constant:
            return self._constant(-operand.value, operand.type, meta.start_pos, meta.end_pos)
        return _Typed(operand.type, f"(-{operand.torch})", f"(-{operand.triton})", meta.start_pos, meta.end_pos)

    def arith(self, meta, children) -> _Typed | None:
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
        return _Typed(type_, f"({left.torch} {op} {right.torch})", f"({left.triton} {op} {right.triton})",
                      meta.start_pos, meta.end_pos)

    def compare(self, meta, children) -> _Typed | None:
        left, op_tok, right = children
        op = _COMPARE[op_tok.type]
        if not self._numbers(op, left, right, hint=_LOGIC_HINT):
            return None
        if left.constant and right.constant:
            return self._fold(lambda: _FOLD_COMPARE[op](left.value, right.value), "bool", meta, op)
        return _Typed("bool", f"({left.torch} {op} {right.torch})", f"({left.triton} {op} {right.triton})",
                      meta.start_pos, meta.end_pos)

    def _numbers(self, op: str, *operands: _Typed | None, hint: str | None = None) -> bool:
        ok = True
        for operand in operands:
            if operand is None:
                ok = False
            elif not operand.number:
                self._error(operand.start, operand.end, f"'{op}' needs numbers, got {operand.type}", hint)
                ok = False
        return ok

    def _fold(self, compute: Callable[[], Constant], type_: str, meta, what: str) -> _Typed | None:
        try:
            value = compute()
        except (ArithmeticError, ValueError):  # overflow, math domain errors
            self._error(meta.start_pos, meta.end_pos, f"'{what}' has no finite value for these constants")
            return None
        return self._constant(value, type_, meta.start_pos, meta.end_pos)

    # ---- logic: folded when a side is constant, so no Python bool reaches `&`, `|` or `~`

    def and_op(self, meta, children) -> _Typed | None:
        return self._logic("and", "&", meta, children)

    def or_op(self, meta, children) -> _Typed | None:
        return self._logic("or", "|", meta, children)

    def _logic(self, word: str, op: str, meta, children) -> _Typed | None:
        left, right = children
        if not self._booleans(word, left, right):
            return None
        for side, other in ((left, right), (right, left)):
            if side.constant:
                # x and True == x; x and False == False; x or False == x; x or True == True
                decides = side.value if word == "or" else not side.value
                if decides:
                    return self._constant(side.value, "bool", meta.start_pos, meta.end_pos)
                return _Typed("bool", other.torch, other.triton, meta.start_pos, meta.end_pos, other.value)
        return _Typed("bool", f"({left.torch} {op} {right.torch})", f"({left.triton} {op} {right.triton})",
                      meta.start_pos, meta.end_pos)

    def not_op(self, meta, children) -> _Typed | None:
        (operand,) = children
        if not self._booleans("not", operand):
            return None
        if operand.constant:
            return self._constant(not operand.value, "bool", meta.start_pos, meta.end_pos)
        return _Typed("bool", f"(~{operand.torch})", f"(~{operand.triton})", meta.start_pos, meta.end_pos)

    def _booleans(self, word: str, *operands: _Typed | None) -> bool:
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

    def arguments(self, meta, children) -> list[_Typed | None]:
        return list(children)

    def call(self, meta, children) -> _Typed | None:
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
            self._error(meta.start_pos, meta.end_pos,
                        f"{name}() takes {fn.arity} argument{plural}, got {len(args)}",
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
        # torch functions want tensors: a constant argument that survives folding is wrapped.
        torch_args = [f"torch.as_tensor({a.torch})" if a.constant else a.torch for a in args]
        triton_args = [f"({a.triton}).to(tl.float32)" if fn.float_math and a.type == "int" else a.triton
                       for a in args]
        return _Typed(type_, fn.torch.format(*torch_args), fn.triton.format(*triton_args),
                      meta.start_pos, meta.end_pos)

    def _arguments_fit(self, name: str, fn: Function, args: list[_Typed | None]) -> bool:
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

    def _chosen_branch(self, branch: _Typed, type_: str, meta) -> _Typed | None:
        """where() with a constant condition is the branch it picks, still of where()'s type."""
        if branch.constant:
            return self._constant(branch.value, type_, meta.start_pos, meta.end_pos)
        if branch.type == type_:
            return _Typed(type_, branch.torch, branch.triton, meta.start_pos, meta.end_pos)
        # an int branch of a float where(): `* 1.0` converts in torch and Triton alike
        return _Typed(type_, f"({branch.torch} * 1.0)", f"({branch.triton} * 1.0)", meta.start_pos, meta.end_pos)

    # ---- the whole expression

    def _check_result(self, result: _Typed, role: str) -> None:
        text = self.where.text
        start = len(text) - len(text.lstrip())
        end = len(text.rstrip())
        if role == "mask_mod" and result.type != "bool":
            self._error(start, end, f"mask_mod must be a boolean expression, got {result.type}",
                        "a mask keeps the positions where it is true, e.g. " + _EXAMPLES["mask_mod"])
        elif role == "score_mod" and result.type == "bool":
            self._error(start, end, "score_mod must be a number, got bool",
                        "to change some scores only, use where(cond, new_score, score)")
        elif result.constant:
            self._error(start, end, f"{role} is the constant {_literal(result.value)} with these params",
                        "use at least one of " + ", ".join(CONTEXT_VARS))
