"""The one-pass sampling kernel (vibee/runtime/sampling_kernel.py) against an independent torch
computation of the same draws, and its distribution against softmax(x / T).

On a CPU the kernel runs under TRITON_INTERPRET=1 (the README's test command sets it) at about
10 ms a row, so these use few rows; the GPU test draws 20,000."""

from __future__ import annotations

import math
import os
from collections import Counter

import pytest
import torch
import triton
import triton.language as tl

from vibee.runtime.sampler import Sampler, SamplingRow
from vibee.runtime.sampling_kernel import argmax_rows, gumbel_sample, triton_argmax_rows
from vibee.runtime.sampling_params import SamplingParams

needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOGITS = [2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.2]


@triton.jit
def _uniforms(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(tl.load(seed_ptr), offs), mask=offs < n)


def expected_tokens(logits: torch.Tensor, temps: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The kernel's draws computed in torch: the same Philox uniforms (counter row * vocab +
    column), then argmax(x / T - log E) with E = -log u; argmax(x) where T is 0."""
    n, vocab = logits.shape
    u = torch.empty(n * vocab, device=logits.device)
    _uniforms[(triton.cdiv(n * vocab, 1024),)](seed, u, n * vocab, BLOCK=1024)
    e = (-u.view(n, vocab).log()).clamp(min=torch.finfo(torch.float32).tiny)
    x = logits.float()
    noisy = temps > 0
    scores = torch.where(noisy[:, None], x / torch.where(noisy, temps, 1.0)[:, None] - e.log(), x)
    return scores.argmax(dim=-1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [64, 1024])
def test_kernel_draws_are_the_gumbel_max_of_its_noise(dtype, block):
    """Rows over several blocks of the vocabulary (vocab 300: five programs a row at block 64,
    one at 1024), temperatures from 0 to large, in the logits' own dtype: token for token the
    torch computation's."""
    torch.manual_seed(0)
    logits = (torch.randn(12, 300) * 3).to(dtype).to(DEVICE)
    temps = torch.tensor([1.0, 0.0, 0.3, 2.5, 1.0, 0.0, 0.7, 5.0, 1.0, 0.05, 1.2, 0.0], device=DEVICE)
    seed = torch.tensor([987654321], device=DEVICE)
    got = gumbel_sample(logits, temps, seed, block=block)
    assert got.tolist() == expected_tokens(logits, temps, seed).tolist()
    assert got[temps == 0].tolist() == logits[temps == 0].float().argmax(dim=-1).tolist()
    # The noise is keyed by the seed and by each row: another seed, or the same row moved, draws anew.
    again = gumbel_sample(logits, temps, seed, block=block)
    other = gumbel_sample(logits, temps, torch.tensor([5], device=DEVICE), block=64)
    assert again.tolist() == got.tolist() and other.tolist() != got.tolist()


@needs_kernels
def test_greedy_ties_go_to_the_first_column_as_torch_argmax():
    """Vocab 1040 at block 16 (65 blocks, past the 64-program cap): 33 programs of two blocks a row,
    the last one's second past the vocabulary. The tied columns sit in one program's two blocks (2
    and 17: lanes 2 and 1; 1007 and 1008: lanes 15 and 0), in different programs (2 and 900), and a
    row of -inf still names its first column."""
    logits = torch.zeros(4, 1040, device=DEVICE)
    logits[0, [17, 2]] = 1.0
    logits[1, [900, 2]] = 1.0
    logits[2, [1008, 1007]] = 1.0
    logits[3] = float("-inf")
    got = gumbel_sample(logits, torch.zeros(4, device=DEVICE), torch.tensor([1], device=DEVICE), block=16)
    assert got.tolist() == [2, 2, 1007, 0] == logits.argmax(dim=-1).tolist()
    assert triton_argmax_rows(logits, block=256).tolist() == [2, 2, 1007, 0]  # the graphs' argmax, no noise


@needs_kernels
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_count_as_the_largest_so_every_row_names_a_column(temperature):
    """A row of NaN logits (an upstream fault: a wrong int4 tile once gave whole rows of them) must
    still give a token of the vocabulary: 2^31 - 1 faulted the next step's embedding gather and
    ended the server. NaN wins as in torch.argmax; several tie to the first. (The programs of
    the ties test: vocab 1040 at block 16.)"""
    logits = torch.zeros(4, 1040, device=DEVICE)
    logits[0] = float("nan")
    logits[1, 700], logits[1, 5] = float("nan"), 3.0
    logits[2, [1000, 40]] = float("nan")
    logits[3, 592:] = float("nan")  # from the second block of program 18 on
    got = gumbel_sample(logits, torch.full((4,), temperature, device=DEVICE), torch.tensor([1], device=DEVICE), block=16)
    assert got.tolist() == [0, 700, 40, 592] == logits.argmax(dim=-1).tolist()
    assert triton_argmax_rows(logits, block=256).tolist() == [0, 700, 40, 592]


@needs_kernels
def test_kernel_keeps_minus_infinity_out_and_reads_strided_rows():
    logits = torch.full((3, 2 * 96), float("-inf"), device=DEVICE)
    logits[:, [5, 70]] = 0.0
    logits[:, 100] = 50.0  # outside the view: never read
    view = logits[:, :96]  # a row stride of 192 for 96 columns
    got = gumbel_sample(view, torch.ones(3, device=DEVICE), torch.tensor([1], device=DEVICE), block=32)
    assert set(got.tolist()) <= {5, 70}


