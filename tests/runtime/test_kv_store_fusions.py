"""Where a layer's new K/V reach the paged cache on a GPU: from RoPE's kernel (the decoder module's
KVWrite), or, for one token, from the QKV projection's GEMV, which rotates q and k too (the decoder
module's rope_linear for 16-bit weights, QuantLinear.rope_forward for quantized ones). Either way the
cache's own write and, for the GEMV, RoPE's kernel are not launched; the logits and the pages are the
torch path's.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: the tests send the model's
decoder ops (and the quantized layers) to them as a GPU would."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")


def tiny_model(quantize: bool, gen=None, dtype: torch.dtype = torch.float32):
    """The tiny Llama over `gen` (default: the shipped specs' modules) in `dtype`."""
    from tests.runtime.hf_models import generated, make_model
    from vibee.runtime.loader import load_model_dir
    from vibee.runtime.model import build_model

    model_dir = Path(tempfile.mkdtemp(prefix="vibee-kv-store-"))
    make_model(model_dir, "llama")
    loaded = load_model_dir(model_dir, dtype=dtype, device=DEVICE, progress=False)
    model = build_model(loaded, gen or generated(), flash_attn=False).eval()
    if quantize:  # the QKV projections in int4, their scales in the model's float32
        for layer in model.model.layers:
            layer.self_attn.qkv_proj = generated().quantization.QuantLinear.from_linear(layer.self_attn.qkv_proj,
                                                                                      dtype=torch.float32)
    return model


def run_steps(model, monkeypatch, kernels: bool):
    """A prompt of 11 tokens then two decode steps on a fresh paged cache, the decoder ops on their
    kernels or not; returns each step's logits, the cache, the layers the cache's write was called
    for and the token counts RoPE's kernel or torch path ran on."""
    from tests.runtime.hf_models import generated
    from vibee.runtime.attention import make_attention_batch

    ops = model.ops
    monkeypatch.setattr(ops, "_use_triton", lambda x: kernels)
    cfg, kv = model.config, generated().kv_cache
    cache = kv.PagedKVCache(cfg.num_layers, 8, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype, block_size=4,
                            device=DEVICE)
    writes, ropes = [], []
    real_write = cache.write
    cache.write = lambda *a: (writes.append(a[0]), real_write(*a))
    apply_rope_qk = getattr(ops.apply_rope_qk, "__wrapped__", ops.apply_rope_qk)  # the module's own, not an earlier run's counter

    def counted(q, *args, **kwargs):
        ropes.append(q.shape[0])
        return apply_rope_qk(q, *args, **kwargs)

    counted.__wrapped__ = apply_rope_qk
    monkeypatch.setattr(ops, "apply_rope_qk", counted)
    ids = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    logits, table = [], [5, 2, 7, 0]
    for q_len, seq_len in ((11, 11), (1, 12), (1, 13)):
        batch = make_attention_batch([q_len], [seq_len], [table], 4, device=DEVICE)
        step = torch.tensor(ids[seq_len - q_len: seq_len], device=DEVICE)
        with torch.no_grad():
            logits.append(model.compute_logits(model(step, batch.positions(), batch, cache)))
    return logits, cache, writes, ropes


def assert_same_steps(got, want, logits_tol: float = 1e-4, pages_tol: float = 1e-5) -> None:
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=logits_tol, atol=logits_tol)
    for a, b in zip((*got[1].k_pages, *got[1].v_pages), (*want[1].k_pages, *want[1].v_pages)):
        torch.testing.assert_close(a.data, b.data, rtol=pages_tol, atol=pages_tol)


@needs_kernels
def test_rope_kernel_writes_the_kv_cache_where_it_runs(monkeypatch):
    """Unquantized: every step's K/V reach the cache through RoPE's kernel, never the cache's write."""
    model = tiny_model(quantize=False)
    layers = model.config.num_layers
    want = run_steps(model, monkeypatch, kernels=False)
    got = run_steps(model, monkeypatch, kernels=True)
    assert got[2] == [] and len(want[2]) == 3 * layers
    assert got[3] == want[3] == [11] * layers + [1] * 2 * layers
    assert_same_steps(got, want)


