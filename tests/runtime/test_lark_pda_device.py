"""A Lark grammar's token pushdown automaton on the device (lark_pda_tables.py, in grammar_table.py):
the table's rows allow, at every step of random token walks, exactly the tokens LarkPDA allows
(and the end token exactly where the text is a sentence), they advance to LarkPDA's state and
stack, the Triton kernel (in the interpreter) masks as the torch path does, grammars with several
bracket types route here from the nested-Lark DFA that cannot hold them, and the engine's outputs
on such a grammar parse."""

from __future__ import annotations

import functools
import os
import random

import lark
import pytest
import torch

from tests.runtime.test_lark_pda import RECURSIVE_LIST
from tests.runtime.test_lark_rtn import CALLS, JSONISH, LEFT_LIST, SPACED
from tests.sm90 import ptx_for_sm90
from tests.runtime.decode_runs import decode
from tests.runtime.eager_graphs import watch_round_starts
from vibee.runtime import lark_pda_tables, token_dfa
from vibee.runtime.grammar_table import GrammarTable, TokenDFAs, pack, unpack
from vibee.runtime.lark_pda import LarkPDA
from vibee.runtime.lark_pda_tables import PDATables, compile_lark_pda
from vibee.runtime.lark_regex import NESTED_LARK
from vibee.runtime.lark_rtn import lark_rtn
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.structured_output import grammar_for_lark
from vibee.runtime.token_dfa import NotRegular

EOS = 0
VOCABULARIES = {
    "jsonish": (JSONISH, ["[", "]", "{", "}", ",", "k", ":", "1", "]]", "],", "},", "}]", "[[", "[1", "1,", "k:", ":[",
                          "]}", "}}", "]]]", ",k:", "11"]),
    "calls": (CALLS, ["f", "(", ")", "[", "]", ",", "+", "1", "))", "),", "f(", "(1", "1)", "])", ")]", "1+", "+f(",
                      ")))"]),
    "spaced": (SPACED, ["(", ")", "[", "]", ",", "+", "1", " ", " +", ") ", "])", "( ", ", ", "1)"]),
    "tail calls": (RECURSIVE_LIST, ["[", "]", "{", "}", ",", "1", " ", "],", "]]", "}]", "[1", "1,", ", 1", "]}"]),
    # a tail-calls b, b tail-calls a: a ")" may pop an entry pushed for a while b runs
    "tail calls between rules": ('start: a\na: "(" a ")" | "x" b\nb: "+" b | "-" a | "."\n',
                                 ["(", ")", "x", "+", "-", ".", "x.", ".)", "))", "x+", "-x", "+.", "(x", ".))"]),
    "left recursion": (LEFT_LIST, ["[", "]", "{", "}", ",", "1", "],", "]]", "[1", "1,", ",1", "}]", ",["]),
    # a value's continuation must nest twice (m1 then m2): "[1" leaves entries that need more room than its end
    "deep continuations": ('start: v\nv: "[" v "," m1 "]" | "1"\nm1: "(" m1 ")" | "(" m2 ")"\nm2: "{" m2 "}" | "2"\n',
                           ["[", "]", ",", "1", "(", ")", "{", "}", "2", "[1", "1]", ",(", "))", "]]", "2)", ")]"]),
}


def _state(first: int, host: tuple[int, int, int], bits: int) -> torch.Tensor:
    """The device state of LarkPDA's (state, stack, depth in entries): its depth is counted in bits."""
    state, stack, depth = host
    return pack(torch.tensor(first + state), torch.tensor(depth * bits), torch.tensor(stack))


