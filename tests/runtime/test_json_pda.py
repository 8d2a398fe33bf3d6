"""JSON mode on the device (vibee/runtime/json_pda.py, grammar_table.py): the token automaton with
its stack allows, at every step, exactly the tokens llguidance's host mask allows for
`{"type": "object"}` (an independent implementation of the same language), the device table
masks and advances it as the automaton does (torch and the Triton kernel), nesting stops at
MAX_DEPTH, and the engine's JSON-mode outputs parse, in decode rounds as in single steps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.runtime.decode_runs import decode
from tests.runtime.eager_graphs import watch_round_starts
from vibee.runtime import json_pda
from vibee.runtime.grammar_table import GrammarTable, pack, unpack
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.structured_output import grammar_for_json_object
from vibee.runtime.token_dfa import JSON_OBJECT, device_pattern

DEEP = ['{"a":[[{"b":[{"c":{}}]},"x",[]],1,{"d":{"e":[true,false,null]}}],"f":-0.5e+3}',
        '{"":[{},[],[[[[[[[]]]]]]],{"k":{"k":{"k":{"k":"v"}}}}],"n":[1,2.0,3e4,-7]}',
        '{"s":"a\\"b\\\\c\\n\\u001f\\u007F","t":["é😀",{"u":[]}]}']


@pytest.fixture(scope="module")
def pda(eng, tokens):
    return json_pda.compile_json_pda(tokens, eng.eos_token_ids, eng.structured.vocab_size,
                                     encode=lambda text: eng.tokenizer.encode(text, add_special_tokens=False))


def host_mask(structured, constraint, out) -> set[int]:
    words = (structured.vocab_size + 31) // 32
    bits = np.zeros(words, dtype=np.uint32)
    constraint.advance(out)
    structured._executor.unsafe_compute_mask_ptr([(constraint.matcher, 0)], bits.ctypes.data, words * 4, 1)
    return set(np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[: structured.vocab_size]).tolist())


def walk_compare(eng, pda, tokens, choose, steps=90):
    """Walk the automaton (choose(allowed) picks each token), comparing every step's allowed set
    with llguidance's; returns the tokens and the final (state, depth, stack)."""
    structured = eng.structured
    ll = structured.constraint(grammar_for_json_object())
    state, depth, stack, out = 0, 0, 0, []
    for _ in range(steps):
        allowed = pda.allowed(state, depth, stack)
        text = b"".join(tokens[t] for t in out if tokens[t])
        assert set(allowed.tolist()) == host_mask(structured, ll, out), text
        token = choose(allowed)
        if token is None:
            break
        out.append(token)
        state, depth, stack = pda.advance(state, depth, stack, token)
        if token in eng.eos_token_ids:
            break
    return out, (state, depth, stack)


def test_deep_texts_are_masked_as_llguidance_masks_them(eng, pda, tokens):
    """Token by token through nested objects and arrays, strings after commas in both, numbers and
    literals ending at brackets, escapes and UTF-8: the same allowed tokens at every step."""
    for text in DEEP:
        ids = iter(eng.structured.ll_tokenizer.tokenize_str(text) + [min(eng.eos_token_ids)])
        out, (state, depth, stack) = walk_compare(eng, pda, tokens, lambda allowed: next(ids, None))
        assert out[-1] in eng.eos_token_ids and depth == 0, text
        assert json.loads(b"".join(tokens[t] for t in out[:-1]).decode()) == json.loads(text)


def test_random_walks_are_masked_as_llguidance_masks_them(eng, pda, tokens):
    structural = np.array([b is not None and len(b) > 0 and all(c in b'{}[]",:1' for c in b) for b in tokens]
                          + [False] * (eng.structured.vocab_size - len(tokens)))
    for seed in range(12):
        rng = np.random.default_rng(seed)

        def choose(allowed):
            pool = allowed[structural[allowed]] if rng.random() < 0.85 and structural[allowed].any() else allowed
            return int(rng.choice(pool))

        walk_compare(eng, pda, tokens, choose)


