"""The runtime imports what the specs generate: output/ for every kind whose generated files are
current, a regenerated copy of only the kinds a compile-time knob changed. A runtime knob changes
the config the runtime passes, never what is generated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vibee.frontend.errors import SpecError
from vibee.kinds.registry import KIND_NAMES
from vibee.runtime.config import EngineConfig
from vibee.runtime.generated import COMMITTED_OUTPUT, DEFAULT_SPEC_DIR, KnobError, load_generated


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path / "cache"))


def test_default_specs_use_committed_output():
    gen = load_generated()
    assert gen.regenerated == [] and set(gen.sources.values()) == {COMMITTED_OUTPUT}
    assert gen.configs.kv_cache == gen.specs["kv_cache"].config
    assert set(gen.specs) == set(KIND_NAMES)


def test_runtime_knobs_change_the_configs_and_regenerate_nothing(tmp_path):
    knobs = {"continuous_batch": {"max_num_seqs": 3, "policy": "priority"},
             "kv_cache": {"enable_prefix_caching": False, "gpu_memory_utilization": 0.5},
             "speculative_decode": {"num_speculative_tokens": 2}}
    gen = load_generated(knobs=knobs)
    assert gen.regenerated == []
    assert not (tmp_path / "cache").exists()
    assert gen.configs.continuous_batch.max_num_seqs == 3 and gen.configs.continuous_batch.policy == "priority"
    assert gen.configs.kv_cache.enable_prefix_caching is False and gen.configs.kv_cache.gpu_memory_utilization == 0.5
    assert gen.configs.speculative_decode.num_speculative_tokens == 2
    # Settings not given keep the spec's values.
    assert gen.configs.continuous_batch.max_num_batched_tokens == gen.specs["continuous_batch"].config.max_num_batched_tokens


def test_block_size_is_passed_at_run_time():
    gen = load_generated(knobs={"kv_cache": {"block_size": 32}})
    assert gen.configs.kv_cache.block_size == 32
    # The kv_cache module takes the block size as an argument: output/'s module serves any.
    assert gen.sources["kv_cache"] == COMMITTED_OUTPUT
    manager = gen.kv_cache.BlockManager(8, gen.configs.kv_cache.block_size, True)
    manager.allocate(0, list(range(33)))
    assert len(manager.block_table(0)) == 2
    # flash_attention reads the page size from the cache it is given: nothing is regenerated.
    assert gen.regenerated == []


def test_compile_knob_regenerates_only_its_kind(tmp_path):
    gen = load_generated(knobs={"quantization": {"bits": 8}})
    assert gen.regenerated == ["quantization"]
    assert gen.sources["quantization"].is_relative_to(tmp_path / "cache")
    assert gen.quantization.BITS == 8
    # The committed module is untouched and importable beside it.
    assert load_generated().quantization.BITS == 4
    # A second load with the same settings reuses the generated directory.
    assert load_generated(knobs={"quantization": {"bits": 8}}).sources == gen.sources


def test_quant_int8_is_per_channel_by_the_ir_rule():
    gen = load_generated(knobs=EngineConfig(quant="int8").knob_settings("float32"))
    assert gen.quantization.BITS == 8 and gen.quantization.GROUP_SIZE == -1
    assert gen.configs.quantization.compute_dtype == "bf16"  # a float32 model keeps the spec's compute dtype
    assert load_generated(knobs=EngineConfig(quant="int8").knob_settings("float16")).configs.quantization.compute_dtype == "fp16"
    gen4 = load_generated(knobs=EngineConfig(quant="int4").knob_settings("float32"))
    assert gen4.quantization.BITS == 4 and gen4.quantization.GROUP_SIZE == 128


def test_the_per_channel_rule_lives_only_in_the_ir():
    source = (Path(__file__).resolve().parents[2] / "vibee" / "runtime" / "config.py").read_text()
    assert "group_size" not in source


def test_a_rejected_knob_names_its_flag_and_the_models_reason():
    with pytest.raises(KnobError, match=r"--block-size 24: block_size must be a power of two"):
        load_generated(knobs={"kv_cache": {"block_size": 24}})
    # A rule between two settings names the flag that was set.
    with pytest.raises(KnobError, match=r"--max-num-seqs 9000: max_num_batched_tokens \(8192\) must be at least"):
        load_generated(knobs={"continuous_batch": {"max_num_seqs": 9000}})


def test_an_unknown_knob_is_refused():
    with pytest.raises(KnobError, match="kv_cache.blok_size"):
        load_generated(knobs={"kv_cache": {"blok_size": 32}})


def test_spec_dir_with_edited_spec(tmp_path):
    spec_dir = tmp_path / "specs"
    shutil.copytree(DEFAULT_SPEC_DIR, spec_dir)
    path = spec_dir / "igla_continuous_batch.vibee"
    text = path.read_text()
    assert "max_num_seqs: 256" in text
    path.write_text(text.replace("max_num_seqs: 256", "max_num_seqs: 8"))
    gen = load_generated(spec_dir)
    assert gen.configs.continuous_batch.max_num_seqs == 8


def test_spec_dir_missing_a_kind(tmp_path):
    spec_dir = tmp_path / "specs"
    shutil.copytree(DEFAULT_SPEC_DIR, spec_dir)
    (spec_dir / "igla_quantization.vibee").unlink()
    with pytest.raises(SpecError, match="quantization"):
        load_generated(spec_dir)


def test_group_size_flag_sets_the_quantized_groups():
    config = EngineConfig(quant="int4", knobs={"quantization": {"group_size": 64}})
    assert config.unbuilt_features() == []
    gen = load_generated(knobs=config.knob_settings("float32"))
    assert gen.quantization.BITS == 4 and gen.quantization.GROUP_SIZE == 64
    # int8 with an explicit group keeps it (without one it is per channel)
    int8 = EngineConfig(quant="int8", knobs={"quantization": {"group_size": 64}}).knob_settings("float32")
    assert load_generated(knobs=int8).quantization.GROUP_SIZE == 64
    # without --quant nothing is quantized: the flag is refused rather than ignored
    assert any("--group-size" in p for p in EngineConfig(knobs={"quantization": {"group_size": 64}}).unbuilt_features())


def test_a_spec_dir_without_a_kind_says_which_and_where_its_shipped_spec_is(tmp_path):
    for path in DEFAULT_SPEC_DIR.glob("*.vibee"):
        if path.stem != "igla_decoder":
            shutil.copy(path, tmp_path / path.name)
    with pytest.raises(SpecError) as err:
        load_generated(tmp_path)
    shown = str(err.value)
    assert "no spec of kind decoder" in shown and "copy specs/tri/igla_decoder.vibee there" in shown, shown
