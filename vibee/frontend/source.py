"""The state of one parse: the text with its line index (for positions), what the post-lexer
knows at the current point of the token stream, and the diagnostics found so far."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from lark import Token

from vibee.frontend.document import Span
from vibee.frontend.errors import Diagnostic

# Enough to report every independent error of a realistic file, few enough to stay fast on junk.
MAX_ERRORS = 50


@dataclass
class LexState:
    """What the post-lexer knows at a point of the token stream; copied at each line start so
    the parse can be rolled back there."""

    levels: list[int] = field(default_factory=list)  # indentation of the open blocks (0-based columns)
    parens: list[Token] = field(default_factory=list)  # open '{' / '[' tokens
    started: bool = False  # a real token has been seen (leading blank/comment lines are dropped)
    after_dash: bool = False  # the previous token was '-' on the same line
    block_level: int | None = None  # inside a block scalar: its content must be indented deeper
    block_ended: bool = False  # a less indented comment line closed the block scalar
    last_was_nl: bool = False

    def copy(self) -> "LexState":
        return LexState(list(self.levels), list(self.parens), self.started, self.after_dash,
                        self.block_level, self.block_ended, self.last_was_nl)


class ParseRun:
    """One parse of one text: the text and its line index, the post-lexer's state, the diagnostics."""

    def __init__(self, text: str, path: str, *, recovering: bool = False):
        self.text = text
        self.path = path
        self.lines = text.split("\n")
        self.line_starts = [0]
        for line in self.lines[:-1]:
            self.line_starts.append(self.line_starts[-1] + len(line) + 1)
        self.state = LexState()
        self.recovering = recovering  # driven by recovery.drive, which rolls back to line starts
        self.state_before_nl = self.state.copy()
        self.diagnostics: list[Diagnostic] = []

    # -- positions

    def line_of(self, pos: int) -> int:
        return bisect.bisect_right(self.line_starts, pos)

    def span(self, line: int, col: int, end_line: int | None = None, end_col: int | None = None) -> Span:
        return Span(self.path, line, col, end_line if end_line is not None else line,
                    end_col if end_col is not None else col + 1)

    def token_span(self, tok: Token) -> Span:
        return Span(self.path, tok.line, tok.column, tok.end_line, tok.end_column)

    def eof_token(self, kind: str, value: str = "") -> Token:
        pos = len(self.text)
        line = len(self.lines)
        col = pos - self.line_starts[-1] + 1
        return Token(kind, value, pos, line, col, line, col, pos)

    # -- lines

    def is_content_line(self, line: int) -> bool:
        stripped = self.lines[line - 1].strip(" \t")
        return bool(stripped) and not stripped.startswith("#")

    def indent_of(self, line: int) -> int:
        text = self.lines[line - 1]
        return len(text) - len(text.lstrip(" \t"))

    def first_on_line(self, pos: int) -> bool:
        start = self.line_starts[self.line_of(pos) - 1]
        return self.text[start:pos].strip(" \t") == ""

    # -- diagnostics

    def error(self, span: Span | None, message: str, hint: str | None = None, *, once_per_line: bool = False) -> None:
        for d in self.diagnostics:
            if d.span is not None and span is not None and d.span.line == span.line:
                if once_per_line or (d.span.col == span.col and d.message == message):
                    return
        if len(self.diagnostics) < MAX_ERRORS:
            self.diagnostics.append(Diagnostic(message, span, hint))

    def unclosed_quote(self, line: int, col: int, quote: str) -> None:
        style = "double" if quote == '"' else "single"
        self.error(self.span(line, col), f"unterminated {style}-quoted string",
                   f"close it with {quote} on the same line; for text over several lines use '|' or '>'",
                   once_per_line=True)
