"""The surface parser: .vibee text -> document (Mapping / Sequence / Scalar, each with its Span).

The grammar lives in grammar.lark (LALR, contextual lexer). Indentation is turned into tokens by
SpecIndenter, a post-lexer: block structure is decided there, not in regular expressions. The
parse is driven token by token through Lark's interactive parser so that after a syntax error
the parser can be rolled back to the start of the offending line, the lines that belong to it
skipped, and parsing resumed: one run reports every independent error in the file.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lark import Lark, Token, Transformer, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.indenter import Indenter
from lark.parsers.lalr_analysis import Shift

from vibee.frontend.document import Mapping, Node, Scalar, Sequence, Span
from vibee.frontend.errors import Diagnostic, SpecError, register_source

GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")

# Enough to report every independent error of a realistic file, few enough to stay fast on junk.
MAX_ERRORS = 50

__all__ = ["parse_document", "parse_file", "GRAMMAR_PATH"]


# ---------------------------------------------------------------------------------------------
# Public API


def parse_file(path: str | Path) -> Mapping:
    """Read a .vibee file (UTF-8) and parse it; raises SpecError."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(Diagnostic(f"cannot read spec file: {exc.strerror or exc}")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        shown = data.decode("utf-8", errors="replace")
        register_source(name, shown)
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError.at(
            Span(name, 1, 1, 1, 2),
            f"file is not valid UTF-8: byte 0x{data[exc.start]:02x} at line {line}, column {col}",
            "save the file as UTF-8",
        ) from None
    return parse_document(text, name)


def parse_document(text: str, path: str) -> Mapping:
    """Parse spec text; the top level must be a block mapping. Raises SpecError carrying every
    diagnostic found; any other failure is reported as a SpecError too."""
    if text.startswith("\ufeff"):  # a byte order mark is not part of the first line
        text = text[1:]
    register_source(path, text)
    try:
        return _parse(text, path)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError.at(Span(path, 1, 1, 1, 2), "the document is nested too deeply") from None
    except Exception as exc:  # a bug in the parser must still read as a diagnostic, not a crash
        raise SpecError.at(
            Span(path, 1, 1, 1, 2), f"internal parser error ({type(exc).__name__}: {exc})",
            "this is a bug in vibee's parser; please report it with the spec file",
        ) from exc


# ---------------------------------------------------------------------------------------------
# Per-parse state shared by the driver, the post-lexer and the tree builder


@dataclass
class _LexState:
    """What the post-lexer knows at a point of the token stream; copied at each line start so
    the parse can be rolled back there."""

    levels: list[int] = field(default_factory=list)  # indentation of the open blocks (0-based columns)
    parens: list[Token] = field(default_factory=list)  # open '{' / '[' tokens
    started: bool = False  # a real token has been seen (leading blank/comment lines are dropped)
    after_dash: bool = False  # the previous token was '-' on the same line
    block_level: int | None = None  # inside a block scalar: its content must be indented deeper
    block_ended: bool = False  # a less indented comment line closed the block scalar
    last_was_nl: bool = False

    def copy(self) -> "_LexState":
        return _LexState(list(self.levels), list(self.parens), self.started, self.after_dash,
                         self.block_level, self.block_ended, self.last_was_nl)


class _Run:
    """One parse of one text."""

    def __init__(self, text: str, path: str):
        self.text = text
        self.path = path
        self.lines = text.split("\n")
        self.line_starts = [0]
        for line in self.lines[:-1]:
            self.line_starts.append(self.line_starts[-1] + len(line) + 1)
        self.state = _LexState()
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


