"""KV cache sizing: on a GPU from --gpu-memory-utilization after a profiled worst-case step; on a
CPU from cpu_kv_cache_gib; --num-kv-blocks over both. The arithmetic and the worst step's shape
are pure functions, tested here on the CPU; the profile itself needs a GPU."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.runtime.hf_models import make_model
from vibee.engine_flags import split_flags
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.offline import generate
from vibee.runtime.kv_sizing import kv_blocks_for_budget, worst_case_step
from vibee.runtime.sampling_params import SamplingParams

GiB = 2**30
MiB = 2**20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 2-layer Llama, as in test_engine.py."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(path, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return path


def engine(model_dir, **flags) -> LLMEngine:
    settings, knobs = split_flags(flags)  # as `vibee serve` splits its flags
    return LLMEngine(EngineConfig(model=model_dir, device="cpu", **settings, knobs=knobs), progress=False)


def sampled_tokens(eng, prompts):
    outs = generate(eng, prompts, SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def blocks(**overrides) -> int:
    args = dict(total=80 * GiB, free=60 * GiB, utilization=0.9, activation_peak=2 * GiB, graph_reserve=256 * MiB,
                bytes_per_block=2 * MiB, useful=10**9, weights=16 * GiB)
    return kv_blocks_for_budget(**{**args, **overrides})


def test_budget_arithmetic():
    # 72 GiB allowed - 20 in use - 2 activations - 0.25 graphs = 49.75 GiB of 2 MiB blocks.
    assert blocks() == (72 * GiB - 20 * GiB - 2 * GiB - 256 * MiB) // (2 * MiB) == 25472


def test_more_utilization_more_blocks_larger_peak_fewer():
    assert blocks(utilization=0.5) < blocks(utilization=0.7) < blocks(utilization=0.9)
    assert blocks(activation_peak=8 * GiB) < blocks(activation_peak=2 * GiB) < blocks(activation_peak=0)
    assert blocks(graph_reserve=0) > blocks()
    assert blocks(free=40 * GiB) < blocks()  # memory other processes hold is not ours
    # Each extra GiB of activations costs exactly its blocks.
    assert blocks(activation_peak=0) - blocks(activation_peak=1 * GiB) == GiB // (2 * MiB)


def test_never_above_useful():
    assert blocks(useful=1000) == 1000
    assert blocks(useful=10**9) < 10**9


def test_error_names_the_numbers():
    # 24 GiB allowed - 20 in use - 3 activations - 0.25 graphs: 0.75 GiB still holds blocks ...
    assert blocks(utilization=0.3, activation_peak=3 * GiB) == 384
    # ... and at 0.25 (20 GiB allowed) nothing is left.
    with pytest.raises(ValueError) as err:
        blocks(utilization=0.25, activation_peak=3 * GiB)
    text = str(err.value)
    for part in ("no memory is left for the KV cache", "--gpu-memory-utilization 0.25", "80.00 GiB", "20.00 GiB in use",
                 "weights 16.00 GiB", "3.00 GiB profiled activation peak", "256.0 MiB CUDA graph reserve"):
        assert part in text, (part, text)
    with pytest.raises(ValueError, match="no memory is left"):
        blocks(activation_peak=0, graph_reserve=0, free=0)  # a full GPU
    with pytest.raises(ValueError, match="no memory is left"):
        blocks(bytes_per_block=60 * GiB)  # budget left, but not one block


def test_worst_case_step_shape():
    # 8192 tokens in sequences of at most max_model_len; logits and sampling: one row per sequence.
    seq_lens, rows, sampled = worst_case_step(8192, 256, 3000)
    assert seq_lens == [3000, 3000, 2192] and rows == 256 and sampled == 256
    # No more sequences than max_num_seqs: then fewer tokens than the budget.
    seq_lens, rows, sampled = worst_case_step(8192, 4, 1024)
    assert seq_lens == [1024] * 4 and rows == 4 and sampled == 4
    # Verifying k drafts takes k + 1 logits rows per sequence, bounded by the step's tokens.
    assert worst_case_step(8192, 256, 4096, num_speculative_tokens=3)[1:] == (1024, 256)
    assert worst_case_step(512, 256, 4096, num_speculative_tokens=3)[1:] == (512, 256)
    # Fewer tokens than rows (a tiny step budget): one row per token at most.
    assert worst_case_step(16, 16, 4096)[1:] == (16, 16)


def test_cpu_keeps_fixed_budget_and_num_kv_blocks_overrides(model_dir):
    eng = engine(model_dir, cpu_kv_cache_gib=0.001)
    assert eng.memory_profile is None and eng.info()["kv_cache"]["memory_profile"] is None
    assert eng.num_blocks == min(0.001 * GiB // eng.kv_bytes_per_block,
                                 eng.max_num_seqs * -(-eng.max_model_len // eng.block_size) + 1)
    assert engine(model_dir, num_kv_blocks=7).num_blocks == 7
    with pytest.raises(ValueError, match="cpu_kv_cache_gib"):
        engine(model_dir, cpu_kv_cache_gib=1e-9)


@pytest.mark.parametrize("speculative", [False, True])
def test_worst_case_step_runs_and_leaves_the_engine_as_it_was(model_dir, speculative, monkeypatch):
    """The profile's step runs on any device (here the CPU, with the draft model too) and neither
    advances the engine's sampler nor changes what it generates."""
    flags = dict(max_num_batched_tokens=96, max_num_seqs=4, max_model_len=40)
    if speculative:
        flags.update(speculative=True, draft_model=model_dir)
    batch = [[7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
    expected = sampled_tokens(engine(model_dir, **flags), batch)
    eng = engine(model_dir, **flags)
    state = eng.sampler.shared_generator("cpu").get_state()
    eng._run_worst_case_step()
    assert torch.equal(eng.sampler.shared_generator("cpu").get_state(), state)
    assert sampled_tokens(eng, batch) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sized_from_profile():
    """The built-in model on the GPU: the profile is recorded, and utilization moves the cache by
    what it allows. So many sequences that the cap (`useful`) stays out of the way; eager, so no
    graph captures of that many batch sizes."""
    def build(utilization):
        knobs = {"kv_cache": {"gpu_memory_utilization": utilization},
                 "continuous_batch": {"max_num_seqs": 65536, "max_num_batched_tokens": 65536}}
        eng = LLMEngine(EngineConfig(device="cuda", enforce_eager=True, knobs=knobs), progress=False)
        profile, num_blocks, per_block = eng.memory_profile, eng.num_blocks, eng.kv_bytes_per_block
        free, total = torch.cuda.mem_get_info()
        assert eng.info()["kv_cache"]["memory_profile"] == profile
        del eng
        gc.collect()
        torch.cuda.empty_cache()
        return profile, num_blocks, per_block, total - free

    low, blocks_low, per_block, used_low = build(0.5)
    high, blocks_high, _, _ = build(0.9)
    for p in (low, high):
        assert set(p) >= {"weights_bytes", "activation_peak_bytes", "kv_cache_bytes", "utilization"}
        assert p["activation_peak_bytes"] > 0 and p["weights_bytes"] > 0
    assert (low["utilization"], high["utilization"]) == (0.5, 0.9)
    assert low["kv_cache_bytes"] == blocks_low * per_block
    assert 0 < blocks_low < blocks_high < 65536 * 64 + 1
    # The 0.4 of the GPU between them goes to the KV cache (give or take what else moved).
    assert abs((blocks_high - blocks_low) * per_block - 0.4 * high["total_bytes"]) < 0.02 * high["total_bytes"]
    # With the engine built, the GPU is no fuller than the utilization allows.
    assert used_low <= 0.5 * low["total_bytes"] + 256 * MiB
