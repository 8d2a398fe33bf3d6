"""The surface parser's front door: .vibee text -> document (Mapping / Sequence / Scalar, each
with its Span), or a SpecError carrying every diagnostic found.

The grammar lives in grammar.lark (LALR, contextual lexer); indenter.py turns indentation into
tokens, builder.py builds the document as rules reduce, recovery.py resumes after syntax errors
and syntax_errors.py words them.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from lark import Lark
from lark.exceptions import UnexpectedInput

from vibee.frontend.builder import DocumentBuilder
from vibee.frontend.document import Mapping, Span
from vibee.frontend.errors import Diagnostic, SpecError, register_source
from vibee.frontend.indenter import SpecIndenter
from vibee.frontend.lalr_loop import LALRLoop
from vibee.frontend.recovery import drive
from vibee.frontend.source import ParseRun

GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")

__all__ = ["parse_document", "parse_file", "GRAMMAR_PATH"]


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
        raise _not_utf8(name, data, exc) from None
    return parse_document(text, name)


def _not_utf8(name: str, data: bytes, exc: UnicodeDecodeError) -> SpecError:
    """The error for the first byte that isn't UTF-8, at its line and column (in characters:
    everything before it decodes)."""
    before = data[:exc.start].decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    line = before.count("\n") + 1
    col = len(before) - before.rfind("\n")
    register_source(name, data.decode("utf-8", errors="replace"))
    return SpecError.at(Span(name, line, col, line, col + 1),
                        f"file is not valid UTF-8: byte 0x{data[exc.start]:02x} ({exc.reason})",
                        "save the file as UTF-8")


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


@functools.lru_cache(maxsize=1)
def _parser() -> tuple[Lark, LALRLoop, SpecIndenter, DocumentBuilder]:
    indenter = SpecIndenter()
    builder = DocumentBuilder()
    lark = Lark(
        GRAMMAR_PATH.read_text(encoding="utf-8"),
        parser="lalr",
        lexer="contextual",
        postlex=indenter,
        transformer=builder,  # nodes are built as rules reduce: no parse tree, no second pass
        maybe_placeholders=False,
    )
    return lark, LALRLoop(lark), indenter, builder


_PARSE_LOCK = threading.Lock()  # the post-lexer and builder of the shared parser hold the current run


def _parse(text: str, path: str) -> Mapping:
    # Line and column numbers don't change: "\r\n" keeps its line, a lone "\r" is a line break
    # for Python's splitlines() (which quotes lines in diagnostics) as well.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lark, loop, indenter, builder = _parser()
    with _PARSE_LOCK:
        try:
            # Most texts parse: try the plain LALR loop first, and only drive the parse line by
            # line (slower: it snapshots the parser at every line start) to recover from errors.
            run = indenter.run = builder.run = ParseRun(text, path)
            try:
                document = loop.parse(text)
            except UnexpectedInput:
                run = indenter.run = builder.run = ParseRun(text, path, recovering=True)
                document = drive(lark, run)
        finally:
            indenter.run = builder.run = None
    if run.diagnostics:
        raise SpecError(sorted(run.diagnostics, key=lambda d: (d.span.line, d.span.col) if d.span else (0, 0)))
    assert isinstance(document, Mapping)
    return document