# ---------------------------------------------------------------------------------------------
# Post-lexer: indentation, compact "- key:" blocks, block scalar extent, unclosed quotes


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
        self.run: _Run | None = None

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        # Called again on every resume after an error: all state lives in self.run.
        run = self.run
        assert run is not None
        for tok in stream:
            yield from self._token(run, tok)
        yield from self._end(run)

    def _token(self, run: _Run, tok: Token) -> Iterator[Token]:
        st = run.state
        kind = tok.type
        if st.block_level is not None:
            if kind == "BLOCK_TEXT":
                yield tok
                return
            if kind == "BLOCK_BLANK":
                if not st.block_ended:
                    yield tok
                return
            if kind in ("BLOCK_INDENT", "BLOCK_COMMENT_LINE"):
                body = tok.value[1:]
                width = len(body) - len(body.lstrip(" \t"))
                if not st.block_ended and width > st.block_level:
                    yield tok
                    return
                if kind == "BLOCK_COMMENT_LINE":  # a comment after the scalar, at lower indentation
                    st.block_ended = True
                    return
                st.block_level = None
                tok = Token.new_borrow_pos(self.NL_type, tok.value, tok)
                kind = tok.type
            else:
                st.block_level = None

        if kind == self.NL_type:
            if st.parens or not st.started:
                return  # line breaks inside flow collections and before the first line don't count
            yield from self._newline(run, tok)
            return

        if not st.started:
            st.started = True
            st.levels = [tok.column - 1]
            prefix = run.text[run.line_starts[tok.line - 1]:tok.start_pos]
            if "\t" in prefix:
                run.error(run.span(tok.line, prefix.index("\t") + 1), "tab character in indentation",
                          "indent with spaces")
        if st.after_dash and kind in ("KEY", "QKEY_DQ", "QKEY_SQ", "DASH"):
            # "- key: v": the mapping's block starts at the key, further keys line up under it.
            # The dash itself stands for the block's _INDENT in the grammar.
            st.levels.append(tok.column - 1)
        st.after_dash = kind == "DASH"
        st.last_was_nl = False

        if kind in self.OPEN_PAREN_types:
            st.parens.append(tok)
        elif kind in self.CLOSE_PAREN_types:
            if st.parens:
                st.parens.pop()
        elif kind in ("UNCLOSED_DQ", "UNCLOSED_SQ"):
            _report_unclosed_quote(run, tok.line, tok.column, tok.value[0])
        elif kind == "BLOCK_HEADER":
            st.block_level = st.levels[-1]
            st.block_ended = False
        yield tok

    def _newline(self, run: _Run, tok: Token) -> Iterator[Token]:
        st = run.state
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
        columns = _or_list([str(level + 1) for level in levels])
        run.error(run.span(line, col), f"bad indentation: column {indent + 1} matches no enclosing block "
                                       f"(expected column {columns})",
                  "line this up with the key or '-' it belongs under", once_per_line=True)
        for _ in range(deeper - 1):
            levels.pop()
            yield self._positioned(self.DEDENT_type, tok.end_pos, line, col)
        levels[-1] = indent

    def _end(self, run: _Run) -> Iterator[Token]:
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


def _report_unclosed_quote(run: _Run, line: int, col: int, quote: str) -> None:
    style = "double" if quote == '"' else "single"
    run.error(run.span(line, col), f"unterminated {style}-quoted string",
              f"close it with {quote} on the same line; for text over several lines use '|' or '>'",
              once_per_line=True)


# ---------------------------------------------------------------------------------------------
# The parser (built once)


@functools.lru_cache(maxsize=1)
def _parser() -> tuple[Lark, SpecIndenter, "_DocumentBuilder"]:
    indenter = SpecIndenter()
    builder = _DocumentBuilder()
    lark = Lark(
        GRAMMAR_PATH.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        postlex=indenter,
        transformer=builder,  # nodes are built as rules reduce: no parse tree, no second pass
        propagate_positions=True,
        maybe_placeholders=False,
    )
    return lark, indenter, builder


_PARSE_LOCK = threading.Lock()  # the post-lexer and builder of the shared parser hold the current run


def _parse(text: str, path: str) -> Mapping:
    # Line and column numbers don't change: "\r\n" keeps its line, a lone "\r" is a line break
    # for Python's splitlines() (which quotes lines in diagnostics) as well.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    run = _Run(text, path)
    lark, indenter, builder = _parser()
    with _PARSE_LOCK:
        indenter.run = builder.run = run
        try:
            document = _drive(lark, run)
        finally:
            indenter.run = builder.run = None
    if run.diagnostics:
        raise SpecError(sorted(run.diagnostics, key=lambda d: (d.span.line, d.span.col) if d.span else (0, 0)))
    assert isinstance(document, Mapping)
    return document


