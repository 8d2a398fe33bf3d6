"""Knob flags reach the engine as values, not as regenerated code: `--block-size 32` serves
32-token blocks from output/'s kv_cache module, `--quant int8` quantizes per output channel by the
IR's own rule, and a runtime knob of the scheduler or the drafter takes effect without generation."""

from __future__ import annotations

import pytest

from tests.runtime.hf_models import make_model
from vibee.engine_flags import split_flags
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.offline import generate
from vibee.runtime.generated import COMMITTED_OUTPUT, load_generated
from vibee.runtime.sampling_params import SamplingParams



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(path, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path / "cache"))


def engine(model_dir, **flags) -> LLMEngine:
    settings, knobs = split_flags(flags)  # as `vibee serve` splits its flags
    return LLMEngine(EngineConfig(model=model_dir, device="cpu", num_kv_blocks=32, **settings, knobs=knobs),
                     progress=False)


def test_block_size_flag_serves_32_token_blocks_from_the_committed_kv_cache(model_dir, tmp_path):
    eng = engine(model_dir, block_size=32)
    assert eng.gen.sources["kv_cache"] == COMMITTED_OUTPUT
    assert eng.gen.regenerated == []
    assert eng.block_size == 32 and eng.block_manager.block_size == 32
    assert eng.kv_cache.k_pages[0].data.shape[1] == 32
    assert eng.info()["kv_cache"]["block_size"] == 32
    eng.add_request("r", list(range(5, 45)), SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()  # the 40-token prompt is prefilled into two 32-token blocks
    (seq_id,) = eng.block_manager.block_tables
    assert len(eng.block_manager.block_table(seq_id)) == 2


def test_quant_int8_quantizes_per_output_channel(model_dir):
    eng = engine(model_dir, quant="int8")
    assert eng.gen.quantization.BITS == 8 and eng.gen.quantization.GROUP_SIZE == -1
    assert eng.gen.regenerated == ["quantization"]  # a compile-time knob: its own kind only
    layers = [m for m in eng.model.modules() if type(m).__name__ == "QuantLinear"]
    assert layers and all(m.scales.shape == (m.out_features, 1) for m in layers)


def test_scheduler_knobs_reach_the_scheduler_without_generation(model_dir, tmp_path):
    eng = engine(model_dir, max_num_seqs=2, scheduling_policy="priority", enable_chunked_prefill=False)
    assert eng.gen.regenerated == [] and not (tmp_path / "cache").exists()
    assert eng.scheduler.max_num_seqs == 2 and eng.scheduler.policy == "priority"
    assert eng.scheduler.enable_chunked_prefill is False
    running = []
    outs = generate(eng, [[5, 6, 7]] * 3, SamplingParams(max_tokens=4, ignore_eos=True),
                    on_step=lambda: running.append(len(eng.scheduler.running)))
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    assert max(running) == 2


def test_speculation_batch_limit_flag_takes_effect_without_generation(tmp_path):
    gen = load_generated(knobs={"speculative_decode": {"disable_by_batch_size": 4}})
    assert gen.regenerated == [] and not (tmp_path / "cache").exists()
    limit = gen.configs.speculative_decode.disable_by_batch_size
    assert gen.speculative_decode.speculation_enabled(4, limit) and not gen.speculative_decode.speculation_enabled(5, limit)


def test_acceptance_threshold_flag_reaches_the_gate_without_generation():
    gen = load_generated(knobs={"speculative_decode": {"acceptance_threshold": 0.5}})
    assert gen.regenerated == []
    gate = gen.speculative_decode.SpeculationGate(gen.configs.speculative_decode.acceptance_threshold, window_tokens=4)
    gate.record("seq", 4, 1)  # a quarter accepted: below 0.5, though above the spec's 0.2
    assert not gate.allows("seq") and gate.figures()["num_sequences_paused"] == 1
