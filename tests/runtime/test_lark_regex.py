"""Lark grammars whose language is regular as one regex (vibee/runtime/lark_regex.py), recursion at
one end of a rule's alternatives and %ignore included: the regex accepts exactly the strings Lark's own Earley
parser accepts (every string up to a length over the grammar's characters), and what a regex can't
say is left to llguidance (None)."""

from __future__ import annotations

import re

import pytest

from tests.runtime.lark_oracle import parses, strings
from vibee.runtime.lark_regex import lark_regex

REGULAR = [
    ('start: "yes" | "no"', "yesno"),
    ('start: greeting ("," NAME)* "!"?\ngreeting: "hi" | "h" [" x"]\nNAME: /[a-b]+/', "hi,ab! x"),
    ('start: item~2..3 "."?\n?item: DIGIT | "-"\nDIGIT: "0".."2"', "0129-."),
    ('start: pair -> both\npair: A B | B\nA: "a"+\nB: "b" "b"?', "ab"),
    ('start: ("a" | "aa") "ab"', "ab"),  # terminals overlap: the grammar's language, as Earley reads it
    # recursion at the end of a rule (x: a x | b is a* b), at its start (x: x a | b is b a*), through others
    ('start: "x" start | "y"', "xy"),
    ('start: expr\nexpr: expr OP NUM | NUM\nOP: "+" | "-"\nNUM: "1".."2"', "12+-"),
    ('start: a\na: "x" b?\nb: "y" a', "xy"),
    ('start: "[" [items] "]"\nitems: "1" | "1" "," items', "[],1"),
    ('start: line "."\nline: word (" " line)?\nword: "a" | "b"', "ab ."),  # at the end of an optional group
    ('start: start "a" | "b" start | "c"', "abc"),  # at the start of one alternative, the end of another: b* c a*
    # %ignore: its text before any token of a rule and after the last, never inside a terminal
    ('start: WORD+\nWORD: /[a-b]+/\n%ignore " "', "ab "),
    ('start: NUM ("+" NUM)*\nNUM: DIGIT DIGIT?\nDIGIT: "1".."2"\n%ignore " "', "12+ "),
    ('start: "x" start | "y"\n%ignore " "\n%ignore "-"', "xy -"),
    # case-insensitive literals, alone or among others (Lark writes the flag inline: (?i:...))
    ('start: "Hi"i', "hHiI"),
    ('start: "Hi"i "!"? /[a]/i', "hHiIaA!"),
]


@pytest.mark.parametrize("grammar,alphabet", REGULAR)
def test_the_regex_accepts_what_lark_parses(grammar, alphabet):
    import lark

    parser = lark.Lark(grammar, parser="earley", lexer="dynamic")
    pattern = lark_regex(grammar)
    assert pattern is not None
    accepted = 0
    for text in strings(alphabet, 5 if len(set(alphabet)) <= 4 else 4):
        parsed = parses(parser, text) is not None
        assert (re.fullmatch(pattern, text) is not None) == parsed, (grammar, text)
        accepted += parsed
    assert accepted  # the comparison saw strings of the language, not only refusals


@pytest.mark.parametrize("grammar", [
    'start: "(" start ")" | "x"',  # a rule inside itself (balanced brackets: not a regular language)
    'start: a\na: "(" b ")" | "x"\nb: a a?',  # the same through another rule
    'start: "x" start',  # recursion that never ends: no string at all
    'start: ("x" start)+ | "y"',  # recursion inside a repetition
    'start: start "a" start | "b"',  # at both ends of one alternative
    'start: line+\nline: word (" " line)? "."\nword: "a"',  # as many dots as words: not regular
    'start: /a.b/s',  # a flag other than case-insensitive
    'start: %json {"type": "object"}',  # llguidance's extension
    'start: undefined_rule',
    'not a grammar',
    'start: X\n%import nowhere.X',  # a grammar file Lark can't find (llguidance refuses it too)
])
def test_what_a_regex_does_not_say_the_same_way_has_none(grammar):
    assert lark_regex(grammar) is None


@pytest.mark.parametrize("imported", ["ESCAPED_STRING", "ESCAPED_STRING -> TEXT"])
def test_larks_escaped_string_is_a_json_string(imported):
    """common.ESCAPED_STRING ends in a lookbehind no DFA has: it is read as a JSON string (no unescaped
    quote or newline inside, a backslash escapes one character), under any name it is imported as."""
    name = imported.split()[-1]
    pattern = lark_regex(f"start: {name}\n%import common.{imported}\n")
    assert pattern is not None
    json_string = re.compile(r'"(?:[^"\\\n]|\\.)*"')
    kept = 0
    for text in strings('"\\a\n', 6):
        assert (re.fullmatch(pattern, text) is not None) == (json_string.fullmatch(text) is not None), text
        kept += json_string.fullmatch(text) is not None
    assert kept > 10 and re.fullmatch(pattern, '"a\\"b"') and not re.fullmatch(pattern, '"a"b"')