@dataclass
class _Snapshot:
    """The parser just before the line break that precedes `line`."""

    pos: int  # offset of that line break (-1: the start of the text)
    line: int
    states: list
    values: list
    lex: _LexState
    # Lark builds a left-recursive list ("pair+") by appending to the children list of the
    # partial tree on the stack; remember the lengths so a rollback can undo those appends.
    lengths: list[tuple[Tree, int]] = field(default_factory=list)

    @classmethod
    def take(cls, pos: int, line: int, ps, lex: _LexState) -> "_Snapshot":
        values = list(ps.value_stack)
        lengths = [(v, len(v.children)) for v in values if isinstance(v, Tree)]
        return cls(pos, line, list(ps.state_stack), values, lex, lengths)

    def restore(self, ps) -> None:
        ps.state_stack[:] = self.states
        ps.value_stack[:] = self.values
        for tree, length in self.lengths:
            del tree.children[length:]


def _drive(lark: Lark, run: _Run):
    """Feed tokens to the interactive parser; on an error, report it, roll back to the last line
    start before it, skip the lines that belong to the failing line and go on."""
    ip = lark.parse_interactive(run.text)
    ps = ip.parser_state
    snapshots = [_Snapshot.take(-1, 1, ps, run.state.copy())]
    last_resume = -1
    while True:
        try:
            fed = None
            for fed in ip.iter_parse():
                # The parser's state before this token: what it would have accepted instead.
                before = list(ps.state_stack)
                if fed.type == "_NL":
                    after = fed.end_line if "\n" in fed.value else fed.line
                    snapshots.append(_Snapshot.take(fed.start_pos, after, ps, run.state_before_nl))
            fed = run.eof_token("$END")
            before = list(ps.state_stack)
            return ip.feed_eof(fed)
        except UnexpectedInput as err:
            if len(run.diagnostics) >= MAX_ERRORS:
                return None
            pos = _error_pos(err, run)
            if not (isinstance(err, UnexpectedToken) and err.token is fed):
                before = list(ps.state_stack)  # the lexer failed: nothing was fed
            mixed = _report(err, pos, before, ip, run)
            indentation = isinstance(err, UnexpectedToken) and err.token.type == "_INDENT"
            resume = _roll_back(pos, ip, run, snapshots, indentation=indentation, skip_alike=mixed)
            if resume <= last_resume:
                if last_resume >= len(run.text):
                    return None  # nothing left to skip
                resume = _jump(ip, run, len(run.text))
            last_resume = resume


def _error_pos(err: UnexpectedInput, run: _Run) -> int:
    if isinstance(err, UnexpectedToken) and err.token.start_pos is not None:
        return err.token.start_pos
    pos = getattr(err, "pos_in_stream", None)
    return pos if pos is not None else len(run.text)


def _roll_back(pos: int, ip, run: _Run, snapshots: list[_Snapshot], *, indentation: bool, skip_alike: bool) -> int:
    """Restore the parser to the last line start before `pos` and move the lexer past the lines
    that belong to the failing line: up to the next line indented no deeper than it (or, for an
    unexpected indentation, no deeper than the block before it). With `skip_alike`, lines of the
    same kind ('-' items or keys) at the failing line's indentation are skipped too, so a block
    that mixes the two is reported once. Returns the offset where lexing resumes."""
    index = max(i for i, s in enumerate(snapshots) if s.pos < pos)
    snap = snapshots[index]
    del snapshots[index + 1:]
    snap.restore(ip.parser_state)
    run.state = snap.lex.copy()

    nlines = len(run.lines)
    first = next((n for n in range(snap.line, nlines + 1) if run.is_content_line(n)), None)
    own_indent = run.indent_of(first) if first is not None else 0
    bound = own_indent
    if indentation and snap.lex.started:
        bound = min(own_indent, snap.lex.levels[-1])
    err_line = run.line_of(pos) if pos < len(run.text) else nlines + 1
    # A failing first token of a later line (an unclosed bracket above it) may start the resumed part.
    start = err_line if (err_line > snap.line and pos < len(run.text) and run.first_on_line(pos)) else err_line + 1
    err_is_item = err_line <= nlines and _is_item_line(run.lines[err_line - 1])
    for n in range(start, nlines + 1):
        if not run.is_content_line(n) or run.indent_of(n) > bound:
            continue
        if skip_alike and run.indent_of(n) == own_indent and _is_item_line(run.lines[n - 1]) == err_is_item:
            continue
        return _jump(ip, run, run.line_starts[n - 1] - 1)
    return _jump(ip, run, len(run.text))


