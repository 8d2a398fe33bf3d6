"""Scanning and parsing an expression: every lexeme the language rejects (a string, ``**``,
``.attr``, ``[i]`` ...) is reported at its own column before the LALR parser runs, and a syntax
error names what was expected. Offsets into the expression become spans of the spec file."""

from __future__ import annotations

import keyword
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from vibee.expr.functions import FUNCTIONS
from vibee.frontend.document import Scalar, Span
from vibee.frontend.errors import Diagnostic, SpecError, one_of

_GRAMMAR = (Path(__file__).with_name("grammar.lark")).read_text()
# Lexer only: keeps every declared terminal, the rejected ones included.
_SCANNER = Lark(_GRAMMAR, parser=None, lexer="basic")
PARSER = Lark(_GRAMMAR, parser="lalr", lexer="basic", propagate_positions=True, maybe_placeholders=True)

COMPARE_TERMINALS = {"LT": "<", "LE": "<=", "GT": ">", "GE": ">=", "EQ": "==", "NE": "!="}
LOGIC_HINT = "combine conditions with 'and', 'or', 'not'"

# Lexemes the language rejects (declared at the bottom of grammar.lark): message and hint.
_REJECTED: dict[str, tuple[str, str | None]] = {
    "STRING": ("strings are not allowed in expressions", "expressions hold only numbers, names and calls"),
    "POWER": ("'**' is not supported", "multiply it out, e.g. x * x"),
    "FLOOR_DIV": ("'//' is not supported", "use '/'"),
    "ASSIGN": ("'=' is not allowed", "compare with '=='; functions take positional arguments only"),
    "BANG": ("'!' is not allowed", "use 'not' or '!='"),
}
_OTHER_HINTS = {"&": LOGIC_HINT, "|": LOGIC_HINT, "~": LOGIC_HINT, "%": "'%' is not supported",
                "@": "there is no matrix product in an expression"}
_OPERAND_ENDS = ("NAME", "NUMBER", "_RPAR")


class Where:
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


def parse(text: str, where: Where) -> Tree:
    """The parse tree of the text, or SpecError: every rejected lexeme, else the syntax error."""
    tokens = _scan(text, where)
    try:
        return PARSER.parse(text)
    except UnexpectedInput as err:
        raise SpecError(_syntax_error(err, tokens, text, where)) from None


def nesting_depth(tree: Tree) -> int:
    """Depth of the parse tree, found without recursion (checking it recurses once per level)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        for child in node.children:
            if isinstance(child, Tree):  # a call's argument list is not a level of its own
                stack.append((child, depth if child.data == "arguments" else depth + 1))
    return deepest


def _scan(text: str, where: Where) -> list[Token]:
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


def _describe_terminal(name: str) -> str:
    if name == "$END":
        return "end of expression"
    if name == "NAME":
        return "a name"
    if name == "NUMBER":
        return "a number"
    return f"'{PARSER.get_terminal(name).pattern.value}'"


def _syntax_error(err: UnexpectedInput, tokens: list[Token], text: str, where: Where) -> Diagnostic:
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
    if tok.type in COMPARE_TERMINALS and before is not None and before.type in _OPERAND_ENDS:
        return where.diagnostic(start, end, "comparisons cannot be chained",
                                "write 'a < b and b < c'")
    shown = {"NAME": "name ", "NUMBER": "number "}.get(tok.type, "")
    return where.diagnostic(start, end, f"unexpected {shown}'{tok.value}'", hint)