def _walks(pda: LarkPDA, sequences: int, length: int, seed: int = 0) -> list[list[tuple[tuple[int, int, int], int]]]:
    """Random walks of (host row, the token taken from it), the end token last where the text may end."""
    rng = random.Random(seed)
    walks = []
    for _ in range(sequences):
        row, walk = pda.start(), []
        for _ in range(length):
            allowed = [t for t in pda.allowed(*row) if t != EOS]
            if not allowed or (pda.complete(*row) and rng.random() < 0.15):
                break
            token = rng.choice(allowed)
            walk.append((row, token))
            row = pda.advance(*row, token)
        walks.append(walk + [(row, EOS)] * pda.complete(*row))
    return walks


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_the_tables_rows_mask_and_advance_as_the_automaton(name):
    grammar, vocabulary = VOCABULARIES[name]
    texts = [None, *vocabulary]  # token 0: the end token
    pda = LarkPDA(lark_rtn(grammar), texts)
    tables = compile_lark_pda(grammar, [t.encode() if t else None for t in texts], [EOS], len(texts) + 2)
    table = GrammarTable(capacity=64, vocab_size=len(texts) + 2, device="cpu")
    first = table.load(tables)
    assert first == 1 and tables.num_states == len(pda.states) + 1  # and the sink an end token leads to
    rows = [step for walk in _walks(pda, sequences=60, length=14) for step in walk]
    states = torch.stack([_state(first, row, pda.bits) for row, _ in rows])
    logits = torch.zeros(len(rows), table.vocab_size + 3)
    table.mask(logits, states)
    ended = 0
    for i, (row, _) in enumerate(rows):
        want = set(pda.allowed(*row)) - {EOS} | ({EOS} if pda.complete(*row) else set())
        assert set(torch.nonzero(logits[i] == 0).flatten().tolist()) == want, (name, row)
        ended += EOS in want
    assert ended >= 30  # walks that end where their text may
    moved = table.advance(states, torch.tensor([token for _, token in rows]))
    sink = first + len(pda.states)
    for i, (row, token) in enumerate(rows):
        after = pda.advance(*row, token) if token != EOS else (sink - first, row[1], row[2])
        at, depth, stack = (int(x) for x in unpack(moved[i:i + 1]))
        assert (at - first, stack, depth) == (after[0], after[1], after[2] * pda.bits), (name, row, token)
    # After the end token only the end token.
    end_rows = moved[[i for i, (_, token) in enumerate(rows) if token == EOS]]
    after_end = torch.zeros(len(end_rows), table.vocab_size)
    table.mask(after_end, end_rows)
    assert bool((torch.isinf(after_end[:, 1:])).all()) and bool((after_end[:, EOS] == 0).all())
    _kernel_agrees(table, states, logits)