@needs_kernels
def test_a_quantized_qkv_gemv_rotates_and_stores_kv_at_one_token(monkeypatch):
    """int4 qkv_proj: the prompt's K/V through RoPE's kernel, each decode token's through the
    projection's GEMV (rope_forward): no RoPE call and no cache write at one token."""
    from tests.runtime.hf_models import generated
    impl = generated().quantization
    model = tiny_model(quantize=True)
    layers = model.config.num_layers
    want = run_steps(model, monkeypatch, kernels=False)
    # the quantized layers' kernels on CPU tensors, as on a GPU
    monkeypatch.setattr(impl, "_triton_format", lambda x, qw: impl._format(qw))
    got = run_steps(model, monkeypatch, kernels=True)
    assert got[2] == [] and got[3] == [11] * layers
    assert want[3] == [11] * layers + [1] * 2 * layers
    assert_same_steps(got, want)


@needs_kernels
def test_a_16_bit_qkv_gemv_rotates_and_stores_kv_at_one_token(monkeypatch):
    """fp16 weights: each decode token's K/V through the decoder spec's QKV GEMV (rope_linear), the
    prompt's through RoPE's kernel: no RoPE call and no cache write at one token."""
    model = tiny_model(quantize=False, dtype=torch.float16)
    layers = model.config.num_layers
    want = run_steps(model, monkeypatch, kernels=False)
    got = run_steps(model, monkeypatch, kernels=True)
    assert got[2] == [] and got[3] == [11] * layers
    assert want[3] == [11] * layers + [1] * 2 * layers
    assert_same_steps(got, want, logits_tol=2e-2, pages_tol=1e-2)  # fp16: a few steps of 1e-3 (cuBLAS's reductions)


def test_pages_to_write_leaves_scaled_pages_to_the_cache(monkeypatch):
    """int8 pages (a scale per block and head), steps without a cache and the kv_cache spec's
    fuse_kv_store off keep the cache's write."""
    from vibee.runtime.attention import AttentionBackend, make_attention_batch
    batch = make_attention_batch([1], [3], [[0]], 4)
    k = torch.zeros(1, 2, 8)
    plain = SimpleNamespace(data=torch.zeros(2, 4, 2, 8))
    scaled = SimpleNamespace(data=torch.zeros(2, 4, 2, 8, dtype=torch.int8), scale=torch.ones(2, 2))
    cache = lambda pages: SimpleNamespace(k_pages=[pages], v_pages=[pages])  # noqa: E731
    backend, unfused = (AttentionBackend(SimpleNamespace(), num_heads=2, num_kv_heads=2, head_dim=8, fuse_kv_store=fuse)
                        for fuse in (True, False))
    assert backend.pages_to_write(0, batch, cache(plain), k)[2] is batch.slot_mapping
    assert backend.pages_to_write(0, batch, cache(scaled), k) is None
    assert backend.pages_to_write(0, batch, None, k) is None
    assert unfused.pages_to_write(0, batch, cache(plain), k) is None


@needs_kernels
def test_the_kv_cache_specs_fuse_kv_store_off_keeps_the_caches_write(monkeypatch):
    """fuse_kv_store: false in the kv_cache spec (a runtime knob: the same generated modules): on
    the kernels' path, RoPE's kernel stores nothing and the cache's write runs every step, for the
    same logits and pages."""
    from vibee.runtime.generated import load_generated
    gen = load_generated(knobs={"kv_cache": {"fuse_kv_store": False}})
    assert not gen.configs.kv_cache.fuse_kv_store
    model = tiny_model(quantize=False, gen=gen)
    layers = model.config.num_layers
    want = run_steps(model, monkeypatch, kernels=False)
    got = run_steps(model, monkeypatch, kernels=True)
    assert len(got[2]) == len(want[2]) == 3 * layers
    assert got[3] == want[3] == [11] * layers + [1] * 2 * layers
    assert_same_steps(got, want)
