"""Regular constraints on the device (vibee/runtime/token_dfa.py, grammar_table.py): the token DFA allows, at every
step, exactly the tokens llguidance's host mask allows (an independent implementation of the same
regex), its outputs match the regex, its table rows come and go with requests, and decode rounds
on the device mask and advance it, giving the tokens of per-step decoding."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from tests.runtime.decode_runs import decode
from tests.runtime.eager_graphs import watch_round_starts
from vibee.engine_flags import split_flags
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.multi_step import plain_row
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.structured_output import (StructuredOutputs, TokenConstraint, grammar_for_json_object,
                                             grammar_for_json_schema, grammar_for_lark, grammar_for_regex)
from vibee.runtime.grammar_table import DFAConstraint, GrammarTable, TokenDFAs
from vibee.runtime.lark_regex import NESTED_LARK
from vibee.runtime.token_dfa import NotRegular, compile_dfa, regular_pattern

REGEX = r"(GET|POST) /[a-z]{1,8}(/[a-z0-9]{1,4}){0,2} HTTP/1\.[01]"


def text_of(tokens, ids):
    return b"".join(tokens[i] for i in ids).decode("utf-8")


@pytest.mark.parametrize("pattern", [REGEX, r"[a-z]+( [0-9]{2})?", r"\{\"id\": [0-9]{1,3}\}"])
def test_the_dfa_allows_exactly_the_tokens_that_keep_a_match_possible(eng, tokens, pattern):
    """Random walks through the DFA: at each step the allowed tokens are those after which the
    text is still a prefix of a match (the regex library's partial matching, token by token),
    and the end tokens once it is a whole match; llguidance's host mask allows a subset (it
    keeps forced text to its canonical tokens; so does the DFA given the tokenizer, below). A walk
    ends at an end token, its text a match."""
    import regex

    structured = eng.structured
    eos = sorted(eng.eos_token_ids)
    dfa = compile_dfa(pattern, tokens, eos, structured.vocab_size, max_states=1000)
    compiled = regex.compile(pattern.encode())
    rng = np.random.default_rng(0)
    for walk in range(3):
        ll = structured.constraint(grammar_for_regex(pattern))
        state, out, text = 0, [], b""
        for _ in range(60):
            viable = [t for t, b in enumerate(tokens) if b is not None and t not in eos
                      and compiled.fullmatch(text + b, partial=True)]
            if compiled.fullmatch(text):
                viable = sorted(viable + eos)
            assert dfa.allowed(state).tolist() == viable, (walk, text)
            words = (structured.vocab_size + 31) // 32
            bits = np.zeros(words, dtype=np.uint32)
            ll.advance(out)
            structured._executor.unsafe_compute_mask_ptr([(ll.matcher, 0)], bits.ctypes.data, words * 4, 1)
            host = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[: structured.vocab_size])
            assert set(host.tolist()) <= set(viable) and len(host), (walk, text)
            token = int(rng.choice(dfa.allowed(state)))
            out.append(token)
            state = int(dfa.next[state, token])
            if token in eos:
                break
            text += tokens[token]
        assert out[-1] in eos and re.fullmatch(pattern, text.decode())


def test_regular_grammars_are_found_and_the_rest_left_to_llguidance():
    for pattern in ["a/b", r"a\/b", r"x{2,3}\d", "[^<>]*", r"a\\/b"]:
        expected = pattern.replace(r"\/", "/") if not pattern.startswith(r"a\\") else pattern
        assert regular_pattern(grammar_for_regex(pattern)) == expected
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert re.fullmatch(regular_pattern(grammar_for_json_schema(schema)), '{"n": 42}')
    assert regular_pattern(grammar_for_json_object()) is None  # any depth: not regular
    assert re.fullmatch(regular_pattern(grammar_for_lark('start: "a"+ ("," NAME)?\nNAME: /[a-z]+/')), "aa,b")
    nested = 'start: "(" start ")" | "x"'  # not regular: compiled as the grammar nested up to a depth
    assert regular_pattern(grammar_for_lark(nested)) == (NESTED_LARK, nested)
    assert regular_pattern(grammar_for_lark('start: %json {"type": "array"}')) is None  # llguidance's extension
    assert regular_pattern("not a grammar") is None


def test_table_rows_are_lent_per_pattern_and_given_back(tokens):
    """Choices of one pattern share its rows, across requests; another pattern takes its own, and
    one that finds no room is refused; rows go back when the last choice of a pattern is done."""
    sizes = TokenDFAs(GrammarTable(capacity=1000, vocab_size=len(tokens), device="cpu"), tokens, [0])
    n, m = sizes.compile(REGEX).num_states, sizes.compile(r"[0-9]{3}").num_states
    k = sizes.compile(r"[a-f]{4}").num_states
    capacity = 1 + n + m + (k - 1)  # room for two patterns, one row short of a third
    table = GrammarTable(capacity=capacity, vocab_size=len(tokens) + 4, device="cpu")
    dfas = TokenDFAs(table, tokens, [0])
    first = dfas.constraints(REGEX, 3)  # a request of three choices
    again = dfas.constraints(REGEX, 1)  # another request, same pattern: the same rows
    assert {c.loaded.first for c in first + again} == {1} and table.free_rows == capacity - 1 - n
    second = dfas.constraints(r"[0-9]{3}", 1)
    assert second[0].loaded.first == 1 + n
    with pytest.raises(NotRegular, match="free rows"):
        dfas.constraints(r"[a-f]{4}", 1)
    for c in first:
        c.release()
    assert table.free_rows == k - 1  # still held by the other request's choice
    again[0].release()
    assert table.free_rows == n  # the hole it left, before the other load
    assert dfas.constraints(REGEX, 1)[0].loaded.first == 1  # loaded afresh where it was
    second[0].release()


def test_a_free_form_object_in_a_schema_is_left_to_llguidance(eng, tokens):
    """Its regex (a depth-bounded JSON value) is too long to compile on the engine's thread; the
    refusal is remembered, not recomputed."""
    schema = {"type": "object", "properties": {"meta": {"type": "object"}}, "required": ["meta"]}
    grammar = grammar_for_json_schema(schema)
    pattern = regular_pattern(grammar)
    with pytest.raises(NotRegular, match="characters"):
        compile_dfa(pattern, tokens, [0], len(tokens), max_states=1000)
    assert isinstance(eng.structured.constraints(grammar, 1)[0], TokenConstraint)
    assert isinstance(eng.structured.dfas._compiled[pattern], NotRegular)


def test_a_full_table_leaves_the_grammar_to_llguidance(eng):
    small = StructuredOutputs(eng.tokenizer, vocab_size=eng.structured.vocab_size, eos_token_ids=eng.eos_token_ids,
                              table_bytes=1)  # two rows: the free state and one
    assert isinstance(small.constraints(grammar_for_regex(REGEX), 1)[0], TokenConstraint)
    [on_device] = eng.structured.constraints(grammar_for_regex(REGEX), 1)
    assert isinstance(on_device, DFAConstraint)
    on_device.release()


def test_table_mask_and_advance_follow_the_dfa(eng, tokens):
    table = eng.structured.table
    [c] = eng.structured.dfas.constraints(r"[a-z]{2,5}", 1)
    try:
        dfa = c.loaded.dfa
        logits = torch.zeros(3, table.vocab_size)
        states = torch.tensor([0, int(table.states[c.slot]), c.loaded.first + 1])
        table.mask(logits, states)
        assert torch.isfinite(logits[0]).all()  # the free state allows everything
        for row, state in ((1, 0), (2, 1)):
            assert torch.isfinite(logits[row]).nonzero().flatten().tolist() == dfa.allowed(state).tolist()
        token = int(dfa.allowed(0)[0])
        moved = table.advance(states, torch.tensor([5, token, token]))
        assert moved[0] == 0 and moved[1] == c.loaded.first + dfa.next[0, token]
        table.advance_slots(torch.tensor([0, c.slot]), torch.tensor([5, token]))  # the choice's state, on the device
        assert table.states[0] == 0 and table.states[c.slot] == moved[1]
    finally:
        c.release()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernel runs in the interpreter on a CPU")
def test_the_bitmask_kernel_masks_as_the_table_does(eng):
    from vibee.runtime.token_mask_kernel import apply_token_bitmask

    table = eng.structured.table
    [c] = eng.structured.dfas.constraints(REGEX, 1)
    try:
        states = torch.tensor([0, int(table.states[c.slot]), c.loaded.first + 5, c.loaded.first + c.loaded.dfa.num_states - 1])
        width = table.vocab_size + 7  # logits wider than the table: never allowed to a constrained row
        logits = torch.randn(4, width)
        expected = logits.clone()
        expected[:, : table.vocab_size].masked_fill_(table.next[states, :] < 0, float("-inf"))
        expected[1:, table.vocab_size:] = float("-inf")
        apply_token_bitmask(logits, table, states)
        assert torch.equal(logits, expected)
    finally:
        c.release()


def test_only_a_device_grammar_lets_a_row_run_in_rounds(eng):
    params = SamplingParams(structured_output=grammar_for_regex(REGEX), max_tokens=8)
    [dfa] = eng.structured.constraints(params.structured_output, 1)
    try:
        assert plain_row(params, None, dfa)
        assert not plain_row(params, None, eng.structured.constraint(params.structured_output))
        penalized = SamplingParams(structured_output=params.structured_output, presence_penalty=0.5)
        assert not plain_row(penalized, None, dfa)
    finally:
        dfa.release()


def test_only_a_host_grammar_keeps_steps_from_overlapping(eng):
    """A token DFA's state is on the device, and so is JSON mode's (with its stack): their
    requests need no tokens on the host before the next step; llguidance's (a Lark grammar with its
    `%json` extension) does."""
    eng.add_request("dfa", [5, 6, 7], SamplingParams(max_tokens=4, structured_output=grammar_for_regex(REGEX)))
    eng.add_request("json", [5, 6, 7], SamplingParams(max_tokens=4, structured_output=grammar_for_json_object()))
    assert eng._num_penalized == 0 and eng._can_overlap()
    host_only = grammar_for_lark('start: %json {"type": "array"}')
    eng.add_request("host", [5, 6, 7], SamplingParams(max_tokens=4, structured_output=host_only))
    assert eng._num_penalized == 1 and not eng._can_overlap()
    for request in ("dfa", "json", "host"):
        eng.abort_request(request)
    table = eng.structured.table
    assert eng._num_penalized == 0 and table.rows.runs == [(1 + table.json_rows, table.capacity - 1 - table.json_rows)]


@pytest.fixture
def rounds_seen(monkeypatch):
    """Eager graphs for every engine; returns each rounds step's grammar slots."""
    seen = []
    watch_round_starts(monkeypatch, lambda rounds_object, seqs, rounds, chained, slots: seen.append(list(slots or [])))
    return seen


