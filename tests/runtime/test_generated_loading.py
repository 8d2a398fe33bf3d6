"""The runtime imports what the specs generate: output/ when it is current, a regenerated copy
when flags change a compiled-in choice."""

from __future__ import annotations

import shutil

import pytest

from vibee.runtime.config import EngineConfig
from vibee.runtime.generated import COMMITTED_OUTPUT, DEFAULT_SPEC_DIR, load_generated
from vibee.frontend.errors import SpecError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path / "cache"))


def test_default_specs_use_committed_output():
    gen = load_generated()
    assert gen.source == COMMITTED_OUTPUT
    assert gen.flash_attention.PAGE_SIZE == gen.config("flash_attention").page_size
    assert set(gen.specs) == {"kv_cache", "flash_attention", "quantization", "speculative_decode",
                              "continuous_batch", "tensor_parallel"}


def test_block_size_flag_regenerates_both_modules(tmp_path):
    overrides = EngineConfig(block_size=32).spec_overrides("float32")
    gen = load_generated(overrides=overrides)
    assert gen.source != COMMITTED_OUTPUT and gen.source.is_relative_to(tmp_path / "cache")
    assert gen.config("kv_cache").block_size == 32
    assert gen.flash_attention.PAGE_SIZE == 32
    # The committed modules are untouched and still importable side by side.
    assert load_generated().config("kv_cache").block_size == 16
    # A second load with the same overrides reuses the generated directory.
    assert load_generated(overrides=overrides).source == gen.source


def test_quant_flag_sets_bits(tmp_path):
    gen8 = load_generated(overrides=EngineConfig(quant="int8").spec_overrides("float32"))
    assert gen8.quantization.BITS == 8
    assert gen8.config("quantization").compute_dtype == "fp32"
    gen4 = load_generated(overrides=EngineConfig(quant="int4").spec_overrides("float32"))
    assert gen4.quantization.BITS == 4


def test_invalid_flag_value_is_a_spec_error():
    with pytest.raises(SpecError, match="block_size"):
        load_generated(overrides=EngineConfig(block_size=24).spec_overrides("float32"))


def test_spec_dir_with_edited_spec(tmp_path):
    spec_dir = tmp_path / "specs"
    shutil.copytree(DEFAULT_SPEC_DIR, spec_dir)
    path = spec_dir / "igla_continuous_batch.vibee"
    text = path.read_text()
    assert "max_num_seqs: 256" in text
    path.write_text(text.replace("max_num_seqs: 256", "max_num_seqs: 8"))
    gen = load_generated(spec_dir)
    assert gen.config("continuous_batch").max_num_seqs == 8


def test_spec_dir_missing_a_kind(tmp_path):
    spec_dir = tmp_path / "specs"
    shutil.copytree(DEFAULT_SPEC_DIR, spec_dir)
    (spec_dir / "igla_quantization.vibee").unlink()
    with pytest.raises(SpecError, match="quantization"):
        load_generated(spec_dir)
