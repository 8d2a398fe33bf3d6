"""The device half of token-DFA constraints (token_dfa.py): logits of the tokens a row's state
does not allow set to -inf, reading the state's bitmask (one bit a token), in one launch for the
batch. A row in the free state (0) reads and writes nothing, so unconstrained rows cost nothing
beyond their state's load; a decode round can run it for every row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_bitmask_kernel(logits_ptr, stride_row, bits_ptr, stride_bits, states_ptr, width, vocab,
                          effect_ptr, stride_effect, effects_ptr, json_rows, BLOCK: tl.constexpr):
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
    # Columns past the table (logits wider than the vocabulary) are never allowed to a constrained row.
    forbid = constrained & (cols < width) & ~(allowed & in_table)
    tl.store(logits_ptr + row.to(tl.int64) * stride_row + cols, float("-inf"), mask=forbid)


def apply_token_bitmask(logits: torch.Tensor, bits: torch.Tensor, states: torch.Tensor, vocab: int,
                        effect: torch.Tensor, effects: torch.Tensor, json_rows: int) -> None:
    """logits [B, width] (last dimension contiguous) masked in place by rows bits[states[i]]
    of the grammar table (a state packs its row with JSON mode's stack: grammar_table.pack);
    vocab: the columns the table covers; effect, effects, json_rows: JSON mode's stack effects."""
    rows, width = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("the logits' last dimension must be contiguous")
    block = 1024
    _token_bitmask_kernel[(rows, triton.cdiv(width, block))](
        logits, logits.stride(0), bits, bits.stride(0), states, width, vocab, effect, effect.stride(0), effects,
        json_rows, BLOCK=block, num_warps=4)