def test_rounds_mask_and_advance_the_dfa_on_the_device(rounds_seen):
    """A constrained and a free request decoded in rounds give the tokens of per-step decoding
    (greedy), the constrained one a match of its regex ended by EOS."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = [SamplingParams(max_tokens=40, temperature=0.0, structured_output=grammar_for_regex(REGEX)),
              SamplingParams(max_tokens=24, temperature=0.0)]

    eng_rounds, in_rounds = decode(prompts, params, rounds=4, max_num_seqs=2)
    assert eng_rounds.multi_step is not None and any(slots and slots[0] > 0 for slots in rounds_seen)
    rounds_seen.clear()
    eng_steps, per_step = decode(prompts, params, rounds=1, max_num_seqs=2)
    assert not rounds_seen and in_rounds == per_step
    for t in (eng_rounds.structured.table, eng_steps.structured.table):
        assert t.rows.runs == [(1 + t.json_rows, t.capacity - 1 - t.json_rows)]  # rows given back
    tokens, text, reason = in_rounds[0]
    assert reason == "stop" and re.fullmatch(REGEX, text)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_rounds_in_cuda_graphs_mask_and_advance_the_dfa():
    """The built-in model in float32 with real CUDA graphs: a regex-constrained request beside a
    free one, decoded in captured rounds (the bitmask kernel and the state's advance inside
    the graph), gives per-step decoding's tokens; its text matches, ended by EOS."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = [SamplingParams(max_tokens=40, temperature=0.0, structured_output=grammar_for_regex(REGEX)),
              SamplingParams(max_tokens=24, temperature=0.0)]

    eng, in_rounds = decode(prompts, params, rounds=4, device="cuda", max_num_seqs=2)
    assert eng.multi_step is not None and eng.multi_step.rounds.round_graphs
    assert eng.stats()["batching"]["multi_step"]["rounds"] > 0
    _, per_step = decode(prompts, params, rounds=1, device="cuda", max_num_seqs=2)
    assert in_rounds == per_step
    assert in_rounds[0][2] == "stop" and re.fullmatch(REGEX, in_rounds[0][1])


