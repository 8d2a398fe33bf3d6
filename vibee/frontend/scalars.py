"""Scalar values: plain scalars resolved to bool/int/float/None (YAML 1.2 core schema, plus
True/False), double-quoted escapes decoded, and the text of '|' / '>' block scalars (indentation
stripped, '>' folded, chomping applied). Problems go to a `report(line, col, end_col, message,
hint)` callback so that the builder can position them and go on."""

from __future__ import annotations

import math
import re
from typing import Callable

from lark import Token

Report = Callable[[int, int, int, str, str], None]

_INT = re.compile(r"[-+]?[0-9]+")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_OCT = re.compile(r"0o[0-7]+")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_INF = re.compile(r"[-+]?\.(?:inf|Inf|INF)")
_NAN = re.compile(r"\.(?:nan|NaN|NAN)")
_WORDS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
          "null": None, "Null": None, "NULL": None, "~": None}
# Only these can start a number: every other plain scalar is text without trying the patterns.
_NUMBER_START = frozenset("0123456789+-.")

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "n": "\n", "t": "\t", "r": "\r", "0": "\0", "a": "\a",
            "b": "\b", "e": "\x1b", "f": "\f", "v": "\v", " ": " ", "\t": "\t", "N": "\x85", "_": "\xa0"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def resolve_plain(text: str) -> str | int | float | bool | None:
    """The value of a plain (unquoted) scalar: bool, int, float or None where it looks like
    one, else the text."""
    if text in _WORDS:
        return _WORDS[text]
    if text[0] not in _NUMBER_START:
        return text
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


def double_quoted(tok: Token, body: str, report: Report) -> str:
    """Decode the escapes of a double-quoted scalar's `body` (the text between the quotes)."""
    if "\\" not in body:
        return body
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
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
            continue
        if code in _HEX_ESCAPES:
            digits = body[i + 2:i + 2 + _HEX_ESCAPES[code]]
            if len(digits) == _HEX_ESCAPES[code] and all(c in _HEX_DIGITS for c in digits):
                value = int(digits, 16)
                if value <= 0x10FFFF:
                    out.append(chr(value))
                    i += 2 + len(digits)
                    continue
        col = tok.column + 1 + i
        report(tok.line, col, col + 1 + len(code), f"unknown escape sequence '\\{code}' in double-quoted string",
               "use \\\\ for a backslash, or a single-quoted string")
        out.append(code)
        i += 2
    return "".join(out)


def block_scalar_text(header: Token, tokens: list[Token], report: Report) -> tuple[str, Token | None]:
    """The value of a block scalar from its header ('|', '>-', ...) and its line tokens, and the
    last token that holds text (for the scalar's span)."""
    indicator = str(header).split("#", 1)[0].strip(" \t")
    style, modifiers = indicator[0], indicator[1:]
    if modifiers not in ("", "-", "+"):
        report(header.line, header.column, header.end_column, f"unsupported block scalar header '{indicator}'",
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
            col = raw.index("\t") + 1
            report(tok.line, col, col + 1, "tab character in indentation", "indent with spaces")
        if lead < content_indent:
            report(tok.line, lead + 1, lead + 2, f"this line of the block scalar is less indented than its first "
                   f"line (column {content_indent + 1})", "indent every line of the text at least as much as the first")
            body.append(stripped)
        else:
            body.append(raw[content_indent:])
        last = tok

    trailing = 0
    while body and body[-1] == "":
        body.pop()
        trailing += 1
    if not body:
        return ("\n" * trailing if chomp == "+" else ""), last
    text = "\n".join(body) if style == "|" else fold(body)
    if chomp == "-":
        return text, last
    if chomp == "+":
        return text + "\n" * (trailing + 1), last
    return text + "\n", last


def fold(lines: list[str]) -> str:
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
