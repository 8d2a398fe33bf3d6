"""Lark grammars whose rules nest inside themselves, as the device decodes them
(vibee/runtime/lark_regex.py: lark_pattern, lark_fsm): the grammar's language up to a nesting depth,
exactly. The oracle is Lark's own Earley parser: every string up to a length over the grammar's
characters is accepted by the DFA exactly when Earley parses it and its parse tree nests the rule at
most `nesting` deep (a rule inside itself once is depth 1)."""

from __future__ import annotations

import lark
import pytest

from tests.runtime.lark_oracle import parses, strings
from vibee.runtime import lark_regex
from vibee.runtime.lark_regex import NESTED_LARK, NESTING, lark_fsm, lark_pattern, lark_regex as regex_of

# (grammar, the characters to build strings of, the rule whose nesting is bounded, nesting, longest string)
NESTED = [
    ('start: "(" start ")" | "x"', "()x", "start", 2, 7),
    ('start: value\nvalue: "[" [value ("," value)*] "]" | "1"', "[],1", "value", 1, 6),
    ('start: a\na: "(" a ("," a)? ")" | "x"', "(),x", "a", 1, 6),  # named twice a level
    ('start: expr\nexpr: term ("+" term)*\nterm: "1" | "(" expr ")"', "()+1", "expr", 1, 7),  # through another rule
    ('start: "(" start ")" | "x"\n%ignore " "', "() x", "start", 1, 6),  # %ignore'd text inside the brackets too
    ('start: ("x" start)+ | "y"', "xy", "start", 2, 8),  # inside a repetition
    ('start: line+\nline: word (" " line)? "."\nword: "a"', "a .", "line", 1, 8),  # as many dots as words
]


def _depth(tree: lark.Tree, rule: str) -> int:
    """How deep `rule` nests inside itself in a parse forest (Lark's `ambiguity="explicit"`): the
    most nodes of it on a path from the root, less one (0: none inside another), in the parse where
    that is least."""
    def most(node: lark.Tree) -> int:
        below = [most(c) for c in node.children if isinstance(c, lark.Tree)]
        if node.data == "_ambig":
            return min(below)
        return (node.data == rule) + max(below, default=0)
    return most(tree) - 1


def _accepts(fsm, text: str) -> bool:
    return fsm.accepts(text)


@pytest.mark.parametrize("grammar,alphabet,rule,nesting,longest", NESTED)
def test_the_dfa_is_the_grammar_nested_up_to_its_depth(grammar, alphabet, rule, nesting, longest):
    parser = lark.Lark(grammar, parser="earley", lexer="dynamic", ambiguity="explicit")
    assert lark_regex.lark_regex(grammar) is None  # not regular: no regex, a DFA up to a depth
    assert lark_pattern(grammar) == (NESTED_LARK, grammar)
    fsm = lark_fsm(grammar, nesting)
    assert fsm is not None
    kept = refused = 0
    for text in strings(alphabet, longest):
        tree = parses(parser, text)
        depth = None if tree is None else _depth(tree, rule)
        expected = depth is not None and depth <= nesting
        assert _accepts(fsm, text) == expected, (grammar, text, depth)
        kept += expected
        refused += depth is not None and not expected
    assert kept and refused  # the strings seen nest both within the depth and past it


@pytest.mark.parametrize("grammar,alphabet", [
    ('start: start "a" start | "b"', "ab"),  # at both ends of one alternative: b(ab)*, regular after all
    ('start: "(" items ")"\nitems: "x" | "x" "," items', "(),x"),  # recursion at one end only: a regex, as before
])
def test_recursion_that_needs_no_depth_gives_the_whole_language(grammar, alphabet):
    parser = lark.Lark(grammar, parser="earley", lexer="dynamic")
    fsm = lark_fsm(grammar, 1)
    for text in strings(alphabet, 6):
        assert _accepts(fsm, text) == (parses(parser, text) is not None), (grammar, text)


def test_the_device_nests_sixteen_deep_and_no_deeper():
    grammar = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/'
    fsm = lark_fsm(grammar)
    assert NESTING == 16
    assert _accepts(fsm, "(" * 16 + "1+2" + ")" * 16)
    assert not _accepts(fsm, "(" * 17 + "1" + ")" * 17)
    assert _accepts(fsm, "(1)+" * 40 + "2")  # side by side is not nesting
    # one bracket type: a few states a level (the DFA counts the open brackets)
    assert len(fsm.states) < 10 * NESTING


def test_a_grammar_whose_levels_outgrow_the_cap_is_left_to_llguidance(monkeypatch):
    """Two bracket types multiply the states at each level: past MAX_NESTED_STATES, no DFA (the
    host's llguidance takes the grammar, at any depth)."""
    grammar = 'start: v\nv: "[" [v ("," v)*] "]" | "{" [v ("," v)*] "}" | "1"'
    assert lark_fsm(grammar, 3) is not None
    monkeypatch.setattr(lark_regex, "MAX_NESTED_STATES", 40)
    assert lark_fsm(grammar, 3) is None
    assert lark_pattern(grammar) == (NESTED_LARK, grammar)  # cheap to tell; the DFA is built on the compile thread


@pytest.mark.parametrize("grammar", [
    'start: "x" start',  # never ends
    'start: %json {"type": "object"}',  # llguidance's extension
    'not a grammar',
])
def test_what_has_no_dfa_at_any_depth_has_no_pattern(grammar):
    assert lark_pattern(grammar) is None
    assert lark_fsm(grammar) is None


def test_a_regular_grammar_keeps_its_regex():
    grammar = 'start: "[" items "]"\nitems: NUMBER | NUMBER "," items\nNUMBER: /[0-9]{1,2}/'
    assert lark_pattern(grammar) == regex_of(grammar) is not None


def test_the_engine_loop_asks_once_per_grammar_and_never_unrolls_it(monkeypatch):
    """The engine asks lark_pattern on its loop for each request: one level of nesting tells that a
    grammar nests, the answer is kept per grammar text, and the 16 levels are built by lark_fsm on
    the compile thread (building them here took 100 ms a request on the loop: 1.7x slower decoding
    in `bench throughput --structured-output lark_expr` on a CPU)."""
    depths = []
    start = lark_regex._start
    monkeypatch.setattr(lark_regex, "_start", lambda text, nesting: depths.append(nesting) or start(text, nesting))
    grammar = 'start: "(" start ")" | "y" | "z"'  # a text no other test asks about (the answers are kept)
    assert lark_pattern(grammar) == lark_pattern(grammar) == (NESTED_LARK, grammar)
    assert depths == [1]


def test_a_grammar_text_past_the_limit_stays_with_llguidance(monkeypatch):
    """The engine parses a grammar's text on its loop and keeps it as a key: a text past
    MAX_LARK_CHARS (a request body may hold 16 MB) goes to llguidance unread."""
    grammar = 'start: "(" start ")" | "w"\n'
    padded = grammar + "// " + "c" * lark_regex.MAX_LARK_CHARS + "\n"
    read = []
    start = lark_regex._start
    monkeypatch.setattr(lark_regex, "_start", lambda text, nesting: read.append(len(text)) or start(text, nesting))
    assert lark_pattern(padded) is None and read == []
    assert lark_pattern(grammar) == (NESTED_LARK, grammar) and read == [len(grammar)]


def test_a_lookaround_interegular_cannot_read_has_no_dfa():
    """interegular has no FSM of a lookaround: no DFA (llguidance takes the grammar), not an exception."""
    assert lark_fsm('start: "(" start ")" | /(?<=x)y/') is None
