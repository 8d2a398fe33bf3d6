"""Lark grammars with several recursive rules or bracket types as a recursive transition network
(lark_rtn.py): the greedy run of a grammar without conflicts accepts exactly what Lark's Earley
parser parses, on every short string over the grammar's characters; grammars where the greedy run
would go wrong are named by their conflicts."""

from __future__ import annotations

import pytest

from tests.runtime.lark_oracle import parses, strings
from vibee.runtime.lark_rtn import lark_rtn

JSONISH = r'''
start: value
value: "[" [value ("," value)*] "]" | "{" [pair ("," pair)*] "}" | NUMBER
pair: "k" ":" value
NUMBER: /[0-9]+/
'''
CALLS = r'''
start: expr
expr: term ("+" term)*
term: NUM | NAME "(" [expr ("," expr)*] ")" | "(" expr ")" | "[" [expr ("," expr)*] "]"
NUM: /[0-9]/
NAME: "f"
'''
SPACED = r'''
start: expr
expr: term ("+" term)*
term: NUM | "(" expr ")" | "[" [expr ("," expr)*] "]"
NUM: /[0-9]/
%ignore " "
'''
REGULAR = 'start: "a" "b"* "c"\n'
# Left recursion, as Lark's documentation writes lists and sums: solved as a repetition in the machine.
LEFT_LIST = '''
start: value
value: "[" [elements] "]" | "{" [elements] "}" | NUMBER
elements: elements "," value | value
NUMBER: /[0-9]/
'''
CALC = '''
?start: sum
?sum: product | sum "+" product | sum "-" product
?product: atom | product "*" atom
?atom: NUMBER | "-" atom | "(" sum ")" | "[" sum "]"
NUMBER: /[0-9]/
'''
# Wildcards (a negated class, a dot, \S) beside calls: they must not take a call as a character.
WILDCARDS = r'''
start: value
value: "[" [value ("," value)*] "]" | STRING | "<" /\S/ ">" | "(" /./ ")"
STRING: /"[^"]*"/
'''


@pytest.mark.parametrize("grammar, alphabet, longest", [
    (JSONISH, "[]{},k:1", 5),
    (CALLS, "f(),[]+1", 5),
    (SPACED, "()[], +1", 5),
    (REGULAR, "abc", 6),
    (WILDCARDS, '[],"<>(', 5),
    (LEFT_LIST, "[]{},1", 5),
    (CALC, "()[]+-*1", 5),
])
def test_the_greedy_run_accepts_what_earley_parses(grammar, alphabet, longest):
    from lark import Lark

    rtn = lark_rtn(grammar)
    assert rtn is not None and rtn.conflicts() == []
    parser = Lark(grammar, parser="earley", lexer="dynamic")
    accepted = 0
    for text in strings(alphabet, longest):
        want = parses(parser, text) is not None
        assert rtn.accepts(text) == want, text
        accepted += want
        # every prefix of a sentence runs; a string that runs is a prefix of a sentence or not, the oracle can't say
        if want:
            assert all(rtn.run(text[:i]) is not None for i in range(len(text)))
    assert accepted >= 5


def test_machines_cut_every_cycle_and_the_rest_is_inlined():
    assert lark_rtn(JSONISH).names == ["start", "value"]  # pair is inlined into value
    assert lark_rtn(REGULAR).names == ["start"]
    rtn = lark_rtn(CALLS)
    assert rtn.names[0] == "start" and len(rtn.names) == 2


def test_a_stack_of_return_points_as_deep_as_the_nesting():
    rtn = lark_rtn(JSONISH)
    assert len(rtn.run("[[{k:[")) == 1 + 4  # start and four open values
    assert rtn.accepts("[[{k:[1]}]]") and not rtn.accepts("[[{k:[1]]]]")


@pytest.mark.parametrize("grammar, clash", [
    ('start: a\na: "x" a? "x"\n', "a move and a call of a both take 'x'"),  # greedy would refuse xxxx
    ('start: a\na: "x" a? "y"?\n', "a move and a return both take 'y'"),
    ('start: a\na: "(" a ")" | \n', "a matches the empty string"),
    ('start: a\na: b "x" | "(" a ")"\nb: a "z" | "w"\n', "left recursion"),  # through another rule (direct is solved)
])
def test_grammars_the_greedy_run_could_get_wrong_are_named(grammar, clash):
    rtn = lark_rtn(grammar)
    assert rtn is not None
    assert any(clash in c for c in rtn.conflicts()), rtn.conflicts()


def test_what_lark_or_a_regex_cannot_read_has_no_network():
    assert lark_rtn("start: ") is None or lark_rtn("start: ").names == ["start"]
    assert lark_rtn('start: x\nx: "a" x | y\n') is None  # y is not defined
    assert lark_rtn('start: "a"\n%import nowhere.X\n') is None
    assert lark_rtn('start: a\na: "(" a ")" | /[\\S]/\n') is None  # a wildcard that can't be kept off the calls
    assert lark_rtn('start: a\na: "(" a ")" | /(?<=x)y/\n') is None  # a lookaround: interegular has no FSM of it