def test_nesting_stops_at_max_depth(eng, pda, tokens):
    ids = eng.structured.ll_tokenizer.tokenize_str('{"a":' + "[" * (json_pda.MAX_DEPTH - 1))
    state, depth, stack = 0, 0, 0
    for t in ids:
        state, depth, stack = pda.advance(state, depth, stack, t)
    assert depth == json_pda.MAX_DEPTH
    allowed = {tokens[t] for t in pda.allowed(state, depth, stack)}
    assert b"[" not in allowed and b"{" not in allowed and b"]" in allowed and b"1" in allowed


def test_json_mode_is_the_devices_own_key():
    assert device_pattern(grammar_for_json_object()) == JSON_OBJECT


def test_the_table_masks_and_advances_as_the_automaton(eng, pda, tokens):
    """Rows of the device table (JSON mode's rows, the free row, a mid-walk stack) against
    TokenPDA.allowed/advance; the Triton kernel (in the interpreter) against the torch mask."""
    table = GrammarTable(capacity=GrammarTable.JSON_ROWS + 8, vocab_size=eng.structured.vocab_size, device="cpu",
                         json_mode=True)
    first = table.load(pda)
    ids = eng.structured.ll_tokenizer.tokenize_str(DEEP[0])
    host = [(0, 0, 0)]
    for t in ids:
        host.append(pda.advance(*host[-1], t))
    states = torch.tensor([0] + [int(pack(torch.tensor(first + s), torch.tensor(d), torch.tensor(k))) for s, d, k in host])
    tokens_t = torch.tensor([0] + ids + [min(eng.eos_token_ids)])
    width = table.vocab_size + 3
    logits = torch.zeros(len(states), width)
    table.mask(logits, states)
    for i, (s, d, k) in enumerate(host, start=1):
        assert set(torch.nonzero(logits[i] == 0).flatten().tolist()) == set(pda.allowed(s, d, k).tolist())
    assert bool((logits[0] == 0).all())  # the free row is not touched
    moved = table.advance(states[:-1], tokens_t[:-1])
    for i, (s, d, k) in enumerate(host[1:], start=1):
        row, depth, stack = unpack(moved[i:i + 1])
        assert (int(row) - first, int(depth), int(stack)) == (s, d, k)
    if os.environ.get("TRITON_INTERPRET") == "1":
        from vibee.runtime.token_mask_kernel import apply_token_bitmask

        kernel = torch.zeros(len(states), width)
        apply_token_bitmask(kernel, table, states)
        assert torch.equal(kernel, logits)


def test_engine_json_mode_parses_in_rounds_as_in_steps(monkeypatch):
    """Greedy JSON-mode outputs from the engine on the device table: each parses as an object when
    it stops, and decode rounds give the tokens of single steps."""
    seen = []
    watch_round_starts(monkeypatch, lambda rounds_object, seqs, rounds, chained, slots: seen.append(list(slots or [])))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    params = SamplingParams(max_tokens=64, temperature=0.0, structured_output=grammar_for_json_object())

    eng, in_rounds = decode(prompts, [params] * len(prompts), rounds=4)
    assert eng.structured.requests_by_path == {"device": len(prompts), "host": 0}
    assert any(slots and max(slots) > 0 for slots in seen)
    seen.clear()
    assert decode(prompts, [params] * len(prompts), rounds=1)[1] == in_rounds and not seen
    stopped = [text for _, text, reason in in_rounds if reason == "stop"]
    assert stopped, in_rounds
    for text in stopped:
        assert isinstance(json.loads(text), dict)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_json_mode_runs_in_captured_rounds():
    """The built-in model in float32 with real CUDA graphs: JSON-mode requests beside a free one,
    decoded in captured rounds (the kernel's stack check and the stack's advance inside the
    graph), give per-step decoding's tokens; what stops parses as an object."""
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    params = [SamplingParams(max_tokens=64, temperature=0.0, structured_output=grammar_for_json_object())] * 2 + \
        [SamplingParams(max_tokens=24, temperature=0.0)]

    eng, in_rounds = decode(prompts, params, rounds=4, device="cuda")
    assert eng.multi_step is not None and eng.multi_step.rounds.round_graphs
    assert eng.structured.requests_by_path["device"] == 2
    _, per_step = decode(prompts, params, rounds=1, device="cuda")
    assert in_rounds == per_step
    for _, text, reason in in_rounds[:2]:
        assert reason != "stop" or isinstance(json.loads(text), dict)