def test_the_engine_process_compiles_a_new_dfa_off_its_loop(monkeypatch):
    """A request whose regex is new waits for its DFA on the compiler's thread; a request behind
    it is added (and could step) at once; the first is added when its DFA is done, which the
    next request of the same regex finds compiled."""
    import multiprocessing
    import threading

    from vibee.runtime import grammar_table
    from vibee.runtime.engine_core import EngineCore

    gate = threading.Event()
    real = grammar_table.compile_dfa

    def slow(*args, **kwargs):
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(grammar_table, "compile_dfa", slow)
    eng = LLMEngine(EngineConfig(device="cpu", cpu_kv_cache_gib=0.25, seed=0), progress=False)
    ours, theirs = multiprocessing.Pipe()  # ours kept open: the core sends the abort's outputs
    core = EngineCore(eng, theirs)
    constrained = SamplingParams(max_tokens=8, structured_output=grammar_for_regex(r"[a-z]{3} [0-9]{2}"))
    core._handle(("add", "regex", [5, 6, 7], constrained, None, 0))
    core._handle(("add", "plain", [8, 9], SamplingParams(max_tokens=4), None, 0))
    core._add_compiled()
    assert eng.request_ids() == ["plain"] and len(core._compiling) == 1
    gate.set()
    core._compiling[0][2].result(timeout=30)
    core._add_compiled()
    assert sorted(eng.request_ids()) == ["plain", "regex"] and not core._compiling
    assert isinstance(eng._by_seq[eng._requests["regex"].choices[0].seq.seq_id][1].constraint, DFAConstraint)
    core._handle(("add", "again", [5, 6], constrained, None, 0))  # compiled: added at once
    assert "again" in eng.request_ids()
    core._handle(("add", "gone", [5], SamplingParams(max_tokens=4, structured_output=grammar_for_regex("x+y")), None, 0))
    core._handle(("abort", "gone"))  # aborted while compiling: never added
    assert not core._compiling