def _is_item_line(line: str) -> bool:
    stripped = line.lstrip(" \t")
    return stripped == "-" or stripped.startswith(("- ", "-\t"))


def _jump(ip, run: _Run, offset: int) -> int:
    """Move the lexer to `offset` (a line break, or the end of the text)."""
    state = ip.lexer_thread.state
    counter = state.line_ctr
    line = run.line_of(offset) if offset < len(run.text) else len(run.lines)
    counter.char_pos = offset
    counter.line = line
    counter.line_start_pos = run.line_starts[line - 1]
    counter.column = offset - counter.line_start_pos + 1
    state.last_token = None
    return offset


# ---------------------------------------------------------------------------------------------
# Error messages


_KEY_AT = re.compile(r"""(?:[\w$][\w$./-]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\n]|'')*')(?=[ \t]*:(?![^ \t\n]))""")
_UNCLOSED_AT = re.compile(r"""(?:"(?:[^"\\\n]|\\[^\n])*\\?|'(?:[^'\n]|'')*)(?:\n|$)""")
_HEADER_AT = re.compile(r"[|>][0-9+-]*[ \t]*(?:#.*)?$")

_EXPECTED_NAMES = [
    (("KEY", "QKEY_DQ", "QKEY_SQ"), "a key"),
    (("DASH",), "'-' sequence item"),
    (("PLAIN", "PLAIN_FLOW", "DQ", "SQ", "LBRACE", "LBRACKET", "BLOCK_HEADER"), "a value"),
    (("COLON",), "':'"),
    (("COMMA",), "','"),
    (("RBRACE",), "'}'"),
    (("RBRACKET",), "']'"),
    (("_NL",), "end of line"),
    (("_INDENT",), "an indented block"),
    (("_DEDENT",), "a less indented line"),
    (("$END",), "end of file"),
]


def _expected_names(expected: set[str]) -> list[str]:
    return [name for kinds, name in _EXPECTED_NAMES if expected.intersection(kinds)]


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else "one of " + _or_list(names)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_at(run: _Run, pos: int) -> tuple[str, int]:
    """What the user wrote at `pos` (for 'unexpected ...'), and how many characters it spans."""
    text = run.text
    if pos >= len(text):
        return "end of file", 0
    line = run.line_of(pos)
    rest = text[pos:run.line_starts[line - 1] + len(run.lines[line - 1])]
    if not rest:
        return "end of line", 0
    ch = rest[0]
    key = _KEY_AT.match(rest)
    if key:
        name = key.group(0)
        return (f"key {name}" if name[0] in "\"'" else f"key '{name}'"), len(name)
    if ch == "-" and (len(rest) == 1 or rest[1] in " \t"):
        return "'-' sequence item", 1
    if ch in "{}[],:":
        return f"'{ch}'", 1
    if ch in "\"'":
        end = rest.find(ch, 1)
        quoted = rest[: end + 1] if end > 0 else rest
        return f"string {_shorten(quoted)}", len(quoted)
    if ch in "|>" and _HEADER_AT.match(rest):
        return f"block scalar '{ch}'", 1
    if ch == "#":
        return "a comment", len(rest)
    value = re.split(r"[ \t]+#", rest, maxsplit=1)[0].rstrip(" \t")
    return f"value {_shorten(value)!r}", len(value)


def _acceptable(conf, stack: list) -> set[str]:
    """The tokens the parser with this state stack can really take next. (An LALR state's table
    row also lists lookaheads merged in from other contexts that fail after some reductions.)"""
    states = conf.parse_table.states
    accepted = set()
    for kind in states[stack[-1]]:
        if not (kind.isupper() or kind == "$END"):
            continue
        trial = list(stack)
        while True:
            entry = states[trial[-1]].get(kind)
            if entry is None:
                break
            action, arg = entry
            if action is Shift:
                accepted.add(kind)
                break
            if arg.expansion:
                del trial[-len(arg.expansion):]
            goto = states[trial[-1]].get(arg.origin.name)
            if goto is None:
                break
            trial.append(goto[1])
            if trial[-1] == conf.end_state:
                accepted.add(kind)
                break
    return accepted