def _kernel_agrees(table: GrammarTable, states: torch.Tensor, logits: torch.Tensor) -> None:
    """The Triton kernel (in the interpreter) masks these rows, and a free row beside them, as the torch path did.
    A row's mask is its state's alone: each distinct state is checked once (walks revisit them)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from vibee.runtime.token_mask_kernel import apply_token_bitmask

        first = sorted({state: i for i, state in reversed(list(enumerate(states.tolist())))}.values())
        states, logits = states[first], logits[first]
        free = torch.cat([torch.zeros(1, dtype=torch.long), states])
        kernel = torch.zeros(len(free), logits.shape[1])
        apply_token_bitmask(kernel, table, free)
        assert bool((kernel[0] == 0).all()) and torch.equal(kernel[1:], logits)


def test_a_full_stack_refuses_what_would_overflow_it():
    """Depth is counted in bits: a token whose pushes would pass STACK_BITS is refused; the row's
    other tokens stay allowed."""
    texts = [None, "[", "1", "]"]
    tables = compile_lark_pda(JSONISH, [t.encode() if t else None for t in texts], [EOS], len(texts))
    table = GrammarTable(capacity=64, vocab_size=len(texts), device="cpu")
    first = table.load(tables)
    pda = LarkPDA(lark_rtn(JSONISH), texts)
    row = pda.start()
    states = []
    while True:
        states.append(_state(first, row, pda.bits))
        row = pda.advance(*row, 1)
        if row[2] * pda.bits > lark_pda_tables.STACK_BITS:
            break
    logits = torch.zeros(len(states), len(texts))
    table.mask(logits, torch.stack(states))
    opens = (logits[:, 1] == 0).tolist()
    assert opens[:-1] == [True] * (len(states) - 1) and opens[-1] is False
    assert bool(logits[-1, 3] == 0) and bool(logits[-1, 2] == float("-inf"))  # "]" pushes nothing; "1" calls a value
    _kernel_agrees(table, torch.stack(states), logits)


def test_loading_and_unloading_gives_back_rows_and_effects():
    texts = [None, "[", "]", "{", "}", ",", "k", ":", "1"]
    tables = compile_lark_pda(JSONISH, [t.encode() if t else None for t in texts], [EOS], len(texts))
    table = GrammarTable(capacity=64, vocab_size=len(texts), device="cpu", pda_effects=2 * len(tables.effects))
    a, b = table.load(tables), table.load(tables)
    with pytest.raises(NotRegular, match="stack effects"):
        table.load(tables)
    assert table.rows.runs == [(b + tables.num_states, 64 - b - tables.num_states)]  # the refused load's rows back
    table.unload(a, tables.num_states)
    assert int(table.pda[a]) == 0 and int(table.pda[b]) != 0
    assert table.load(tables) == a
    table.unload(a, tables.num_states)
    table.unload(b, tables.num_states)
    assert table.rows.runs == [(1, 63)] and table.pda_effect_runs.runs == [(1, 2 * len(tables.effects))]
    with pytest.raises(ValueError, match="Lark PDA effects"):  # effect ids are int16 in next
        GrammarTable(capacity=64, vocab_size=len(texts), device="cpu", pda_effects=2**15)


TWO_BRACKETS = 'start: v\nv: "[" [v ("," v)*] "]" | "{" [v ("," v)*] "}" | "1"\n'


def test_several_bracket_types_compile_to_a_pushdown_automaton():
    tokens = [None, b"[", b"]", b"{", b"}", b",", b"1", b"[1", b"1]", b"],", b"},"]
    dfas = TokenDFAs(GrammarTable(capacity=256, vocab_size=len(tokens), device="cpu"), tokens, [EOS])
    assert isinstance(dfas.compile_apart((NESTED_LARK, TWO_BRACKETS)), PDATables)
    # Not LL(1) at the character level: no DFA within the table and no PDA, and the reason says both.
    ambiguous = 'start: a\na: "x" a? "x" | "[" a "]" | "{" a "}"\n'
    reason = dfas.compile_apart((NESTED_LARK, ambiguous))
    assert isinstance(reason, NotRegular) and "pushdown automaton" in str(reason) and "LL(1)" in str(reason)


# 65 return points (64 call sites in v, one in start) need 7 bits an entry, more than an effect reads.
MANY_CALLS = "start: v\nv: " + " | ".join(f'"{chr(0x100 + i)}" v "{chr(0x100 + i)}"' for i in range(64)) + ' | "x"\n'


@pytest.mark.parametrize("grammar, message", [
    ('start: a\na: "(" a ")"\n', "never ends"),
    (MANY_CALLS, "return points"),
    ('start: "x" | %json {"type": "object"}', "no recursive transition network"),
])
def test_grammars_without_a_device_automaton_say_why(grammar, message):
    with pytest.raises(NotRegular, match=message):
        compile_lark_pda(grammar, [None, b"(", b")", b"x"], [EOS], 4)


def test_the_engine_decodes_two_bracket_types_on_the_device(monkeypatch):
    """Greedy outputs of the built-in model under a grammar of lists and objects: every
    request is masked on the device, decode rounds give single steps' tokens, and each output
    that stops parses under Lark's Earley parser."""
    grammar = 'start: "[" v ("," v)* "]"\nv: "[" [v ("," v)*] "]" | "{" [pair ("," pair)*] "}" | NUMBER\n' \
              'pair: "\\"k\\"" ":" v\nNUMBER: /[0-9]/\n'
    prompts = ['[{"k":[1,[2]]},[3,{"k":5}]]\n[{"k":[4,[1]]},[2,{"k":7}]]\n', '[[1,{"k":2}],{"k":[3]}]\n[[5,{"k":6}],{"k":[8]}]\n',
               '[{"k":{"k":[1]}}]\n[{"k":{"k":[2]}}]\n']
    params = SamplingParams(max_tokens=32, temperature=0.0, structured_output=grammar_for_lark(grammar))
    seen = []
    watch_round_starts(monkeypatch, lambda rounds_object, seqs, rounds, chained, slots: seen.append(list(slots or [])))
    # Its unrolled DFA (seconds in interegular, then refused as too large) is tried once for both engines.
    monkeypatch.setattr(token_dfa, "lark_fsm", functools.cache(token_dfa.lark_fsm))

    eng, in_rounds = decode(prompts, [params] * 3, rounds=4)
    assert eng.structured.requests_by_path == {"device": 3, "host": 0}
    assert any(slots and max(slots) > 0 for slots in seen)  # constrained rows ran in decode rounds
    seen.clear()
    assert decode(prompts, [params] * 3, rounds=1)[1] == in_rounds and not seen
    parser = lark.Lark(grammar, parser="earley")
    stopped = [text for _, text, reason in in_rounds if reason == "stop"]
    assert stopped, in_rounds
    for text in stopped:
        parser.parse(text)
    for _, text, _ in in_rounds:  # what ran out of tokens is still a prefix of the language
        assert lark_rtn(grammar).run(text) is not None


