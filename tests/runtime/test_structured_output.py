"""Constrained decoding on the built-in model: every output that finishes keeps to its grammar
(checked by independent parsers: pydantic for JSON schemas, json for JSON mode, the lark library
for Lark grammars, re for regexes), greedy and sampled, several choices, in a batch with
unconstrained requests; a grammar that can't be used is refused when the request is added."""

from __future__ import annotations

import json
import logging
import re
from typing import Literal

import lark
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from vibee.runtime.offline import generate
from vibee.runtime.sampler import Sampler, SamplingRow
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.structured_output import (GrammarError, StructuredOutputs, grammar_for_json_object,
                                             grammar_for_json_schema, grammar_for_lark, grammar_for_regex)


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["cat", "dog", "fox"]
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    tags: list[Literal["small", "loud", "old"]] = Field(max_length=3)


# Rules nested inside themselves (not regular languages; the device takes them up to 16 deep); the
# bounded one ends within a few tokens.
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
BOUNDED_LARK = r"""
start: "(" pair ")"
pair: NUMBER "," (NUMBER | "(" pair ")")?
NUMBER: /[0-9]{1,2}/
"""

REGEX = r"(GET|POST) /[a-z]{1,8}(/[a-z0-9]{1,4}){0,2} HTTP/1\.[01]"


def run(eng, grammar, *, n=4, temperature=1.0, max_tokens=80, prompt="def parse(", **kw):
    params = SamplingParams(n=n, temperature=temperature, seed=7, max_tokens=max_tokens, structured_output=grammar, **kw)
    [out] = generate(eng, [eng.tokenizer.encode(prompt)], params)
    return out.outputs


def finished(outputs):
    done = [c for c in outputs if c.finish_reason == "stop"]
    assert done, [c.text for c in outputs]  # the grammars are small enough that some choice ends
    return done


def pet_schema():
    return Pet.model_json_schema()


def test_json_schema_outputs_validate(eng):
    for temperature in (0.0, 1.0):
        for c in finished(run(eng, grammar_for_json_schema(pet_schema()), temperature=temperature, max_tokens=120)):
            Pet.model_validate_json(c.text)


def test_json_object_outputs_parse(eng):
    for c in finished(run(eng, grammar_for_json_object(), n=6, max_tokens=60)):
        assert isinstance(json.loads(c.text), dict)


def test_lark_outputs_parse_under_lark(eng):
    parser = lark.Lark(BOUNDED_LARK)
    for c in finished(run(eng, grammar_for_lark(BOUNDED_LARK), n=6, max_tokens=40)):
        parser.parse(c.text)


def test_lark_outputs_parse_under_lark_and_decode_on_the_device(eng, caplog):
    """A Lark grammar is a token DFA: a regular one (lark_regex.py), a list written as recursion at
    a rule's end, one with %ignore, and rules nested inside themselves (LARK, BOUNDED_LARK: up to
    16 deep), and nesting of two bracket types, which outgrows the DFA's states, as a token pushdown
    automaton (lark_pda.py); one that is not LL(1) at the character level stays with llguidance."""
    before = dict(eng.structured.requests_by_path)
    for grammar in ('start: call (";" call)?\ncall: NAME "(" [NUMBER ("," NUMBER)~0..2] ")"\nNAME: /[a-z_]{1,8}/\n'
                    'NUMBER: /[0-9]{1,2}/', 'start: "[" items "]"\nitems: NUMBER | NUMBER "," items\nNUMBER: /[0-9]{1,2}/'):
        parser = lark.Lark(grammar)
        for c in finished(run(eng, grammar_for_lark(grammar), n=6, max_tokens=40)):
            parser.parse(c.text)
    # %ignore'd spaces (the built-in code model writes them on and on: not run to the end here)
    run(eng, grammar_for_lark('start: "[" NUMBER ("," NUMBER)* "]"\nNUMBER: /[0-9]+/\n%ignore " "'), n=1, max_tokens=4)
    run(eng, grammar_for_lark(LARK), n=1, max_tokens=4)
    run(eng, grammar_for_lark(BOUNDED_LARK), n=1, max_tokens=4)  # its outputs parse: test_lark_outputs_parse_under_lark
    run(eng, grammar_for_lark('start: v\nv: "[" [v ("," v)*] "]" | "{" [v ("," v)*] "}" | NUMBER\nNUMBER: /[0-9]/'),
        n=1, max_tokens=4)
    assert eng.structured.requests_by_path["device"] == before["device"] + 6
    greedy_would_err = 'start: a\na: "x" a? "x" | "[" a "]" | "{" a "}"\n'  # after "x", another "x" opens or closes
    with caplog.at_level(logging.INFO, logger="vibee.engine"):
        for _ in range(2):
            run(eng, grammar_for_lark(greedy_would_err), n=1, max_tokens=4)
    assert eng.structured.requests_by_path["host"] == before["host"] + 2
    # why it went to the host, once a grammar
    told = [r.getMessage() for r in caplog.records if "on the host" in r.getMessage()]
    assert len(told) == 1 and re.fullmatch(
        r"structured output on the host \(llguidance's masks\): its rules nest into more states than the device's DFA "
        r"holds; nor has it a pushdown automaton here: the grammar is not LL\(1\) at the character level: a, state \d+: "
        r"a move and a call of a both take 'x'", told[0]), told  # interegular's state numbers vary between runs