def test_preempted_constrained_sequences_keep_their_dfa_state(rounds_seen):
    """A KV cache too small for the batch preempts (recompute) constrained sequences mid-output,
    in rounds and between them; each keeps its state in its slot, and the greedy tokens are
    those of an engine with room for all."""
    prompts = [[5 + i, 6, 7, 8 + i] * 7 for i in range(4)]  # 28 tokens: two blocks of 16 each, three with the output
    params = SamplingParams(max_tokens=40, temperature=0.0, structured_output=grammar_for_regex(REGEX))

    def run(**flags):
        settings, knobs = split_flags({"num_scheduler_steps": 4, "max_num_seqs": 4, **flags})
        e = LLMEngine(EngineConfig(device="cpu", cpu_kv_cache_gib=0.25, seed=0, **settings, knobs=knobs), progress=False)
        outs = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in generate(e, prompts, params)]
        return e, outs

    tight, squeezed = run(num_kv_blocks=7)
    _, roomy = run()
    assert tight.stats()["batching"]["preemptions"] > 0 and rounds_seen
    assert squeezed == roomy
    assert all(reason == "stop" and re.fullmatch(REGEX, text) for _, text, reason in squeezed)


def test_forced_text_keeps_to_its_canonical_tokens_as_llguidance_does(eng, tokens):
    """With the tokenizer's encode, a state whose next characters are forced allows only the first
    of their canonical tokens (the last one free): on a tool call's fixed text, field names and
    enum values the DFA then allows exactly llguidance's host mask at every step of random walks;
    without it, other spellings of the forced text are allowed too."""
    structured = eng.structured
    eos = sorted(eng.eos_token_ids)
    pattern = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,10}", '
               r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')
    encode = lambda text: eng.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    dfa = compile_dfa(pattern, tokens, eos, structured.vocab_size, max_states=1000, encode=encode)
    every = compile_dfa(pattern, tokens, eos, structured.vocab_size, max_states=1000)
    assert (every.next >= 0).sum() > (dfa.next >= 0).sum()
    rng = np.random.default_rng(1)
    words = (structured.vocab_size + 31) // 32
    for walk in range(4):
        ll = structured.constraint(grammar_for_regex(pattern))
        state, out = 0, []
        while not out or out[-1] not in eos:
            bits = np.zeros(words, dtype=np.uint32)
            ll.advance(out)
            structured._executor.unsafe_compute_mask_ptr([(ll.matcher, 0)], bits.ctypes.data, words * 4, 1)
            host = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[: structured.vocab_size])
            assert dfa.allowed(state).tolist() == host.tolist(), (walk, out)
            token = int(rng.choice(dfa.allowed(state)))
            out.append(token)
            state = int(dfa.next[state, token])
        assert re.fullmatch(pattern, text_of(tokens, out[:-1]))