# Lark's own JSON grammar, as its documentation writes it (common.ESCAPED_STRING read as a JSON string).
LARK_JSON = r'''
?start: value
?value: object | array | string | SIGNED_NUMBER -> number | "true" -> true | "false" -> false | "null" -> null
array  : "[" [value ("," value)*] "]"
object : "{" [pair ("," pair)*] "}"
pair   : string ":" value
string : ESCAPED_STRING
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
'''


def test_larks_json_grammar_decodes_on_the_device():
    """The grammar users paste: decoded on the device (its nested DFA is too large); every output is a
    prefix of its language, and a value the model finished parses under Lark's own parser of it (the
    built-in code model writes newlines after it, which %ignore WS allows, until max_tokens)."""
    params = SamplingParams(max_tokens=40, temperature=0.0, structured_output=grammar_for_lark(LARK_JSON))
    prompts = ['{"name": "vibee", "tags": ["a", "b"], "size": {"w": 1, "h": 2.5}}\n{"name": ',
               '[{"id": 1, "ok": true}, {"id": 2, "ok": null}]\n[{"id": 3, ']
    eng, outs = decode(prompts, [params] * 2, rounds=4)
    assert eng.structured.requests_by_path == {"device": 2, "host": 0}
    parser, rtn = lark.Lark(LARK_JSON), lark_rtn(LARK_JSON)
    finished = 0
    for _, text, reason in outs:
        assert rtn.run(text) is not None, text
        if reason == "stop" or rtn.accepts(text):
            parser.parse(text)
            finished += 1
    assert finished, outs


