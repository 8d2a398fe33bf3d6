"""A Lark grammar's token pushdown automaton (lark_pda.py): every token it allows from a row keeps the
text a prefix of the grammar's language and every token it refuses would not (or needs a deeper look
at the stack than an effect takes), the row it leaves runs on as the character-level run does, and
a row is complete exactly when the text is a sentence. Checked along random token sequences, over a
hand-made vocabulary and the built-in model's."""

from __future__ import annotations

import random

import pytest

from tests.runtime.test_lark_rtn import CALLS, JSONISH, SPACED
from vibee.runtime.config import DEFAULT_MODEL_DIR
from vibee.runtime.lark_pda import LarkPDA
from vibee.runtime.lark_rtn import lark_rtn

JSON_WITH_STRINGS = r'''
start: value
value: "[" [value ("," value)*] "]" | "{" [pair ("," pair)*] "}" | NUMBER | STRING
pair: STRING ":" value
NUMBER: /[0-9]+/
STRING: /"[a-z ]*"/
%ignore " "
'''


def walk_randomly(pda: LarkPDA, sequences: int, length: int, seed: int = 0) -> tuple[int, int]:
    """(token steps checked, steps refused only for want of a deeper look)."""
    rng = random.Random(seed)
    rtn, tokens = pda.rtn, pda.tokens
    checked = refused_deep = 0
    usable = [t for t, text in enumerate(tokens) if text]
    for _ in range(sequences):
        row, text = pda.start(), ""
        for _ in range(length):
            allowed = pda.allowed(*row)
            token = rng.choice(allowed) if allowed and rng.random() < 0.85 else rng.choice(usable)
            after = pda.advance(*row, token)
            runs = rtn.run(text + tokens[token]) is not None
            assert runs or after is None, f"{tokens[token]!r} allowed after {text!r}"
            checked += 1
            if after is None:
                refused_deep += runs
                break
            row, text = after, text + tokens[token]
            assert pda.complete(*row) == rtn.accepts(text), text
    return checked, refused_deep


@pytest.mark.parametrize("grammar, vocabulary, refused", [
    (JSONISH, ["[", "]", "{", "}", ",", "k", ":", "1", "]]", "],", "},", "}]", "[[", "[1", "1,", "k:", ":[", "]}", "}}",
               "]]]", ",k:", "11"], 1 / 50),
    (CALLS, ["f", "(", ")", "[", "]", ",", "+", "1", "))", "),", "f(", "(1", "1)", "])", ")]", "1+", "+f(", ")))"], 1 / 50),
    (SPACED, ["(", ")", "[", "]", ",", "+", "1", " ", " +", ") ", "])", "( ", ", ", "1)"], 1 / 50),
    # tail calls: a calls b last, b calls a last; ")" may pop an entry pushed while a ran, from b
    ('start: a\na: "(" a ")" | "x" b\nb: "+" b | "-" a | "."\n',
     ["(", ")", "x", "+", "-", ".", "x.", ".)", "))", "x+", "-x", "+.", "(x", ".))"], 0),
])
def test_tokens_follow_the_grammar_along_random_sequences(grammar, vocabulary, refused):
    pda = LarkPDA(lark_rtn(grammar), [None, *vocabulary])  # token 0 special: never allowed
    checked, refused_deep = walk_randomly(pda, sequences=300, length=12)
    assert checked > 1000
    assert refused_deep <= checked * refused  # the depth limit refuses few steps (none where tokens pop little)
    assert pda.advance(*pda.start(), 0) is None


def test_tokens_that_return_below_their_start_read_the_rows_stack():
    pda = LarkPDA(lark_rtn(JSONISH), ["[", "1", "],", "]}", "{", "k:", "]"])
    row = pda.start()
    for text in ("[", "[", "1"):
        row = pda.advance(*row, pda.tokens.index(text))
    assert row[2] == 2  # the inner list's call, the number's (start's call of the outer value is a tail call)
    assert pda.advance(*row, pda.tokens.index("],")) is not None  # closes the inner list, then a comma of the outer
    assert pda.advance(*row, pda.tokens.index("]}")) is None  # the outer value is a list, not an object
    row = pda.start()
    for text in ("{", "k:", "[", "1"):
        row = pda.advance(*row, pda.tokens.index(text))
    assert pda.advance(*row, pda.tokens.index("]}")) is not None and pda.advance(*row, pda.tokens.index("],")) is not None


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "tokenizer.json").exists(), reason="no default model")
def test_a_real_vocabulary_walks_the_grammar_without_the_depth_limit():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    vocabulary = [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]
    pda = LarkPDA(lark_rtn(JSON_WITH_STRINGS), vocabulary)
    assert pda.cut == 0 and len(pda.return_ids) <= 7
    checked, refused_deep = walk_randomly(pda, sequences=40, length=16)
    assert checked > 200 and refused_deep == 0


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "tokenizer.json").exists(), reason="no default model")
def test_the_walk_over_the_whole_vocabulary_at_once_is_the_token_by_token_walk():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    vocabulary = [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]
    for grammar in (JSON_WITH_STRINGS, SPACED):
        pda = LarkPDA(lark_rtn(grammar), vocabulary)
        reads = {True: 0, False: 0}  # allowed pairs whose token reads the row's stack, and the rest
        for number, state in enumerate(pda.states):
            for token in range(0, len(vocabulary), 3):
                if vocabulary[token]:
                    want = pda._effect(state, vocabulary[token])
                    assert pda.effects.get((number, token)) == want, (state, vocabulary[token])
                    if want is not None:
                        reads[want.looks > 0] += 1
        assert reads[False] > 50 and reads[True] > 10


RECURSIVE_LIST = r'''
start: value
value: "[" [elements] "]" | "{" [elements] "}" | NUMBER
elements: value | value "," elements
NUMBER: /[0-9]/
%ignore " "
'''


def test_a_call_in_tail_position_pushes_nothing():
    """`elements: value | value "," elements` calls itself last: a list of 40 elements leaves one entry
    on the stack, not 40 (which would pass the device's 41 bits, and need a look 40 entries deep for
    the closing bracket), and the bracket closes it."""
    texts = [None, "[", "]", "{", "}", ",", "1", " ", "],", "]]"]
    pda = LarkPDA(lark_rtn(RECURSIVE_LIST), texts)
    row = pda.start()
    for text in ["[", "1"] + [",", " ", "1"] * 39:
        row = pda.advance(*row, texts.index(text))
        assert row is not None and row[2] <= 3, text
    assert pda.advance(*row, texts.index("]]")) is None and not pda.complete(*row)
    row = pda.advance(*row, texts.index("]"))
    assert row is not None and pda.complete(*row)
    checked, refused_deep = walk_randomly(pda, sequences=200, length=16)
    assert checked > 1000 and refused_deep == 0
