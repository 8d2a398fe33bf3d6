"""Temperature sampling of a batch in one Triton kernel: the Gumbel-max trick.

argmax(x / T - log E), E ~ Exponential(1) per token, draws a token with probability
softmax(x / T), the same distribution as the sampler's exponential race argmax(p / E) (take the
log of p / E), without the softmax. A row with temperature 0 takes argmax(x), noise-free. So a
batch of plain rows (no penalties, top-k, top-p or min-p) is one pass over its logits in their
own dtype, instead of ~10 passes over a float32 copy: at batch 256 over a 128K vocabulary that
was 0.8 ms of a 3.9 ms decode step (Llama-3.2-1B shape, H200).

The noise is Philox, keyed by a seed the caller draws from its generator on the device (so no
value comes back to the host) and by each token's (row, column): seeded runs repeat.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # vocabulary columns one iteration of a program reads
MAX_CHUNKS = 64  # programs a row's vocabulary is split over


def gumbel_sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor, *, block: int = BLOCK,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens (long [n]) drawn from softmax(logits / temperatures[:, None]) row by row; a row
    with temperature 0 takes its argmax (the first column of the largest logit, as torch's; NaN
    counts as the largest, as there). logits
    [n, vocab] (any float dtype, last dimension contiguous), temperatures float32 [n], seed int64
    [1], all on one device (on a CPU the kernel needs TRITON_INTERPRET=1). block: columns per
    iteration (a power of 2; the draws don't depend on it); out: where to write the tokens (long [n]).

    A row's vocabulary is split over up to MAX_CHUNKS programs, whose bests a second kernel picks
    from: at batch 1 one program walking a 128K vocabulary alone reads its 126 blocks one after
    another on one SM while the rest of the GPU idles."""
    return _launch(logits, temperatures, seed, block, out, noisy=True)


def argmax_rows(logits: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) (long [n]; into `out` if given): on CUDA by triton_argmax_rows,
    elsewhere by torch (the interpreter is reached through triton_argmax_rows alone)."""
    if logits.is_cuda:
        return triton_argmax_rows(logits, out=out)
    return torch.argmax(logits, dim=-1, out=out)


def triton_argmax_rows(logits: torch.Tensor, *, block: int = BLOCK, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's argmax as torch.argmax gives it (the first column of the largest logit; NaN counts
    as the largest) by the sampling kernels without noise: a row's vocabulary split over up to
    MAX_CHUNKS programs. torch's own argmax of one 128K row is one reduction walked by few SMs
    (`vibee profile --batch-size 1`, H100: 27.7 us of a 1.0 ms Llama-3.2-1B decode step)."""
    return _launch(logits, logits, logits, block, out, noisy=False)


def _launch(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor, block: int, out: torch.Tensor | None,
            *, noisy: bool) -> torch.Tensor:
    """The kernels over logits: one program a row where one chunk covers it, else up to MAX_CHUNKS
    a row and _pick_kernel. Without noise, temperatures and seed are not read."""
    n, vocab = logits.shape
    if n * vocab >= 2**31:
        raise ValueError(f"{n} rows of {vocab} logits: the kernels' offsets and noise counter are 32-bit (fewer rows per call)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if out is None:
        out = torch.empty(n, dtype=torch.long, device=logits.device)
    if not n:
        return out
    chunks = max(1, min(MAX_CHUNKS, triton.cdiv(vocab, block)))
    chunk_len = triton.cdiv(triton.cdiv(vocab, chunks), block) * block
    chunks = triton.cdiv(vocab, chunk_len)
    if chunks == 1:
        _gumbel_kernel[(n, 1)](logits, logits.stride(0), temperatures, seed, out, out, vocab, chunk_len, 1,
                               BLOCK=block, FINAL=True, NOISY=noisy)
        return out
    scores = torch.empty((n, chunks), dtype=torch.float32, device=logits.device)
    cols = torch.empty((n, chunks), dtype=torch.int32, device=logits.device)
    _gumbel_kernel[(n, chunks)](logits, logits.stride(0), temperatures, seed, scores, cols, vocab, chunk_len, chunks,
                                BLOCK=block, FINAL=False, NOISY=noisy)
    _pick_kernel[(n,)](scores, cols, out, chunks, CHUNKS=triton.next_power_of_2(chunks))
    return out


@triton.jit
def _best(scores, cols):
    """The largest score and its first column (ties go to the lowest column, as torch.argmax)."""
    top = tl.max(scores, axis=0)
    return top, tl.min(tl.where(scores == top, cols, 2147483647), axis=0)


@triton.jit
def _gumbel_kernel(logits_ptr, stride_row, temps_ptr, seed_ptr, score_ptr, col_ptr, vocab, chunk_len, chunks,
                   BLOCK: tl.constexpr, FINAL: tl.constexpr, NOISY: tl.constexpr):
    """Program (row, c) walks columns [c * chunk_len, (c + 1) * chunk_len) in blocks, keeping a
    running (best score, its first column) per lane, then the chunk's best: the row's token
    (FINAL, one chunk) or its chunk's entry for _pick_kernel. NOISY False: every row's argmax,
    no temperature or seed read and no noise drawn."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if NOISY:
        temp = tl.load(temps_ptr + row)
        noisy = temp > 0.0
        inv_t = tl.where(noisy, 1.0 / tl.where(noisy, temp, 1.0), 1.0)
        seed = tl.load(seed_ptr)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.full([BLOCK], 2147483647, tl.int32)
    first = chunk * chunk_len
    for start in range(first, first + chunk_len, BLOCK):
        cols = start + lanes
        valid = cols < vocab
        x = tl.load(logits_ptr + row * stride_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        # NaN counts as the largest logit, as in torch.argmax: a row of NaN (a numerical fault
        # upstream) still names a column, not 2^31 - 1, which the next step's embedding gather
        # would fault on, taking every request on the GPU down with it.
        x = tl.where(x != x, float("inf"), x)
        if NOISY:
            u = tl.rand(seed, row * vocab + cols)
            # E = -log(u) > 0; u == 0 would make E infinite (a token that can never win), fine.
            e = tl.maximum(-tl.log(u), 1.1754943508222875e-38)
            score = tl.where(noisy, x * inv_t - tl.log(e), x)
        else:
            score = x
        score = tl.where(valid, score, float("-inf"))
        # A -inf row still names a column (as argmax would): the first one seen.
        better = (score > best) | ((best_col == 2147483647) & valid)
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
    top, col = _best(best, best_col)
    if FINAL:
        tl.store(col_ptr + row, col.to(tl.int64))
    else:
        tl.store(score_ptr + row * chunks + chunk, top)
        tl.store(col_ptr + row * chunks + chunk, col)


@triton.jit
def _pick_kernel(score_ptr, col_ptr, out_ptr, chunks, CHUNKS: tl.constexpr):
    """A row's token: the best of its chunks' bests."""
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS)
    valid = offs < chunks
    scores = tl.load(score_ptr + row * chunks + offs, mask=valid, other=float("-inf"))
    cols = tl.load(col_ptr + row * chunks + offs, mask=valid, other=2147483647)
    _, col = _best(scores, cols)
    tl.store(out_ptr + row, col.to(tl.int64))
