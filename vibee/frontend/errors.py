"""Diagnostics that read like a compiler's: ``path:line:col: error: message``, the source line,
a caret under the offending text, and a hint ("did you mean 'block_size'?")."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Literal

from vibee.frontend.document import Span

# Source texts by path, filled by the parser, so a diagnostic can quote the offending line.
_SOURCES: dict[str, str] = {}


def register_source(path: str, text: str) -> None:
    _SOURCES[path] = text


def source_line(path: str, line: int) -> str | None:
    text = _SOURCES.get(path)
    if text is None:
        return None
    lines = text.splitlines()
    if 1 <= line <= len(lines):
        return lines[line - 1]
    return None


@dataclass
class Diagnostic:
    message: str
    span: Span | None = None
    hint: str | None = None
    severity: Literal["error", "warning"] = "error"

    def render(self) -> str:
        where = f"{self.span}: " if self.span else ""
        out = [f"{where}{self.severity}: {self.message}"]
        if self.span is not None:
            text = source_line(self.span.path, self.span.line)
            if text is not None:
                gutter = f"{self.span.line:>5} | "
                out.append(gutter + text.rstrip("\n"))
                start = max(self.span.col, 1)
                if self.span.end_line == self.span.line and self.span.end_col > start:
                    width = self.span.end_col - start
                else:
                    width = 1
                width = max(1, min(width, len(text) - start + 2))
                prefix = "".join(c if c == "\t" else " " for c in text[: start - 1])
                out.append(" " * (len(gutter) - 2) + "| " + prefix + "^" * width)
        if self.hint:
            out.append(f"  help: {self.hint}")
        return "\n".join(out)


class SpecError(Exception):
    """One or more errors in a user's spec. Carries every diagnostic the stage could find."""

    def __init__(self, diagnostics: Iterable[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    @classmethod
    def at(cls, span: Span | None, message: str, hint: str | None = None) -> "SpecError":
        return cls([Diagnostic(message, span, hint)])

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A hint naming the closest candidate, or None when nothing is close."""
    matches = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{matches[0]}'?" if matches else None


def or_list(items: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def one_of(candidates: Iterable[str]) -> str:
    return "expected one of: " + ", ".join(sorted(candidates))
