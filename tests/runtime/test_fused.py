"""RoPE's kernel (vibee/runtime/fused.py) against its torch path, and the model's ops together: the
decoder spec's (add + RMSNorm, SiLU * up, the GEMV; their own tests are output/tests/test_igla_decoder.py)
and RoPE's, on the CPU path and on the kernels.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, in
float32 and float16 (the interpreter's conversion to bf16 does not round to nearest even); the
dispatchers keep CPU tensors on the torch path, so these tests call the `triton_*` launchers
directly. GPU-marked tests run the dispatchers in bf16 at Llama-3.2-1B sizes on CUDA tensors.

What may differ between a kernel and its torch path: the last bit of cos/sin, so a rounded result
can land one step of its dtype away."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from vibee.runtime import fused

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernels = pytest.mark.skipif(
    not fused.HAVE_TRITON or (not INTERPRETED and not torch.cuda.is_available()),
    reason="needs Triton with a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")
needs_gpu = pytest.mark.skipif(not fused.HAVE_TRITON or not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL_DTYPES = [torch.float32, torch.float16]


def tolerances(dtype: torch.dtype) -> dict:
    """One step of the dtype relative (a different rounding of the same float32 value), a little
    more absolute for values near zero; float32 a few ulps."""
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": torch.finfo(dtype).eps}


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def strided(x: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """x as a view with a wider stride along dim 0 (as a slice of a fused projection is)."""
    wide = torch.zeros(x.shape[0], x.shape[1] + extra, *x.shape[2:], dtype=x.dtype, device=x.device)
    wide[:, 1 : 1 + x.shape[1]] = x
    return wide[:, 1 : 1 + x.shape[1]]


def randn(*shape, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


# ---- the dispatchers on CPU: the torch path, unchanged --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_is_the_torch_path(dtype):
    """On a CPU the model's ops are transformers' expressions, whatever the decoder spec's target."""
    from tests.runtime.hf_models import generated

    ops = generated().decoder
    x, r, w = (randn(5, 64, dtype=dtype, seed=s) for s in range(3))
    w = w[0]
    out, h = ops.rms_norm(x, w, 1e-6)
    assert h is x
    x32 = x.float()
    want = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)  # the old RMSNorm
    assert torch.equal(out, want)
    out, h = ops.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(h, x + r) and torch.equal(out, ops.rms_norm(x + r, w, 1e-6)[0])

    q, k = randn(3, 4, 16, dtype=dtype, seed=4), randn(3, 2, 16, dtype=dtype, seed=5)
    pos, freq = torch.tensor([0, 5, 9]), inv_freq(16)
    cos, sin = fused.rope_cos_sin(pos, freq, 1.25, dtype)
    got = fused.apply_rope_qk(q, k, pos, freq, 1.25)
    assert torch.equal(got[0], fused._rotate(q, cos, sin)) and torch.equal(got[1], fused._rotate(k, cos, sin))
    assert all(torch.equal(a, b) for a, b in zip(got, fused.apply_rope_qk(q, k, pos, freq, 1.25, (cos, sin))))

    gate, up = randn(3, 40, dtype=dtype, seed=6), randn(3, 40, dtype=dtype, seed=7)
    assert torch.equal(ops.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)

    x, w, b = randn(1, 40, dtype=dtype, seed=8), randn(24, 40, dtype=dtype, seed=9), randn(24, dtype=dtype, seed=10)
    assert torch.equal(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    gate_up = torch.cat([gate, up], dim=-1)[:1]
    assert torch.equal(ops.silu_mul_linear(gate_up, w, b),
                       torch.nn.functional.linear(ops.silu_mul(gate[:1], up[:1]), w, b))


# ---- the launchers (interpreter on CPU, or compiled on a GPU) -------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 2, 16), (7, 4, 4, 64), (13, 6, 2, 16), (3, 5, 1, 64)])
@pytest.mark.parametrize("scaling", [1.0, 1.1386])
def test_triton_rope_qk(dtype, tokens, heads, kv_heads, head_dim, scaling):
    q = randn(tokens, heads, head_dim, dtype=dtype, device=KERNEL_DEVICE, seed=1)
    k = randn(tokens, kv_heads, head_dim, dtype=dtype, device=KERNEL_DEVICE, seed=2)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(KERNEL_DEVICE)
    freq = inv_freq(head_dim).to(KERNEL_DEVICE)
    q_in, k_in = q.clone(), k.clone()
    got = fused.triton_apply_rope_qk(q, k, positions, freq, scaling)
    want = fused.torch_apply_rope_qk(q, k, positions, freq, scaling)
    assert torch.equal(q, q_in) and torch.equal(k, k_in)  # inputs untouched
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tolerances(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", SMALL_DTYPES)
def test_triton_rope_qk_strided(dtype):
    """q and k as views of one fused QKV projection output (token stride wider than heads * D)."""
    t, h, kv, d = 5, 4, 2, 16
    qkv = randn(t, (h + 2 * kv) * d, dtype=dtype, device=KERNEL_DEVICE, seed=1)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + kv) * d].view(t, kv, d)
    positions = torch.tensor([3, 0, 100, 7, 2047], device=KERNEL_DEVICE)
    freq = inv_freq(d).to(KERNEL_DEVICE)
    got = fused.triton_apply_rope_qk(q, k, positions, freq, 1.0)
    want = fused.torch_apply_rope_qk(q, k, positions, freq, 1.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerances(dtype))


