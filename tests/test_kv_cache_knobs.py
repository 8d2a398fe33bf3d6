"""The kv_cache spec drives its module: kv_dtype (compile-time) changes the generated code; the
runtime knobs (block_size, enable_prefix_caching, gpu_memory_utilization) are arguments the
runtime passes, and the generated tests exercise the spec's values. An invalid knob is a
located error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vibee.cli import main
from vibee.kinds.kv_cache.config import KVCacheConfig
from vibee.runtime.shapes import shape_config
from vibee.frontend.errors import SpecError


def with_setting(text: str, key: str, value: str) -> str:
    """The spec text with `key: <old>` (the first such line) set to `key: value`, comment kept."""
    changed, count = re.subn(rf"^(\s*{key}:)\s*[^#\n]*?(\s*#.*)?$", rf"\g<1> {value}\g<2>", text, count=1, flags=re.M)
    assert count == 1, f"no '{key}:' line in the spec"
    return changed


def line_of(text: str, key: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.strip().startswith(f"{key}:"))



def blocks_for_17_tokens(impl, block_size: int) -> int:
    manager = impl.BlockManager(32, block_size, True)
    manager.allocate(0, list(range(17)))
    return len(manager.block_table(0))


def test_shipped_spec_generates_and_its_tests_pass(spec_text, gen_from_text):
    gen = gen_from_text(spec_text("kv_cache"), name="igla_kv_cache")
    assert gen.impl.KV_DTYPE == "auto"
    assert blocks_for_17_tokens(gen.impl, 16) == 2
    assert gen.run_tests() == 0


def test_block_size_8_allocates_smaller_blocks(spec_text, gen_from_text):
    gen = gen_from_text(with_setting(spec_text("kv_cache"), "block_size", "8"), name="igla_kv_cache")
    assert blocks_for_17_tokens(gen.impl, 8) == 3  # ceil(17 / 8); 2 with the shipped 16
    cache = gen.impl.PagedKVCache(num_layers=1, num_blocks=4, num_kv_heads=2, head_dim=4, block_size=8)
    assert cache.k_pages[0].data.shape == (4, 8, 2, 4)
    # a shared prefix of 12 tokens is one full block of 8 (none of 16)
    manager = gen.impl.BlockManager(8, 8, True)
    manager.allocate(0, list(range(12)) + [100])
    assert manager.allocate(1, list(range(12)) + [200]) == 8
    assert gen.run_tests() == 0


def test_fp8_kv_dtype_stores_e4m3_rounded_and_saturated(spec_text, gen_from_text):
    text = with_setting(spec_text("kv_cache"), "kv_dtype", "fp8")
    # The shipped test cases promise exact round trips (max_abs_err: 0.0); fp8 cannot keep that promise.
    gen = gen_from_text(text.replace("max_abs_err: 0.0", "max_abs_err: 0.3"), name="igla_kv_cache")
    impl = gen.impl
    cache = impl.PagedKVCache(num_layers=1, num_blocks=4, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=16)
    assert cache.k_pages[0].data.dtype == torch.float8_e4m3fn and cache.bytes_per_block() == 2 * 16 * 2 * 8
    torch.manual_seed(0)
    k, v = torch.randn(20, 2, 8) * 30, torch.randn(20, 2, 8) * 1e-3
    k[3, 1, 2], k[4, 0, 0] = 1e4, -600.0  # past the largest e4m3 value: saturates, never NaN
    cache.write(0, k, v, torch.arange(20))
    got_k, got_v = cache.gather(0, [0, 1], 20)
    assert got_k[3, 1, 2] == 448 and got_k[4, 0, 0] == -448
    # e4m3: 3 mantissa bits, so half a step is 2^-4 of |x| (normals) or 2^-10 (subnormals, below 2^-6)
    for got, want in ((got_k, k.clamp(-448, 448)), (got_v, v)):
        assert ((got - want).abs() <= want.abs() / 16 + 2**-10).all()
    assert gen.run_tests() == 0  # the generated suite, fp8 bounds included


def test_int8_kv_dtype_stores_int8_with_bounded_error(spec_text, gen_from_text):
    text = with_setting(spec_text("kv_cache"), "kv_dtype", "int8")
    exact = gen_from_text(text, name="igla_kv_cache")
    # The shipped test cases promise exact round trips (max_abs_err: 0.0); int8 cannot keep that promise.
    assert exact.run_tests() == 1  # pytest: tests ran and some failed
    gen = gen_from_text(text.replace("max_abs_err: 0.0", "max_abs_err: 0.08"), name="igla_kv_cache")
    impl = gen.impl
    assert impl.KV_DTYPE == "int8"
    cache = impl.PagedKVCache(num_layers=2, num_blocks=4, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=16)
    assert cache.k_pages[0].data.dtype == cache.v_pages[1].data.dtype == torch.int8
    assert cache.k_pages[0].scale.shape == (4, 2)
    # 16 * 2 * 8 one-byte values and 2 four-byte scales per block and layer, for K and V
    assert cache.bytes_per_block() == 2 * 2 * (16 * 2 * 8 + 2 * 4)

    manager = impl.BlockManager(4, 16, True)
    torch.manual_seed(0)
    k, v = torch.randn(40, 2, 8), torch.randn(40, 2, 8) * 3
    for t in range(40):  # token by token, as decode writes
        manager.allocate(0, list(range(t + 1)))
        cache.write(0, k[t : t + 1], v[t : t + 1], cache.slot_mapping(manager.block_table(0), t, t + 1))
    got_k, got_v = cache.gather(0, manager.block_table(0), 40)
    assert got_k.dtype == torch.float32
    for got, want in ((got_k, k), (got_v, v)):
        err = (got - want).abs()
        assert 0 < err.max() <= 2 * want.abs().max() / 127  # the documented bound: one step of a scale <= 2 * amax / 127
    assert gen.run_tests() == 0


def test_disabling_prefix_caching_gives_no_hits(spec_text, gen_from_text):
    gen = gen_from_text(with_setting(spec_text("kv_cache"), "enable_prefix_caching", "false"), name="igla_kv_cache")
    prompt = list(range(40))
    hits = {}
    for enabled in (True, False):
        manager = gen.impl.BlockManager(8, 16, enabled)
        manager.allocate(0, prompt)
        manager.free(0)
        hits[enabled] = manager.allocate(1, prompt)
        stats = manager.stats()
        assert stats.prefix_cache_hits * 16 == hits[enabled] and stats.num_cached_blocks == stats.prefix_cache_hits
    assert hits == {True: 32, False: 0}


def test_gpu_memory_utilization_scales_the_cache(spec_text, gen_from_text):
    gen = gen_from_text(with_setting(spec_text("kv_cache"), "gpu_memory_utilization", "0.45"), name="igla_kv_cache")
    shape = dict(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, block_size=16)
    per_block = 2 * 4 * 16 * 2 * 64 * 2
    assert gen.impl.num_blocks_for(1 << 30, **shape, gpu_memory_utilization=0.9) == int((1 << 30) * 0.9) // per_block
    assert gen.impl.num_blocks_for(1 << 30, **shape, gpu_memory_utilization=0.45) == int((1 << 30) * 0.45) // per_block
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        gen.impl.num_blocks_for(1 << 30, **shape, gpu_memory_utilization=1.5)
    # The generated tests size the cache at the spec's 0.45 in test_cache_sizing_follows_gpu_memory_utilization,
    # the one test that reads it; the rest of the suite is the shipped spec's, test for test.
    assert gen.run_tests("-k", "test_cache_sizing_follows_gpu_memory_utilization") == 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("block_size", "24", "block_size must be a power of two, got 24"),
        ("block_size", "512", "block_size must be between 1 and 256, got 512"),
        ("kv_dtype", "int4", "'int8'"),
        ("gpu_memory_utilization", "1.5", "gpu_memory_utilization must be a fraction in (0, 1], got 1.5"),
    ],
)
def test_invalid_settings_are_errors_at_their_line(spec_text, gen_from_text, key, value, message):
    text = with_setting(spec_text("kv_cache"), key, value)
    with pytest.raises(SpecError) as raised:
        gen_from_text(text, name="igla_kv_cache")
    rendered = raised.value.render()
    assert message in rendered
    assert f"igla_kv_cache.vibee:{line_of(text, key)}:" in rendered


def test_a_misspelt_setting_suggests_the_right_one(spec_text, gen_from_text):
    text = spec_text("kv_cache").replace("block_size: 16", "blok_size: 16", 1)
    with pytest.raises(SpecError, match="did you mean 'block_size'"):
        gen_from_text(text, name="igla_kv_cache")


def test_explain_figures_follow_the_model_shape():
    shape = shape_config("llama-3.2-1b")  # 16 layers, 8 kv heads, head_dim 64; bf16 (no torch_dtype)
    shipped = KVCacheConfig()
    assert shipped.kv_bytes_per_token(shape) == 2 * 16 * 8 * 64 * 2
    assert shipped.derived(shape)["tokens per GiB"].startswith(f"{(1 << 30) // shipped.kv_bytes_per_block(shape) * 16:,}")
    deeper = shape_config("llama-3.1-8b")  # 32 layers, 8 kv heads, head_dim 128
    assert shipped.kv_bytes_per_block(deeper) == 4 * shipped.kv_bytes_per_block(shape)
    int8 = KVCacheConfig(kv_dtype="int8")
    assert int8.kv_bytes_per_block(shape) == shipped.kv_bytes_per_block(shape) // 2 + 2 * 16 * 8 * 4
    assert KVCacheConfig(kv_dtype="fp8").kv_bytes_per_block(shape) == shipped.kv_bytes_per_block(shape) // 2


def test_explain_takes_the_model_shape_from_the_command_line(tmp_path):
    spec = str(Path(__file__).resolve().parents[1] / "specs" / "tri" / "igla_kv_cache.vibee")

    def model_line(*options: str) -> str:
        result = CliRunner().invoke(main, ["explain", "--json", spec, *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["derived"]["model"]

    assert model_line() == "6 layers x 2 kv heads x head_dim 64"  # the built-in models/vibee-tiny
    assert model_line("--shape", "llama-3.1-8b") == "32 layers x 8 kv heads x head_dim 128"
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 128,
              "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_line("--model", str(tmp_path)) == "3 layers x 1 kv heads x head_dim 8"
    unknown = CliRunner().invoke(main, ["explain", spec, "--shape", "llama-9"])
    assert unknown.exit_code == 2 and "unknown shape 'llama-9'" in unknown.output
