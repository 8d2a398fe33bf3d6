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
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    state = tl.load(states_ptr + row).to(tl.int64)
    constrained = state != 0
    in_table = cols < vocab
    words = tl.load(bits_ptr + state * stride_bits + cols // 32, mask=constrained & in_table, other=-1)
    allowed = ((words >> (cols % 32)) & 1) != 0
    # Columns past the table (logits wider than the vocabulary) are never allowed to a constrained row.
    forbid = constrained & (cols < width) & ~(allowed & in_table)
    tl.store(logits_ptr + row.to(tl.int64) * stride_row + cols, float("-inf"), mask=forbid)


def apply_token_bitmask(logits: torch.Tensor, bits: torch.Tensor, states: torch.Tensor, vocab: int) -> None:
    """logits [B, width] (last dimension contiguous) masked in place by rows bits[states[i]]
    of the grammar table; vocab: the columns the table covers."""
    rows, width = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("the logits' last dimension must be contiguous")
    block = 1024
    _token_bitmask_kernel[(rows, triton.cdiv(width, block))](
        logits, logits.stride(0), bits, bits.stride(0), states, width, vocab, BLOCK=block, num_warps=4)