def test_regex_outputs_match(eng):
    for c in finished(run(eng, grammar_for_regex(REGEX), n=6, max_tokens=30)):
        assert re.fullmatch(REGEX, c.text), c.text


def test_unfinished_outputs_are_prefixes(eng):
    """A choice cut by max_tokens is still a prefix the grammar allows: it never leaves it."""
    parser = lark.Lark(LARK, parser="lalr")
    for c in run(eng, grammar_for_lark(LARK), n=4, max_tokens=3):
        if c.finish_reason == "length":
            interactive = parser.parse_interactive(c.text)
            interactive.exhaust_lexer()  # raises on a token the grammar does not allow here


def test_constrained_and_free_requests_share_a_batch(eng):
    free_prompt = eng.tokenizer.encode("import os\n")
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = generate(eng, [free_prompt], free)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=0.0, max_tokens=30, structured_output=grammar_for_regex(REGEX))
    both = generate(eng, [free_prompt, eng.tokenizer.encode("x")], [free, constrained])
    assert both[0].outputs[0].token_ids == alone  # the mask touches its own row only
    assert re.fullmatch(REGEX, both[1].outputs[0].text) or both[1].outputs[0].finish_reason == "length"


def test_grammar_ends_the_output(eng):
    """A complete grammar leaves only EOS: the choice stops there, not at max_tokens."""
    [c] = run(eng, grammar_for_lark('start: "yes" | "no"'), n=1, temperature=0.0, max_tokens=50)
    assert c.text in ("yes", "no") and c.finish_reason == "stop"


def test_bad_grammar_is_refused_at_add(eng):
    with pytest.raises(ValueError, match="unknown name"):
        eng.add_request("bad", eng.tokenizer.encode("x"), SamplingParams(structured_output=grammar_for_lark("start: foo")))
    assert not eng.has_unfinished()
    with pytest.raises(GrammarError, match="not JSON"):
        grammar_for_json_schema("{not json")


def test_sampler_masks_before_logprobs(eng):
    """The sampler's grammar step on its own: only allowed tokens get finite logprobs, and the
    greedy pick is the best allowed token, not the best token."""
    structured = StructuredOutputs(eng.tokenizer, vocab_size=eng.model_config.vocab_size,
                                   eos_token_ids=eng.eos_token_ids)
    digits = structured.constraint(grammar_for_regex("[0-9]+"))
    vocab = eng.model_config.vocab_size
    logits = torch.randn(2, vocab)
    allowed = {i for i in range(vocab) if re.fullmatch("[0-9]+", eng.tokenizer.decode([i]))}
    best_overall = int(logits[0].argmax())
    logits[0, best_overall] += 100.0  # the unconstrained argmax, far ahead
    sampler = Sampler(seed=0, structured=structured)
    params = SamplingParams(temperature=0.0, logprobs=5, structured_output=grammar_for_regex("[0-9]+"))
    free = SamplingParams(temperature=0.0, logprobs=5)
    rows = [SamplingRow(params, [1], [], constraint=digits), SamplingRow(free, [1], [])]
    first, second = sampler.sample(logits, rows)
    assert first.token_id in allowed and first.token_id == max(allowed, key=lambda i: float(logits[0, i]))
    assert all(t in allowed for t, _ in first.top_logprobs if _ > float("-inf"))
    assert second.token_id == int(logits[1].argmax())



def test_an_llguidance_that_takes_one_end_token_still_constrains(eng, monkeypatch):
    """llguidance 1.6 (on the GPU machine) takes one end token where 1.9 takes a list: the
    tokenizer's own is given, and outputs still parse."""
    import llguidance

    real = llguidance.LLTokenizer
    given = []

    def one_end_token(*args, eos_token=None, **kw):
        if not isinstance(eos_token, int):
            raise TypeError("argument 'eos_token': 'list' object cannot be interpreted as an integer")
        given.append(eos_token)
        return real(*args, eos_token=eos_token, **kw)

    monkeypatch.setattr(llguidance, "LLTokenizer", one_end_token)
    fresh = StructuredOutputs(eng.tokenizer, vocab_size=eng.model_config.vocab_size, eos_token_ids=eng.eos_token_ids)
    monkeypatch.setattr(eng, "structured", fresh)
    monkeypatch.setattr(eng.sampler, "_structured", fresh)
    for c in finished(run(eng, grammar_for_json_object(), n=4, max_tokens=60)):
        assert isinstance(json.loads(c.text), dict)
    assert given == [min(eng.tokenizer.eos_token_ids)]
