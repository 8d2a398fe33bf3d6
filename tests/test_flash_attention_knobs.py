"""The flash_attention spec drives the generated module: change one knob in the spec text,
regenerate, and the module's behaviour changes with it (or the spec is refused, with the reason)."""

from __future__ import annotations

import math

import pytest
import torch

from vibee.frontend.errors import SpecError



def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the spec text should hold {old!r} exactly once"
    return text.replace(old, new)


def add_variant(text: str, lines: str) -> str:
    return replace_once(text, "variants:\n", "variants:\n" + lines)


def naive_causal_attention(q, k, v, scale, score_mod=lambda s: s):
    """softmax(score_mod(q k^T * scale) + causal mask) v for one sequence of n queries over n keys, float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = score_mod(torch.einsum("qhd,khd->hqk", q, k) * scale)
    n = q.shape[0]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def one_sequence(n=24, heads=2, head_dim=16, gain=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, head_dim, generator=gen) * gain
    k = torch.randn(n, heads, head_dim, generator=gen)
    v = torch.randn(n, heads, head_dim, generator=gen)
    cu = torch.tensor([0, n], dtype=torch.int32)
    return q, k, v, cu


def test_added_softcap_variant_is_exposed_and_changes_the_output(spec_text, gen_from_text):
    text = add_variant(spec_text("flash_attention"), (
        "  - name: tight_softcap\n"
        "    params: { cap: 2.0 }\n"
        '    score_mod: "cap * tanh(score / cap)"\n'
    ))
    impl = gen_from_text(text, "igla_flash_attention").impl
    assert "tight_softcap" in impl.VARIANTS
    q, k, v, cu = one_sequence(gain=5.0)
    scale = 1.0 / math.sqrt(16)
    plain = impl.varlen_attention(q, k, v, cu, cu, causal=True)
    capped = impl.varlen_attention(q, k, v, cu, cu, causal=True, variants=["tight_softcap"])
    want = naive_causal_attention(q, k, v, scale, lambda s: 2.0 * torch.tanh(s / 2.0))
    assert torch.allclose(capped.double(), want, atol=1e-5)
    assert (capped - plain).abs().max() > 1e-2


def test_module_without_the_variant_refuses_it(spec_text, gen_from_text):
    impl = gen_from_text(spec_text("flash_attention"), "igla_flash_attention").impl
    assert "tight_softcap" not in impl.VARIANTS
    q, k, v, cu = one_sequence()
    with pytest.raises(ValueError, match="unknown attention variant 'tight_softcap'"):
        impl.varlen_attention(q, k, v, cu, cu, variants=["tight_softcap"])


def test_fixed_split_kv_sets_the_decode_split_count(spec_text, gen_from_text):
    text = spec_text("flash_attention")
    auto = gen_from_text(text, "igla_flash_attention").impl
    fixed = gen_from_text(replace_once(text, "split_kv: auto", "split_kv: 3"), "igla_flash_attention").impl
    assert auto.MIN_BLOCK_KV == 128
    assert auto.num_splits_for(3000) == 16  # auto: max_splits once there are enough 128-token tiles
    assert auto.num_splits_for(1000) == 8
    assert fixed.num_splits_for(1000) == 3
    assert fixed.num_splits_for(200) == 2  # never more splits than 128-token tiles

    gen = torch.Generator().manual_seed(1)
    pages = torch.randn(20, 16, 2, 16, generator=gen), torch.randn(20, 16, 2, 16, generator=gen)
    block_tables = torch.arange(20, dtype=torch.int32).view(1, 20)
    q = torch.randn(1, 4, 16, generator=gen)
    seq_lens = torch.tensor([300], dtype=torch.int32)  # three 128-token tiles
    fixed.reset_counters()
    out = fixed.paged_decode(q, *pages, block_tables, seq_lens)
    assert fixed.COUNTERS.decode_programs == 3
    assert torch.allclose(out, auto.paged_decode(q, *pages, block_tables, seq_lens), atol=1e-5)


@pytest.mark.parametrize("knob", ["page_size: 16", "dtype: bf16"])
def test_page_size_and_dtype_are_not_knobs(spec_text, gen_from_text, knob):
    # The kernels read both from their inputs (the KV cache's pages, the served model's dtype).
    text = replace_once(spec_text("flash_attention"), "  causal: true", f"  {knob}\n  causal: true")
    with pytest.raises(SpecError, match="unknown"):
        gen_from_text(text, "igla_flash_attention")


def test_mask_mod_that_is_not_boolean_is_refused(spec_text, gen_from_text):
    text = add_variant(spec_text("flash_attention"), (
        "  - name: distance\n"
        '    mask_mod: "q_idx - kv_idx"\n'
    ))
    with pytest.raises(SpecError, match="boolean"):
        gen_from_text(text, "igla_flash_attention")


def test_softmax_scale_sets_the_default_scale(spec_text, gen_from_text):
    text = replace_once(spec_text("flash_attention"), "softmax_scale: auto", "softmax_scale: 0.5")
    impl = gen_from_text(text, "igla_flash_attention").impl
    q, k, v, cu = one_sequence(seed=2)
    out = impl.varlen_attention(q, k, v, cu, cu, causal=True)
    assert torch.allclose(out.double(), naive_causal_attention(q, k, v, 0.5), atol=1e-5)


def test_smaller_tiles_regenerate_a_passing_suite(spec_text, gen_from_text, monkeypatch):
    text = spec_text("flash_attention")
    text = replace_once(text, "block_n: 64 ", "block_n: 16 ")
    gen = gen_from_text(text, "igla_flash_attention")
    impl = gen.impl

    # 40 keys in 16-key tiles: 3 tiles, whatever the cache's page size (8 or 4 tokens here).
    generator = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(5, 8, 1, 16, generator=generator), torch.randn(5, 8, 1, 16, generator=generator)
    q = torch.randn(1, 2, 16, generator=generator)
    args = (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([40], dtype=torch.int32))
    impl.reset_counters()
    on_eight = impl.paged_prefill(q, k_cache, v_cache, torch.arange(5, dtype=torch.int32).view(1, 5), *args)
    assert impl.COUNTERS.prefill_kv_tiles == 3
    on_four = impl.paged_prefill(q, k_cache.view(10, 4, 1, 16), v_cache.view(10, 4, 1, 16),
                                 torch.arange(10, dtype=torch.int32).view(1, 10), *args)
    assert torch.allclose(on_four, on_eight, atol=1e-6)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU is shared: one thread runs these fastest
    # All but the slow tests that never prefill on the default tile (decode kernels, the merge, the spec's autotune
    # tiles, the 4097-key decode case): they run as in the shipped suite, and pass against a module generated
    # without block_n.
    assert gen.run_tests("-k", "not test_triton_decode_matches_reference and not test_triton_decode_variant_matches_reference"
                               " and not test_triton_decode_merges_in_kernel and not test_triton_merge_splits"
                               " and not test_triton_every_autotune_candidate and not long_and_short") == 0


def score_mod_of(gen, name: str) -> str:
    return next(v for v in gen.spec.variants if v.name == name).score_mod.torch


@pytest.mark.parametrize("variant, function, wrong", [("softcap", "tanh", "torch.sigmoid({0})"),
                                                      ("alibi", "alibi_slope", "alibi_slope({0} + 1, num_heads)")])
def test_a_wrong_torch_lowering_fails_the_generated_suite(spec_text, gen_from_text, monkeypatch, variant, function, wrong):
    """The reference evaluates the variants from its own (numpy) lowering, so the suite is an
    oracle for the torch one: one function lowered wrongly, and the variant tests fail."""
    from vibee.expr import lower_torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CPU is shared: one thread runs these fastest
    variant_tests = ("-k", f"variant and {variant} and not triton and not gpu")
    right = gen_from_text(spec_text("flash_attention"), "igla_flash_attention")
    assert right.run_tests(*variant_tests) == 0
    monkeypatch.setitem(lower_torch.FUNCTIONS, function, wrong)
    broken = gen_from_text(spec_text("flash_attention"), "igla_flash_attention")
    assert score_mod_of(broken, variant) != score_mod_of(right, variant)
    assert broken.run_tests(*variant_tests) != 0
