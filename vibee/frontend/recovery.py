"""Error recovery: the parse is driven token by token through Lark's interactive parser so that
after a syntax error the parser can be rolled back to the start of the offending line, the lines
that belong to it skipped, and parsing resumed: one run reports every independent error."""

from __future__ import annotations

from dataclasses import dataclass, field

from lark import Lark, Tree
from lark.exceptions import UnexpectedInput, UnexpectedToken

from vibee.frontend.source import MAX_ERRORS, LexState, ParseRun
from vibee.frontend.syntax_errors import report_syntax_error


@dataclass
class _Snapshot:
    """The parser just before the line break that precedes `line`."""

    pos: int  # offset of that line break (-1: the start of the text)
    line: int
    states: list
    values: list
    lex: LexState
    # Lark builds a left-recursive list ("pair+") by appending to the children list of the
    # partial tree on the stack; remember the lengths so a rollback can undo those appends.
    lengths: list[tuple[Tree, int]] = field(default_factory=list)

    @classmethod
    def take(cls, pos: int, line: int, ps, lex: LexState) -> "_Snapshot":
        values = list(ps.value_stack)
        lengths = [(v, len(v.children)) for v in values if isinstance(v, Tree)]
        return cls(pos, line, list(ps.state_stack), values, lex, lengths)

    def restore(self, ps) -> None:
        ps.state_stack[:] = self.states
        ps.value_stack[:] = self.values
        for tree, length in self.lengths:
            del tree.children[length:]


def drive(lark: Lark, run: ParseRun):
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
            mixed = report_syntax_error(err, pos, before, ip, run)
            indentation = isinstance(err, UnexpectedToken) and err.token.type == "_INDENT"
            resume = _roll_back(pos, ip, run, snapshots, indentation=indentation, skip_alike=mixed)
            if resume <= last_resume:
                if last_resume >= len(run.text):
                    return None  # nothing left to skip
                resume = _jump(ip, run, len(run.text))
            last_resume = resume


def _error_pos(err: UnexpectedInput, run: ParseRun) -> int:
    if isinstance(err, UnexpectedToken) and err.token.start_pos is not None:
        return err.token.start_pos
    pos = getattr(err, "pos_in_stream", None)
    return pos if pos is not None else len(run.text)


def _roll_back(pos: int, ip, run: ParseRun, snapshots: list[_Snapshot], *, indentation: bool, skip_alike: bool) -> int:
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


def _jump(ip, run: ParseRun, offset: int) -> int:
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