@pytest.mark.parametrize("template", ["", "{{ tools }} parameters"])  # hermes, llama
def test_tool_plans_compile_to_regexes_of_their_calls(template):
    """A tool plan with regular argument schemas is one regex (a token DFA on the device): it
    matches the calls the plan allows, as call_text writes them, and not others; "auto" also
    matches text that does not open as a call does."""
    from vibee.server.tool_calls import call_text, plan_tools

    weather = {"type": "function", "function": {"name": "get.weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
    clock = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}

    def call(name, args):
        return {"function": {"name": name, "arguments": json.dumps(args)}}

    paris, utc = call("get.weather", {"city": "Paris", "unit": "c"}), call("now", {})
    for choice in ["auto", "required", {"type": "function", "function": {"name": "now"}}]:
        plan = plan_tools([weather, clock], choice, None, template)
        pattern = regular_pattern(plan.grammar)
        assert pattern is not None, choice

        def matches(text, pattern=pattern):
            return re.fullmatch(pattern, text) is not None

        named = isinstance(choice, dict)
        assert matches(call_text([utc], plan.format))
        assert matches(call_text([paris], plan.format)) is not named
        assert not matches(call_text([call("get.weather", {"city": "Paris", "unit": "k"})], plan.format))
        assert not matches(call_text([call("getXweather", {"city": "Paris", "unit": "c"})], plan.format))
        several = plan.format == "hermes" and not named
        assert matches(call_text([paris, utc], plan.format)) is several
        plain = ["Sunny.", "", "  \n", "<tool", "{x" if plan.format == "hermes" else "<tool_call>"]
        assert all(matches(text) is (choice == "auto") for text in plain)
        opening = "<tool_call>" if plan.format == "hermes" else "{"
        assert not matches(" \n" + opening + " whatever") and not matches(opening)
