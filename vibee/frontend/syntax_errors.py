"""Syntax error messages: what the user wrote at the failing place, what the parser could have
taken there (in words, not token names), and a hint for the common mistakes."""

from __future__ import annotations

import re

from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.parsers.lalr_analysis import Shift

from vibee.frontend.errors import or_list
from vibee.frontend.source import ParseRun

# The same keys as KEY / QKEY_DQ / QKEY_SQ in grammar.lark.
_KEY_AT = re.compile(r"""(?:(?:[^ \t\n#'"\[\]{},&*!|>%@`?:-]|[?:-](?=[^ \t\n]))(?:[^ \t\n:]|:(?=[^ \t\n])|[ \t]+(?=[^ \t\n#:]))*"""
                     r"""|"(?:[^"\\\n]|\\.)*"|'(?:[^'\n]|'')*')(?=[ \t]*:(?![^ \t\n]))""")
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


def _one_of(names: list[str]) -> str:
    return names[0] if len(names) == 1 else "one of " + or_list(names)


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_at(run: ParseRun, pos: int) -> tuple[str, int]:
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


def report_syntax_error(err: UnexpectedInput, pos: int, before: list, ip, run: ParseRun) -> bool:
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
        run.unclosed_quote(line, col, run.text[pos])
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
        hint = ("a key is text followed by ': '; quote a key that starts with one of & * ! | > % @ ` [ ] { } # , ? :"
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