def chi_square(counts: Counter, probs: list[float], draws: int) -> float:
    return sum((counts.get(i, 0) - draws * q) ** 2 / (draws * q) for i, q in enumerate(probs))


def merged(probs: list[float], counts: Counter, least: float) -> tuple[list[float], Counter]:
    """Tail tokens pooled into one bin until each bin expects `least` draws or more."""
    bins, bin_counts, mass, count = [], Counter(), 0.0, 0
    for i, q in enumerate(probs):
        mass, count = mass + q, count + counts.get(i, 0)
        if mass >= least or i == len(probs) - 1:
            bin_counts[len(bins)] = count
            bins.append(mass)
            mass, count = 0.0, 0
    return bins, bin_counts


def softmax(values: list[float], temperature: float) -> list[float]:
    m = max(values)
    w = [math.exp((v - m) / temperature) for v in values]
    return [x / sum(w) for x in w]


def sampled_counts(temperature: float, draws: int) -> Counter:
    """Draws through the Sampler's kernel path: rows of one distribution, each its own noise."""
    rows = [SamplingRow(SamplingParams(temperature=temperature), [], []) for _ in range(draws)]
    x = torch.tensor([LOGITS] * draws, device=DEVICE)
    return Counter(r.token_id for r in Sampler(seed=3, kernels=True).sample(x, rows))


@needs_kernels
def test_sampler_kernel_path_samples_softmax_over_temperature():
    draws = 320
    probs = softmax(LOGITS, 0.7)
    bins, counts = merged(probs, sampled_counts(0.7, draws), 12 / draws)
    # chi-square with <= 7 degrees of freedom exceeds 40 with probability < 1e-6.
    assert chi_square(counts, bins, draws) < 40.0, (counts, bins)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("temperature", [0.4, 1.0, 1.8])
def test_kernel_distribution_on_the_gpu(temperature):
    draws = 20000
    probs = softmax(LOGITS, temperature)
    bins, counts = merged(probs, sampled_counts(temperature, draws), 20 / draws)
    assert chi_square(counts, bins, draws) < 40.0, (counts, bins)


@needs_kernels
def test_sampler_takes_the_kernel_only_for_plain_rows():
    """Greedy rows beside random ones are their argmax; a row with top-k, penalties or its own
    generator sends the batch down the general path (whose draws the kernel never makes)."""
    torch.manual_seed(1)
    logits = torch.randn(4, 50, device=DEVICE) * 4
    s = Sampler(seed=0, kernels=True)
    rows = [SamplingRow(SamplingParams(temperature=t), [], []) for t in (0.0, 1.0, 0.0, 0.8)]
    assert s._fused(logits, rows)
    tokens = [r.token_id for r in s.sample(logits, rows)]
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    for other in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(repetition_penalty=1.1)):
        assert not s._fused(logits, rows[:3] + [SamplingRow(SamplingParams(temperature=0.8, **other), [], [])])
    g = torch.Generator(device=DEVICE)
    assert not s._fused(logits, rows[:3] + [SamplingRow(SamplingParams(temperature=0.8), [], [], g)])
    assert not s._fused(logits, [rows[0], rows[2]])  # all greedy: the plain argmax
    assert not Sampler(seed=0, kernels=False)._fused(logits, rows)


@needs_kernels
def test_kernel_path_logprobs_are_the_model_distribution():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]], device=DEVICE, dtype=torch.bfloat16)
    result = Sampler(seed=0, kernels=True).sample(logits, [SamplingRow(SamplingParams(temperature=0.5, logprobs=2), [], [])])[0]
    lp = torch.log_softmax(logits.float()[0], dim=-1)
    assert result.logprob == pytest.approx(float(lp[result.token_id]), abs=1e-5)
    assert [t for t, _ in result.top_logprobs] == [1, 0]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, block", [(300, 64), (300, 1024), (2072, 16)])
def test_the_graphs_argmax_is_torchs(dtype, vocab, block):
    """triton_argmax_rows (the decode and prefill graphs' argmax on a GPU) against torch.argmax:
    one chunk a row, several, the 64-chunk cap with several blocks a chunk (2072 at 16: 44 chunks
    of three blocks, the last two of the last chunk past the vocabulary), rows with ties across
    chunks, written into a slice of a longer buffer as the graphs do."""
    torch.manual_seed(1)
    logits = (torch.randn(6, vocab) * 2).round().to(dtype).to(DEVICE)  # rounded: many ties
    out = torch.full((8,), -1, dtype=torch.long, device=DEVICE)
    got = triton_argmax_rows(logits, block=block, out=out[:6])
    assert got.data_ptr() == out.data_ptr() and out.tolist()[:6] == logits.argmax(dim=-1).tolist() and out[6:].tolist() == [-1, -1]
    assert argmax_rows(logits.cpu()).tolist() == logits.cpu().argmax(dim=-1).tolist()  # elsewhere: torch's


def test_more_logits_than_32_bit_offsets_reach_is_an_error_before_any_launch():
    logits = torch.zeros(1, 2**15).expand(2**16, 2**15)  # 2^31 logits in one row's memory
    for call in (lambda: triton_argmax_rows(logits), lambda: gumbel_sample(logits, torch.zeros(2**16), torch.tensor([1]))):
        with pytest.raises(ValueError, match="32-bit"):
            call()