def _report(err: UnexpectedInput, pos: int, before: list, ip, run: _Run) -> bool:
    """Describe a syntax error. `before` is the parser's state stack when it met the error.
    Returns True when the error is a block mixing '-' items and keys."""
    state = run.state
    depth = len(before)
    expected = _acceptable(ip.parser_state.parse_conf, before)
    names = _expected_names(expected)
    token = err.token if isinstance(err, UnexpectedToken) else None
    kind = token.type if token is not None else None
    at_eof = pos >= len(run.text) or kind == "$END"

    if kind in ("_NL", "_INDENT", "_DEDENT", "$END") or at_eof:
        found, width = {"_NL": ("end of line", 0), "_INDENT": ("indentation", 0),
                        "_DEDENT": ("a less indented line", 0)}.get(kind, ("end of file", 0))
        if at_eof:
            found = "end of file"
    else:
        found, width = _describe_at(run, pos)
    line = run.line_of(pos) if pos < len(run.text) else len(run.lines)
    col = pos - run.line_starts[line - 1] + 1
    span = run.span(line, col, line, col + max(width, 1))

    # An unclosed '{' / '[': the failure shows up where the next line starts (or at the end).
    if state.parens and (at_eof or (run.first_on_line(pos) and
                                    run.indent_of(line) <= run.indent_of(state.parens[-1].line))):
        opener = state.parens[-1]
        what, closer = ("flow mapping", "}") if opener.type == "LBRACE" else ("flow sequence", "]")
        where = "the end of the file" if at_eof else f"{found} at line {line}"
        run.error(run.token_span(opener), f"unterminated {what}: this '{opener.value}' is never closed",
                  f"expected ',' or '{closer}' before {where}", once_per_line=True)
        return False
    if found.startswith("string ") and _UNCLOSED_AT.match(run.text, pos):
        _report_unclosed_quote(run, line, col, run.text[pos])
        return False
    if isinstance(err, UnexpectedCharacters):
        ch = run.text[pos] if pos < len(run.text) else ""
        run.error(span, f"unexpected character {ch!r}; expected {_one_of(names)}", once_per_line=True)
        return False

    key_expected = "a key" in names
    mixed = False
    if kind == "_INDENT":
        message = f"unexpected indentation; expected {_one_of(names)}"
        hint = ("only a line ending in 'key:' or '-' can be followed by a more indented block; "
                "for text over several lines use '|' or '>'")
    elif found == "'-' sequence item" and key_expected and "'-' sequence item" not in names:
        mixed = True
        if depth <= 1:
            message = "a spec's top level must be a mapping of 'key: value' lines, found '-' sequence item"
            hint = None
        else:
            message = "a '-' sequence item can't follow keys in the same block: a block holds keys or '-' items, not both"
            hint = "indent the items under a key of their own"
    elif found.startswith("key ") and "'-' sequence item" in names and not key_expected:
        mixed = True
        message = f"{found} in a sequence: a block holds keys or '-' items, not both"
        hint = "start a new item with '- ' or indent the key under an item"
    elif key_expected and not found.startswith(("key ", "end of", "'-'")):
        message = f"found {found} where a key ('name: value') was expected; expected {_one_of(names)}"
        hint = ("keys are names made of letters, digits, '_', '-' and '.' followed by ': '; quote any other key"
                if ":" in found else "a value must follow its key on the same line, or as an indented block below it")
    else:
        message = f"unexpected {found}; expected {_one_of(names)}"
        hint = None
        if found == "':'":
            hint = "a value can't hold 'key: value'; put the pair on a line of its own, or quote the value"
        elif names == ["':'"]:
            hint = "write each entry of a flow mapping as 'key: value', with a space after ':'"
    run.error(span, message, hint, once_per_line=True)
    return mixed


# ---------------------------------------------------------------------------------------------
# Tree -> document


_INT = re.compile(r"[-+]?[0-9]+")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_OCT = re.compile(r"0o[0-7]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_NAN = re.compile(r"\.(?:nan|NaN|NAN)")
_WORDS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
          "null": None, "Null": None, "NULL": None, "~": None}

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "n": "\n", "t": "\t", "r": "\r", "0": "\0", "a": "\a",
            "b": "\b", "e": "\x1b", "f": "\f", "v": "\v", " ": " ", "\t": "\t", "N": "\x85", "_": "\xa0"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