@pytest.mark.parametrize("logits", ["*bf16", "*fp32"])
def test_the_mask_kernel_compiles_for_sm90(logits):
    """One kernel masks free, DFA, JSON-mode and Lark PDA rows: it compiles for an H100/H200 here."""
    from vibee.runtime.grammar_table import PDA_IDS_SHIFT, PDA_ROW

    names = ["logits_ptr", "stride_row", "bits_ptr", "stride_bits", "states_ptr", "width", "vocab", "effect_ptr",
             "stride_effect", "effects_ptr", "json_rows", "next_ptr", "stride_next", "pda_ptr", "pda_effects_ptr"]
    types = [logits, "i32", "*i32", "i32", "*i64", "i32", "i32", "*i16", "i32", "*i64", "i32", "*i16", "i32", "*i64", "*i64"]
    constexprs = {"PDA_ROW": PDA_ROW, "PDA_IDS_SHIFT": PDA_IDS_SHIFT, "FIELDS": lark_pda_tables.EFFECT_FIELDS,
                  "VALID": lark_pda_tables.VALID, "WIDTH": lark_pda_tables.WIDTH, "CHECKS_STACK": lark_pda_tables.CHECKS_STACK,
                  "FINAL": lark_pda_tables.FINAL, "NEED_SHIFT": lark_pda_tables.FINAL_NEED_SHIFT, "NEED_OFFSET": lark_pda_tables.NEED_OFFSET,
                  "STACK_BITS": lark_pda_tables.STACK_BITS, "BLOCK": 1024}
    ptx = ptx_for_sm90("vibee.runtime.token_mask_kernel", "_token_bitmask_kernel", dict(zip(names, types)), constexprs,
                       num_warps=4)
    assert ".target sm_90" in ptx and "st.global" in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_two_bracket_types_run_in_captured_rounds():
    """The built-in model in float32 with real CUDA graphs: requests under a grammar of lists and
    objects beside a free one, decoded in captured rounds (the kernel's effect test and the stack's
    advance inside the graph), give per-step decoding's tokens; what stops parses."""
    grammar = 'start: "[" v ("," v)* "]"\nv: "[" [v ("," v)*] "]" | "{" [pair ("," pair)*] "}" | NUMBER\n' \
              'pair: "\\"k\\"" ":" v\nNUMBER: /[0-9]/\n'
    constrained = SamplingParams(max_tokens=48, temperature=0.0, structured_output=grammar_for_lark(grammar))
    params = [constrained, constrained, SamplingParams(max_tokens=24, temperature=0.0)]

    prompts = ['[[1,{"k":2}],{"k":[3]}]\n', '[{"k":[1]}]\n', "def f("]
    eng, in_rounds = decode(prompts, params, rounds=4, device="cuda")
    assert eng.multi_step is not None and eng.multi_step.rounds.round_graphs
    assert eng.structured.requests_by_path["device"] == 2
    _, per_step = decode(prompts, params, rounds=1, device="cuda")
    assert in_rounds == per_step
    parser = lark.Lark(grammar, parser="earley")
    for _, text, reason in in_rounds[:2]:
        if reason == "stop":
            parser.parse(text)
        else:
            assert lark_rtn(grammar).run(text) is not None


def test_forced_text_keeps_to_the_tokenizers_spelling():
    """Where the grammar forces `"key":` and the tokenizer writes it as `"` + `key"` + `:`, only `"` is
    allowed there (not `"k`, which also spells a prefix), as token_dfa does; text the tokenizer does
    not spell back, and states with a choice, are left as they are."""
    grammar = 'start: v\nv: "{" "\\"key\\"" ":" v "}" | "[" [v ("," v)*] "]" | "1"\n'
    texts = [None, "{", '"', 'key"', '"k', 'ey"', ":", "}", "[", "]", ",", "1", "k"]
    spelled = {'"key":': [2, 3, 6]}  # the tokenizer's ids of the forced text (others: not spelled back)
    pda = LarkPDA(lark_rtn(grammar), texts)
    after_brace = pda.advance(*pda.start(), 1)
    assert pda.allowed(*after_brace) == [2, 4]
    assert pda.keep_canonical_forced_text(lambda text: spelled.get(text, [0, 0])) == 1
    assert pda.allowed(*after_brace) == [2]
    assert pda.allowed(*pda.advance(*after_brace, 2)) == [3, 12]  # the rest of the key: one token or a piece
    tables = compile_lark_pda(grammar, [t.encode() if t else None for t in texts], [EOS], len(texts),
                              encode=lambda text: spelled.get(text, [0, 0]))
    table = GrammarTable(capacity=64, vocab_size=len(texts), device="cpu")
    first = table.load(tables)
    logits = torch.zeros(1, len(texts))
    table.mask(logits, _state(first, after_brace, pda.bits)[None])
    assert torch.nonzero(logits[0] == 0).flatten().tolist() == [2]


