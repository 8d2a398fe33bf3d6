"""The device half of token-DFA constraints (token_dfa.py): logits of the tokens a row's state
does not allow set to -inf, reading the state's bitmask (one bit a token), in one launch for the
batch. A row in the free state (0) reads and writes nothing, so unconstrained rows cost nothing
beyond their state's load; a decode round can run it for every row. The rows of pushdown automata
(grammar_table.py) also test each allowed token's stack effect against the row's stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from vibee.runtime import lark_pda_tables
from vibee.runtime.grammar_table import PDA_IDS_SHIFT, PDA_ROW

if TYPE_CHECKING:
    from vibee.runtime.grammar_table import GrammarTable


@triton.jit
def _token_bitmask_kernel(logits_ptr, stride_row, bits_ptr, stride_bits, states_ptr, width, vocab,
                          effect_ptr, stride_effect, effects_ptr, json_rows,
                          next_ptr, stride_next, pda_ptr, pda_effects_ptr,
                          PDA_ROW: tl.constexpr, PDA_IDS_SHIFT: tl.constexpr, FIELDS: tl.constexpr,
                          VALID: tl.constexpr, WIDTH: tl.constexpr, CHECKS_STACK: tl.constexpr, FINAL: tl.constexpr,
                          NEED_SHIFT: tl.constexpr, NEED_OFFSET: tl.constexpr, STACK_BITS: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    packed = tl.load(states_ptr + row).to(tl.int64)
    state = packed & 0xFFFF
    depth = (packed >> 16) & 63
    stack = packed >> 22
    constrained = state != 0
    in_table = cols < vocab
    words = tl.load(bits_ptr + state * stride_bits + cols // 32, mask=constrained & in_table, other=-1)
    allowed = ((words >> (cols % 32)) & 1) != 0
    # JSON mode's rows: a token's stack effect must fit the row's stack (json_pda.effect_allows).
    in_json = (state >= 1) & (state <= json_rows)
    ids = tl.load(effect_ptr + (state - 1) * stride_effect + cols, mask=in_json & in_table, other=0).to(tl.int64)
    e = effects_ptr + ids * 8  # fields as json_pda.py numbers them: 3 NEED_O_BITS, 4 NEED_A_BITS, 5 MIN_DEPTH,
    need_o = tl.load(e + 3)  # 6 MAX_DEPTH_BEFORE, 7 EXACT_DEPTH
    exact = tl.load(e + 7)
    fits = ((depth >= tl.load(e + 5)) & ((stack & need_o) == need_o) & ((stack & tl.load(e + 4)) == 0)
            & (depth <= tl.load(e + 6)) & ((exact < 0) | (depth == exact)))
    allowed = allowed & fits
    # A Lark PDA's rows (lark_pda.py): next holds each token's effect id; the effect's bit for the
    # combo of the stack's top entries must be set, the combo's outcome must leave a row that can be
    # finished within the stack's bits (its need, in the outcome), and an end token needs a stack
    # whose every entry returns where its caller may end (return ids at most the row's accepting ones).
    meta = tl.load(pda_ptr + state)
    in_pda = (meta & PDA_ROW) != 0
    bits = meta & 0xFF
    lanes = tl.arange(0, 64)
    shifts = lanes * bits
    entries = (stack >> tl.minimum(shifts, 62)) & ((tl.full([64], 1, tl.int64) << bits) - 1)
    may_end = tl.sum(((shifts < STACK_BITS) & (entries > ((meta >> PDA_IDS_SHIFT) & 0xFF))).to(tl.int32), axis=0) == 0
    pda_cols = in_pda & in_table & allowed
    ids = tl.load(next_ptr + state * stride_next + cols, mask=pda_cols, other=0).to(tl.int64)
    e = pda_effects_ptr + tl.maximum(ids, 0) * FIELDS
    valid = tl.load(e + VALID, mask=pda_cols, other=0)
    combo = stack & ((tl.full([BLOCK], 1, tl.int64) << tl.load(e + WIDTH, mask=pda_cols, other=0)) - 1)
    need = ((tl.load(e + FINAL + combo, mask=pda_cols, other=0) >> NEED_SHIFT) & 127) - NEED_OFFSET
    ok = (((valid >> combo) & 1) != 0) & (depth + need <= STACK_BITS)
    ok = ok & ((tl.load(e + CHECKS_STACK, mask=pda_cols, other=0) == 0) | may_end)
    allowed = allowed & (ok | ~in_pda)
    # Columns past the table (logits wider than the vocabulary) are never allowed to a constrained row.
    forbid = constrained & (cols < width) & ~(allowed & in_table)
    tl.store(logits_ptr + row.to(tl.int64) * stride_row + cols, float("-inf"), mask=forbid)


def apply_token_bitmask(logits: torch.Tensor, table: GrammarTable, states: torch.Tensor) -> None:
    """logits [B, width] (last dimension contiguous) masked in place by the grammar table's rows
    for states (a state packs its row with a pushdown automaton's stack: grammar_table.pack)."""
    rows, width = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("the logits' last dimension must be contiguous")
    block = 1024
    _token_bitmask_kernel[(rows, triton.cdiv(width, block))](
        logits, logits.stride(0), table.bits, table.bits.stride(0), states, width, min(width, table.vocab_size),
        table.effect, table.effect.stride(0), table.effects, table.json_rows,
        table.next, table.next.stride(0), table.pda, table.pda_effects,
        PDA_ROW=PDA_ROW, PDA_IDS_SHIFT=PDA_IDS_SHIFT, FIELDS=lark_pda_tables.EFFECT_FIELDS, VALID=lark_pda_tables.VALID,
        WIDTH=lark_pda_tables.WIDTH, CHECKS_STACK=lark_pda_tables.CHECKS_STACK, FINAL=lark_pda_tables.FINAL,
        NEED_SHIFT=lark_pda_tables.FINAL_NEED_SHIFT, NEED_OFFSET=lark_pda_tables.NEED_OFFSET, STACK_BITS=lark_pda_tables.STACK_BITS,
        BLOCK=block, num_warps=4)
