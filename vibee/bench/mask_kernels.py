"""`vibee bench kernels --only token_mask`: a decode step's grammar masking and advance on the
device table (grammar_table.py), every row constrained, for each kind of row it holds: token-DFA
rows, JSON mode's pushdown automaton and a Lark grammar's. Each against the plain torch way (each
state's allowed tokens as a bool row, gathered and masked_fill'ed), held to the copy bandwidth
measured in the same run."""

from __future__ import annotations

import numpy as np
import torch

from vibee.bench.kernels import Timing, copy_ceiling, time_call


def bench_token_mask(shape: dict, dtype, device) -> Timing:
    """Token-DFA rows: each row's state's bitmask read and the logits it forbids set to -inf, then
    the states advanced by the drawn tokens. The states allow about half the vocabulary each."""
    from vibee.runtime.grammar_table import GrammarTable
    from vibee.runtime.token_dfa import TokenDFA

    b, v, n = shape["batch"], shape["vocab"], 63
    rng = np.random.default_rng(0)
    allowed = rng.random((n, v)) < 0.5
    dfa = TokenDFA(np.where(allowed, rng.integers(0, n, (n, v)), -1).astype(np.int32), np.zeros(n, dtype=bool))
    table = GrammarTable(capacity=n + 1, vocab_size=v, device=device)
    first = table.load(dfa)
    states = torch.from_numpy(first + rng.integers(0, n, b)).to(device)
    return _time_masking("grammar token mask (token DFA)", "torch bool-row gather + masked_fill_", table, states, states,
                         allowed, _moved(table, b, v, dtype, effect_ids=False), rng, device, dtype)


def bench_json_mask(shape: dict, dtype, device) -> Timing:
    """JSON mode's rows (json_pda.py): each row in a state of the automaton with a stack of open
    containers, so every token's stack effect is checked against the row's stack too. Against the
    torch bool-row gather of the DFA part alone."""
    from vibee.runtime.grammar_table import GrammarTable, pack
    from vibee.runtime.json_pda import compile_json_pda

    b, v = shape["batch"], shape["vocab"]
    rng = np.random.default_rng(0)
    tokens = _json_like_vocabulary(v, rng)
    pda = compile_json_pda(tokens, [v - 1], v)
    table = GrammarTable(capacity=GrammarTable.JSON_ROWS + 2, vocab_size=v, device=device, json_mode=True)
    first = table.load(pda)
    depth = rng.integers(1, 12, b)
    stack = np.array([int(rng.integers(0, 2**int(d))) for d in depth])
    states = pack(torch.from_numpy(first + rng.integers(0, pda.num_states - 1, b)), torch.from_numpy(depth),
                  torch.from_numpy(stack)).to(device)
    return _time_masking("grammar token mask (JSON mode)", "torch bool-row gather + masked_fill_ (no stack)", table,
                         states, (states & 0xFFFF) - first + 1, pda.next >= 0, _moved(table, b, v, dtype, effect_ids=True),
                         rng, device, dtype)


def bench_lark_mask(shape: dict, dtype, device) -> Timing:
    """A Lark grammar's pushdown-automaton rows (lark_pda.py): BENCH_LARK_JSON's lists and objects
    with strings, each allowed token's effect read and tested against the row's stack of return
    points. Each row is brought to its state by 16 tokens sampled under the mask, those that open a
    list or an object favoured, so that rows hold stacks. Against the torch bool-row gather of the
    tokens some stack allows."""
    from vibee.bench.throughput import BENCH_LARK_JSON
    from vibee.runtime.grammar_table import GrammarTable
    from vibee.runtime.lark_pda_tables import compile_lark_pda

    b, v = shape["batch"], shape["vocab"]
    rng = np.random.default_rng(0)
    tokens = _json_like_vocabulary(v, rng)
    tables = compile_lark_pda(BENCH_LARK_JSON, tokens, [v - 1], v)
    table = GrammarTable(capacity=tables.num_states + 2, vocab_size=v, device=device)
    first = table.load(tables)
    states = torch.full((b,), first, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    opens = torch.tensor([4.0 * (t is not None and t[:1] in (b"[", b"{")) for t in tokens], device=device)
    for _ in range(16):
        logits = opens.expand(b, v).clone()
        table.mask(logits, states)
        logits[:, v - 1] = float("-inf")  # no end token: the rows stay inside the grammar
        states = table.advance(states, torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0])
    return _time_masking("grammar token mask (Lark PDA)", "torch bool-row gather + masked_fill_ (no stack)", table,
                         states, (states & 0xFFFF) - first + 1, tables.effect > 0,
                         _moved(table, b, v, dtype, effect_ids=True), rng, device, dtype)


def _json_like_vocabulary(v: int, rng: np.random.Generator) -> list[bytes | None]:
    """v - 1 random tokens of 1-7 bytes from JSON's characters and a few letters (their effects are
    those a real vocabulary's have), then an end token."""
    alphabet = np.frombuffer(b'{}[]",:0123456789-.eEtrufalsn abcxyz\\', dtype=np.uint8)
    return [bytes(rng.choice(alphabet, size=int(rng.integers(1, 8))).tolist()) for _ in range(v - 1)] + [None]


def _moved(table, b: int, v: int, dtype, effect_ids: bool) -> int:
    """Bytes a step's mask moves: the logits once, each row's bitmask, and each token's effect id."""
    logits = b * v * torch.empty(0, dtype=dtype).element_size()
    return logits + b * table.words * 4 + (b * v * 2 if effect_ids else 0)


def _time_masking(label: str, baseline: str, table, states: torch.Tensor, rows: torch.Tensor, allowed: np.ndarray,
                  moved: int, rng: np.random.Generator, device: str, dtype) -> Timing:
    """The grammar table's mask and advance of `states` by random tokens, against the torch
    bool-row gather and masked_fill_ of the same table `rows` (allowed: a bool row per state, row 0
    the free one prepended here)."""
    b, v = len(states), table.vocab_size
    logits = torch.randn(b, v, dtype=dtype, device=device)
    tokens = torch.from_numpy(rng.integers(0, v, b)).to(device)
    allowed_d = torch.from_numpy(np.concatenate([np.ones((1, v), dtype=bool), allowed])).to(device)

    def ours():
        table.mask(logits, states)
        table.advance(states, tokens)

    def torch_mask():
        logits.masked_fill_(~allowed_d[rows], float("-inf"))
        table.next[rows, tokens]

    return Timing(label, f"B{b} V{v}", "TB/s", moved, time_call(ours, device), baseline,
                  time_call(torch_mask, device), *copy_ceiling(device, dtype))