def resolve_plain(text: str) -> str | int | float | bool | None:
    """The value of a plain (unquoted) scalar: bool, int, float or None where it looks like
    one (YAML 1.2 core schema, plus True/False), else the text."""
    if text in _WORDS:
        return _WORDS[text]
    if _INT.fullmatch(text):
        return int(text)
    if _HEX.fullmatch(text):
        return int(text[2:], 16)
    if _OCT.fullmatch(text):
        return int(text[2:], 8)
    if _FLOAT.fullmatch(text):
        return float(text)
    if _INF.fullmatch(text):
        return -math.inf if text.startswith("-") else math.inf
    if _NAN.fullmatch(text):
        return math.nan
    return text


class _Empty:
    """The value of `key:` with nothing after it (becomes a null Scalar positioned after ':')."""


_EMPTY = _Empty()


class _DocumentBuilder(Transformer):
    """Builds document nodes as the parser reduces rules (Lark's inline transformer for LALR).
    Callbacks must not mutate their children: a rollback after an error reuses them."""

    def __init__(self) -> None:
        super().__init__(visit_tokens=False)
        self.run: _Run | None = None

    # -- helpers

    def _span(self, tok: Token) -> Span:
        return self.run.token_span(tok)

    def _between(self, first: Span, last: Span) -> Span:
        return Span(self.run.path, first.line, first.col, last.end_line, last.end_col)

    def _null_after(self, tok: Token) -> Scalar:
        return Scalar(None, Span(self.run.path, tok.end_line, tok.end_column, tok.end_line, tok.end_column))

    def _mapping(self, pairs: list[tuple[Scalar, Node]], span: Span) -> Mapping:
        seen: dict[str, Scalar] = {}
        for key, _ in pairs:
            name = str(key.value)
            if name in seen:
                self.run.error(key.span, f"duplicate key '{name}' (first defined at line {seen[name].span.line})",
                               "remove one of them, or rename it")
            else:
                seen[name] = key
        return Mapping(list(pairs), span)

    # -- block collections

    def start(self, children):
        if children:
            return children[0]
        return Mapping([], Span(self.run.path, 1, 1, 1, 1))

    def block_mapping(self, pairs):
        return self._mapping(pairs, self._between(pairs[0][0].span, pairs[-1][1].span))

    def pair(self, children):
        key, colon, value = children
        if value is _EMPTY:
            value = self._null_after(colon)
        return key, value

    def empty_value(self, _children):
        return _EMPTY

    def inline_value(self, children):
        return children[0]

    nested_value = inline_value

    def block_sequence(self, items):
        span = Span(self.run.path, items[0][0].line, items[0][0].column, items[-1][1].span.end_line,
                    items[-1][1].span.end_col)
        return Sequence([node for _, node in items], span)

    def empty_item(self, children):
        dash = children[0]
        return dash, self._null_after(dash)

    def inline_item(self, children):
        return children[0], children[1]

    nested_item = inline_item

    # -- scalars

    def plain_key(self, children):
        tok = children[0]
        return Scalar(str(tok), self._span(tok))

    def dq_key(self, children):
        return self.dq(children)

    def sq_key(self, children):
        return self.sq(children)

    def plain(self, children):
        tok = children[0]
        return Scalar(resolve_plain(str(tok)), self._span(tok))

    @staticmethod
    def _quoted_body(tok: Token) -> str:
        return str(tok)[1:] if tok.type.startswith("UNCLOSED") else str(tok)[1:-1]

    def sq(self, children):
        tok = children[0]
        return Scalar(self._quoted_body(tok).replace("''", "'"), self._span(tok), quoted=True)

    def dq(self, children):
        tok = children[0]
        body = self._quoted_body(tok)
        out: list[str] = []
        i = 0
        while i < len(body):
            ch = body[i]
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            code = body[i + 1] if i + 1 < len(body) else ""
            if not code:  # a backslash that ends an unclosed string: already reported
                break
            col = tok.column + 1 + i
            if code in _ESCAPES:
                out.append(_ESCAPES[code])
                i += 2
                continue
            if code in _HEX_ESCAPES:
                digits = body[i + 2:i + 2 + _HEX_ESCAPES[code]]
                if len(digits) == _HEX_ESCAPES[code] and all(c in "0123456789abcdefABCDEF" for c in digits):
                    value = int(digits, 16)
                    if value <= 0x10FFFF:
                        out.append(chr(value))
                        i += 2 + len(digits)
                        continue
            self.run.error(self.run.span(tok.line, col, tok.line, col + 1 + len(code)),
                           f"unknown escape sequence '\\{code}' in double-quoted string",
                           "use \\\\ for a backslash, or a single-quoted string")
            out.append(code)
            i += 2
        return Scalar("".join(out), self._span(tok), quoted=True)

    def block_scalar(self, children):
        header = children[0]
        text, last = self._block_text(header, children[1:])
        end = last if last is not None else header
        return Scalar(text, Span(self.run.path, header.line, header.column, end.end_line, end.end_column), quoted=True)

    def _block_text(self, header: Token, tokens: list[Token]) -> tuple[str, Token | None]:
        indicator = str(header).split("#", 1)[0].strip(" \t")
        style, modifiers = indicator[0], indicator[1:]
        if modifiers not in ("", "-", "+"):
            self.run.error(self._span(header), f"unsupported block scalar header '{indicator}'",
                           f"use '{style}', '{style}-' (strip the final line break) or '{style}+' (keep trailing blank lines)")
        chomp = modifiers[:1] if modifiers in ("-", "+") else ""

        lines: list[tuple[str, Token]] = []  # raw line (with indentation), last token of the line
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok.type == "BLOCK_INDENT" and i + 1 < len(tokens):
                lines.append((tok.value[1:] + tokens[i + 1].value, tokens[i + 1]))
                i += 2
            else:
                lines.append((tok.value[1:], tok))
                i += 1

        content_indent = None
        body: list[str] = []
        last: Token | None = None
        for raw, tok in lines:
            stripped = raw.lstrip(" \t")
            if not stripped:
                body.append("")
                continue
            lead = len(raw) - len(stripped)
            if content_indent is None:
                content_indent = lead
            if "\t" in raw[:min(lead, content_indent)]:
                self.run.error(self.run.span(tok.line, raw.index("\t") + 1), "tab character in indentation",
                               "indent with spaces")
            if lead < content_indent:
                self.run.error(self.run.span(tok.line, lead + 1),
                               f"this line of the block scalar is less indented than its first line "
                               f"(column {content_indent + 1})", "indent every line of the text at least as much as the first")
                body.append(stripped)
            else:
                body.append(raw[content_indent:])
            last = tok

        trailing = 0
        while body and body[-1] == "":
            body.pop()
            trailing += 1
        text = "\n".join(body) if style == "|" else _fold(body)
        if not body:
            return ("\n" * trailing if chomp == "+" else ""), last
        if chomp == "-":
            return text, last
        if chomp == "+":
            return text + "\n" * (trailing + 1), last
        return text + "\n", last

    # -- flow collections

    def flow_mapping(self, children):
        pairs = [c for c in children if isinstance(c, tuple)]
        return self._mapping(pairs, self._between(self._span(children[0]), self._span(children[-1])))

    def flow_pair(self, children):
        key, colon = children[0], children[1]
        value = children[2] if len(children) > 2 else self._null_after(colon)
        return key, value

    def flow_sequence(self, children):
        items = [c for c in children if not isinstance(c, Token)]
        return Sequence(items, self._between(self._span(children[0]), self._span(children[-1])))


def _fold(lines: list[str]) -> str:
    """YAML folding of '>' text: a single line break between two plain lines becomes a space,
    n blank lines become n line breaks, and lines indented deeper than the text keep theirs."""
    out: list[str] = []
    previous: str | None = None
    blanks = 0
    for line in lines:
        if line == "":
            blanks += 1
            continue
        if previous is None:
            out.append("\n" * blanks)
        elif previous[0] in " \t" or line[0] in " \t":
            out.append("\n" * (blanks + 1))
        else:
            out.append("\n" * blanks if blanks else " ")
        out.append(line)
        previous = line
        blanks = 0
    return "".join(out)