@pytest.mark.parametrize("name", sorted(VOCABULARIES))
def test_a_row_at_the_stack_limit_can_always_finish(name):
    """Walks on the device table that take the token leaving the deepest stack, then the shallowest:
    no row ever has nothing allowed (a token is refused where what it leaves could not be finished
    within the stack's bits), and every walk ends with the end token."""
    grammar, vocabulary = VOCABULARIES[name]
    texts = [None, *vocabulary]
    tables = compile_lark_pda(grammar, [t.encode() if t else None for t in texts], [EOS], len(texts))
    table = GrammarTable(capacity=64, vocab_size=len(texts), device="cpu")
    state = torch.tensor([table.load(tables)])
    rng = random.Random(0)
    deepest = 0
    for step in range(400):
        logits = torch.zeros(1, len(texts))
        table.mask(logits, state)
        allowed = torch.nonzero(logits[0] == 0).flatten().tolist()
        assert allowed, (name, step, [int(x) for x in unpack(state)])
        if EOS in allowed and (step >= 100 or allowed == [EOS]):
            break
        allowed = [t for t in allowed if t != EOS]
        depths = unpack(table.advance(state.expand(len(allowed)), torch.tensor(allowed)))[1].tolist()
        # opening: the deepest, then one after which a bracket may open; closing: a token that ends a
        # value before one that goes on, then the shallowest
        scores = [(-d, texts[t][-1] not in "[{(,:+-") if step < 100 else (texts[t][-1] in ",:+- ", d)
                  for t, d in zip(allowed, depths)]
        token = rng.choice([t for t, score in zip(allowed, scores) if score == min(scores)])
        state = table.advance(state, torch.tensor([token]))
        deepest = max(deepest, int(unpack(state)[1]))
    else:
        raise AssertionError(f"{name}: no end token after 300 closing steps")
    assert deepest > lark_pda_tables.STACK_BITS - 8 or name == "tail calls between rules"  # the walk reached the limit


def test_every_row_near_the_stack_limit_has_a_token_to_write():
    """Opening "[" as long as it is allowed, then every sequence of up to four allowed tokens: each row
    reached allows a token (the kernel masks as the torch path does). "[1" opens two values at once, and what follows the inner one must nest
    twice (m1, then m2): it is refused where that would not fit, though "[1" itself ends shallower."""
    grammar, vocabulary = VOCABULARIES["deep continuations"]
    texts = [None, *vocabulary]
    tables = compile_lark_pda(grammar, [t.encode() if t else None for t in texts], [EOS], len(texts))
    table = GrammarTable(capacity=64, vocab_size=len(texts), device="cpu")
    state = torch.tensor([table.load(tables)])

    def allowed(states: torch.Tensor) -> list[list[int]]:
        logits = torch.zeros(len(states), len(texts))
        table.mask(logits, states)
        _kernel_agrees(table, states, logits)
        return [torch.nonzero(row == 0).flatten().tolist() for row in logits]

    while texts.index("[") in allowed(state)[0]:
        state = table.advance(state, torch.tensor([texts.index("[")]))
    assert int(unpack(state)[1]) > lark_pda_tables.STACK_BITS - 2 * tables.bits - 3
    rows = state
    for _ in range(4):
        options = allowed(rows)
        assert all(options), [int(x) for x in unpack(rows[[i for i, o in enumerate(options) if not o]])[1]]
        pairs = [(i, t) for i, o in enumerate(options) for t in o if t != EOS]
        rows = table.advance(rows[[i for i, _ in pairs]], torch.tensor([t for _, t in pairs]))