def sentinel_pages(blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    return tuple(torch.full((blocks, block_size, kv_heads, head_dim), fill, dtype=dtype, device=KERNEL_DEVICE)
                 for fill in (7.0, -7.0))


@needs_kernels
@pytest.mark.parametrize("dtype,page_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.float32, torch.float16)])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_triton_rope_qk_stores_rotated_k_and_v_at_their_slots(dtype, page_dtype, slot_dtype):
    """With kv_write the kernel's q and k are the plain kernel's, and the pages hold the rotated k
    and v at each token's slot in the page dtype, as PagedKVCache.write would store them; a slot
    of -1 stores nothing and no other row changes. v is a view of a QKV output (strided)."""
    t, h, kv, d, block_size = 5, 4, 2, 16, 4
    qkv = randn(t, (h + 2 * kv) * d, dtype=dtype, device=KERNEL_DEVICE, seed=1)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([h * d, kv * d, kv * d], dim=-1))
    positions = torch.tensor([3, 0, 100, 7, 2047], device=KERNEL_DEVICE)
    slots = torch.tensor([5, 0, -1, 22, 13], dtype=slot_dtype, device=KERNEL_DEVICE)
    freq = inv_freq(d).to(KERNEL_DEVICE)
    k_pages, v_pages = sentinel_pages(6, block_size, kv, d, page_dtype)
    got_q, got_k = fused.triton_apply_rope_qk(q, k, positions, freq, 1.1, fused.KVWrite(v, k_pages, v_pages, slots))
    plain_q, plain_k = fused.triton_apply_rope_qk(q, k, positions, freq, 1.1)
    assert torch.equal(got_q, plain_q) and torch.equal(got_k, plain_k)
    want_k, want_v = sentinel_pages(6, block_size, kv, d, page_dtype)
    keep = slots >= 0
    want_k.view(-1, kv, d)[slots[keep].long()] = plain_k[keep].to(page_dtype)
    want_v.view(-1, kv, d)[slots[keep].long()] = v[keep].to(page_dtype)
    assert torch.equal(k_pages, want_k) and torch.equal(v_pages, want_v)


def test_kv_write_is_checked_and_only_on_a_gpu():
    t, kv, d = 2, 2, 8
    q, k, v = torch.zeros(t, 4, d), torch.zeros(t, kv, d), torch.zeros(t, kv, d)
    slots = torch.tensor([0, 1])
    pages = torch.zeros(3, 4, kv, d)
    with pytest.raises(ValueError, match="only on CUDA"):
        fused.apply_rope_qk(q, k, torch.arange(t), inv_freq(d), 1.0, kv_write=fused.KVWrite(v, pages, pages, slots))
    bad = [fused.KVWrite(v, torch.zeros(3, 4, kv + 1, d), pages, slots),  # heads
           fused.KVWrite(v, pages, torch.zeros(3, 8, kv, d), slots),  # k and v pages unlike
           fused.KVWrite(v[:, :1], pages, pages, slots),  # v unlike k
           fused.KVWrite(v, pages, pages, slots.float()),  # slots' dtype
           fused.KVWrite(v, pages, pages, slots[:1])]  # a slot for each token
    for write in bad:
        with pytest.raises(ValueError):
            fused.triton_apply_rope_qk(q, k, torch.arange(t), inv_freq(d), 1.0, write)


def test_a_quantized_down_projection_that_multiplies_by_silu_gate_times_up_gets_gate_up_whole():
    """The MLP hands gate_up to a down projection that takes silu(gate) * up into its own kernel
    (the Triton target's QuantLinear at one row); when it declines (None), silu_mul runs first."""
    from types import SimpleNamespace

    import torch.nn as nn

    from tests.runtime.hf_models import generated
    from vibee.runtime.model import MLP

    class Down(nn.Module):
        def __init__(self, takes: bool):
            super().__init__()
            self.takes, self.seen = takes, []

        def silu_mul_forward(self, gate_up):
            self.seen.append(("fused", gate_up.shape[-1]))
            return gate_up[..., :3] * 0 + 7 if self.takes else None

        def forward(self, x):
            self.seen.append(("after silu_mul", x.shape[-1]))
            return x[..., :3]

    ops = generated().decoder
    mlp = MLP(SimpleNamespace(hidden_size=3, intermediate_size=4, mlp_bias=False), torch.float32, ops)
    mlp.gate_up_proj = nn.Linear(3, 8, bias=False)
    x = torch.randn(1, 3)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    for takes in (True, False):
        mlp.down_proj = Down(takes)
        y = mlp(x)
        if takes:
            assert mlp.down_proj.seen == [("fused", 8)] and torch.equal(y, torch.full((1, 3), 7.0))
        else:
            assert mlp.down_proj.seen == [("fused", 8), ("after silu_mul", 4)]
            assert torch.equal(y, ops.silu_mul(gate, up)[..., :3])


@needs_kernels
def test_model_with_kernels_matches_torch_path(monkeypatch):
    """A tiny Llama run through the Triton launchers (RoPE and the decoder spec's ops dispatched to
    them) gives the torch path's output, float32."""
    from tests.runtime.hf_models import generated, make_model
    from vibee.runtime.attention import make_attention_batch
    from vibee.runtime.loader import load_model_dir
    from vibee.runtime.model import build_model

    model_dir = Path(tempfile.mkdtemp(prefix="vibee-fused-"))
    make_model(model_dir, "llama", rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32})
    loaded = load_model_dir(model_dir, dtype=torch.float32, device=KERNEL_DEVICE, progress=False)
    model = build_model(loaded, generated(), flash_attn=False).eval()
    ids = torch.randint(0, 300, (11,), generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE)
    positions = torch.arange(11, device=KERNEL_DEVICE)
    with torch.no_grad():
        for owner in (fused, model.ops):
            monkeypatch.setattr(owner, "_use_triton", lambda x: False)
        want = model(ids, positions, make_attention_batch([11], [11], None, 16, device=KERNEL_DEVICE), None)
        for owner in (fused, model.ops):
            monkeypatch.setattr(owner, "_use_triton", lambda x: True)
        got = model(ids, positions, make_attention_batch([11], [11], None, 16, device=KERNEL_DEVICE), None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- GPU: bf16 at Llama-3.2-1B sizes through the dispatchers --------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INNER = 2048, 32, 8, 64, 8192
BF16 = {"rtol": 2 * torch.finfo(torch.bfloat16).eps, "atol": torch.finfo(torch.bfloat16).eps}


def llama3_inv_freq() -> torch.Tensor:
    """Llama-3.2's rope (theta 500000, llama3 scaling factor 32, context 8192)."""
    from vibee.runtime.rope import rope_inv_freq
    from types import SimpleNamespace
    cfg = SimpleNamespace(head_dim=HEAD_DIM, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return rope_inv_freq(cfg)[0]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_gpu_rope_qk_bf16(tokens):
    q = randn(tokens, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=1)
    k = randn(tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=2)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 131072, (tokens,), generator=g).cuda()
    freq = llama3_inv_freq().cuda()
    got = fused.apply_rope_qk(q, k, positions, freq, 1.0)
    want = fused.torch_apply_rope_qk(q, k, positions, freq, 1.0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **BF16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("page_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_rope_qk_stores_kv_bf16(page_dtype):
    """The dispatcher's fused K/V store at Llama-3.2-1B heads, 16-token blocks, a padded slot:
    the pages hold what PagedKVCache.write stores (the page dtype's conversion of the same k, v)."""
    t = 64
    q = randn(t, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=1)
    k = randn(t, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=2)
    v = randn(t, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=3)
    positions = torch.arange(t, device="cuda") + 1000
    slots = torch.randperm(40 * 16, generator=torch.Generator().manual_seed(4))[:t].cuda()
    slots[5] = -1
    pages = [torch.zeros(40, 16, KV_HEADS, HEAD_DIM, device="cuda").to(page_dtype) for _ in range(2)]
    freq = llama3_inv_freq().cuda()
    got_q, got_k = fused.apply_rope_qk(q, k, positions, freq, 1.0, kv_write=fused.KVWrite(v, *pages, slots))
    plain = fused.apply_rope_qk(q, k, positions, freq, 1.0)
    assert torch.equal(got_q, plain[0]) and torch.equal(got_k, plain[1])
    keep = slots >= 0
    for page, x in zip(pages, (got_k, v)):
        want = torch.zeros_like(page)
        want.view(-1, KV_HEADS, HEAD_DIM)[slots[keep]] = x[keep].to(page_dtype)
        assert torch.equal(page.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.gpu
@needs_gpu
def test_gpu_kernels_capture_in_a_cuda_graph():
    """RoPE's and the decoder spec's kernels replay from a CUDA graph with the results of a direct call."""
    from tests.runtime.hf_models import generated

    ops = generated().decoder
    x = randn(1, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=1)
    r = randn(1, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=2)
    w = randn(HIDDEN, dtype=torch.bfloat16, device="cuda", seed=3)
    q = randn(1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=4)
    k = randn(1, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=5)
    gate, up = randn(1, INNER, dtype=torch.bfloat16, device="cuda", seed=6), randn(1, INNER, dtype=torch.bfloat16, device="cuda", seed=7)
    pos, freq = torch.tensor([1234], device="cuda"), llama3_inv_freq().cuda()
    gate_up = torch.cat([gate, up], -1)
    w_up = randn(INNER, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=8, scale=0.02)
    w_down = randn(HIDDEN, INNER, dtype=torch.bfloat16, device="cuda", seed=9, scale=0.02)

    def step():
        return (*ops.rms_norm(x, w, 1e-5, r), *fused.apply_rope_qk(q, k, pos, freq, 1.0), ops.silu_mul(gate, up),
                ops.linear(x, w_up), ops.silu_mul_linear(gate_up, w_down))

    direct = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, direct):
        assert torch.equal(a, b)

