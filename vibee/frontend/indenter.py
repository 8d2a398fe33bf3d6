"""The post-lexer: line starts become _NL / _INDENT / _DEDENT tokens (Python style), and the
block structure the regular expressions of grammar.lark can't see is decided here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from lark import Token
from lark.indenter import Indenter

from vibee.frontend.errors import or_list
from vibee.frontend.source import LexState

if TYPE_CHECKING:
    from vibee.frontend.source import ParseRun


_OPENS_BLOCK_AFTER_DASH = frozenset(("KEY", "QKEY_DQ", "QKEY_SQ", "DASH"))
_SPECIAL = frozenset(("LBRACE", "LBRACKET", "RBRACE", "RBRACKET", "BLOCK_HEADER", "UNCLOSED_DQ", "UNCLOSED_SQ",
                      "PLAIN"))


def _check_continuation(run: ParseRun, st: LexState, tok: Token) -> None:
    """A plain scalar over several lines: each further line must be indented deeper than the
    block that holds the scalar (the key's or '-''s column; for a scalar that starts on its own
    line below its key, the key's)."""
    if tok.line == tok.end_line:
        return
    levels = st.levels
    parent = levels[-2] if run.first_on_line(tok.start_pos) and len(levels) > 1 else levels[-1]
    for line in range(tok.line + 1, tok.end_line + 1):
        indent = run.indent_of(line)
        if indent <= parent:
            text = run.lines[line - 1].strip(" \t")
            run.error(run.span(line, indent + 1, line, indent + 1 + len(text)),
                      f"found value {text!r} where a key ('name: value') was expected",
                      f"to go on with the value above, indent this line deeper than its key (column {parent + 1})",
                      once_per_line=True)


class SpecIndenter(Indenter):
    """Turns line starts into _NL, _INDENT and _DEDENT (Python style) and records diagnostics
    instead of raising, so parsing can go on after bad indentation.

    Beyond lark's Indenter:
      - "- key: v" / "- - v": a collection that starts on a dash's line opens a virtual block at
        the column of its first token, so the following lines of that item line up under it;
      - block scalars: a line after "|" / ">" belongs to the scalar while it is blank or indented
        deeper than the block holding the key; the first line that is not ends the scalar and
        becomes an ordinary line break;
      - a quote that is not closed on its line is reported at the quote and read as closed there;
      - tabs in indentation are reported (and counted as one column, to keep going).
    """

    NL_type = "_NL"
    OPEN_PAREN_types = ("LBRACE", "LBRACKET")
    CLOSE_PAREN_types = ("RBRACE", "RBRACKET")
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 1
    always_accept = ("_NL",)

    def __init__(self) -> None:
        super().__init__()
        self.run: ParseRun | None = None

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        # Called again on every resume after an error: all state lives in self.run. One loop
        # with `continue` rather than a generator per token: this runs for every token.
        run = self.run
        assert run is not None
        st = run.state
        for tok in stream:
            kind = tok.type
            if st.block_level is not None:
                if kind == "BLOCK_TEXT":
                    yield tok
                    continue
                if kind == "BLOCK_BLANK":
                    if not st.block_ended:
                        yield tok
                    continue
                if kind in ("BLOCK_INDENT", "BLOCK_COMMENT_LINE"):
                    body = tok.value[1:]
                    width = len(body) - len(body.lstrip(" \t"))
                    if not st.block_ended and width > st.block_level:
                        yield tok
                        continue
                    if kind == "BLOCK_COMMENT_LINE":  # a comment after the scalar, at lower indentation
                        st.block_ended = True
                        continue
                    st.block_level = None
                    tok = Token.new_borrow_pos("_NL", tok.value, tok)
                    kind = "_NL"
                else:
                    st.block_level = None

            if kind == "_NL":
                if st.parens or not st.started:
                    continue  # line breaks inside flow collections and before the first line don't count
                yield from self._newline(run, tok)
                continue

            if not st.started:
                st.started = True
                st.levels = [tok.column - 1]
                prefix = run.text[run.line_starts[tok.line - 1]:tok.start_pos]
                if "\t" in prefix:
                    run.error(run.span(tok.line, prefix.index("\t") + 1), "tab character in indentation",
                              "indent with spaces")
            if st.after_dash and kind in _OPENS_BLOCK_AFTER_DASH:
                # "- key: v": the mapping's block starts at the key, further keys line up under it.
                # The dash itself stands for the block's _INDENT in the grammar.
                st.levels.append(tok.column - 1)
            st.after_dash = kind == "DASH"
            st.last_was_nl = False

            if kind in _SPECIAL:
                if kind == "LBRACE" or kind == "LBRACKET":
                    st.parens.append(tok)
                elif kind == "RBRACE" or kind == "RBRACKET":
                    if st.parens:
                        st.parens.pop()
                elif kind == "BLOCK_HEADER":
                    # The text must be indented deeper than the key: for "key:\n  |" the key's
                    # block is the one below the header's own.
                    own_line = run.first_on_line(tok.start_pos) and len(st.levels) > 1
                    st.block_level = st.levels[-2] if own_line else st.levels[-1]
                    st.block_ended = False
                elif kind == "PLAIN":
                    _check_continuation(run, st, tok)
                else:
                    run.unclosed_quote(tok.line, tok.column, tok.value[0])
            yield tok
        yield from self._end(run)

    def _newline(self, run: ParseRun, tok: Token) -> Iterator[Token]:
        st = run.state
        if run.recovering:  # the recovery driver snapshots the parser at each line start
            run.state_before_nl = st.copy()
        st.after_dash = False
        st.last_was_nl = True
        yield tok
        cut = tok.value.rfind("\n")
        if cut < 0 or tok.end_pos >= len(run.text):
            return  # the text ends here: _end closes the blocks
        indent_str = tok.value[cut + 1:]
        line, col = tok.end_line, tok.end_column
        if "\t" in indent_str:
            run.error(run.span(line, indent_str.index("\t") + 1), "tab character in indentation", "indent with spaces")
        indent = len(indent_str)
        levels = st.levels
        if indent > levels[-1]:
            levels.append(indent)
            yield self._positioned(self.INDENT_type, tok.end_pos, line, col)
            return
        deeper = sum(1 for level in levels if level > indent)
        if deeper < len(levels) and levels[-deeper - 1] == indent:
            for _ in range(deeper):
                levels.pop()
                yield self._positioned(self.DEDENT_type, tok.end_pos, line, col)
            return
        # The line lines up with no open block. Treat it as part of the innermost block it is
        # less indented than, so that its siblings parse without further errors.
        columns = or_list([str(level + 1) for level in levels])
        run.error(run.span(line, col), f"bad indentation: column {indent + 1} matches no enclosing block "
                                       f"(expected column {columns})",
                  "line this up with the key or '-' it belongs under", once_per_line=True)
        for _ in range(deeper - 1):
            levels.pop()
            yield self._positioned(self.DEDENT_type, tok.end_pos, line, col)
        levels[-1] = indent

    def _end(self, run: ParseRun) -> Iterator[Token]:
        st = run.state
        st.block_level = None
        if not st.started or st.parens:
            return  # an unclosed '{' / '[' is reported by the parser at the end of the text
        if not st.last_was_nl:
            run.state_before_nl = st.copy()
            st.last_was_nl = True
            yield run.eof_token(self.NL_type)
        while len(st.levels) > 1:
            st.levels.pop()
            yield run.eof_token(self.DEDENT_type)

    @staticmethod
    def _positioned(kind: str, pos: int, line: int, col: int) -> Token:
        return Token(kind, "", pos, line, col, line, col, pos)
