"""The model's ops together: the generated decoder module's (add + RMSNorm, RoPE, SiLU * up, the
GEMV; each one's own tests are output/tests/test_igla_decoder.py) as the model calls them, on the
CPU's torch path, through the kernels (Triton's interpreter with TRITON_INTERPRET=1, or a GPU),
and captured in a CUDA graph."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from tests.runtime.hf_models import generated

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def randn(*shape, dtype, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


# ---- the dispatchers on CPU: the torch path, unchanged --------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_is_the_torch_path(dtype):
    """On a CPU the model's ops are transformers' expressions, whatever the decoder spec's target."""
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
    cos, sin = ops.rope_cos_sin(pos, freq, 1.25, dtype)

    def rotate(x):  # transformers' rotate_half
        return x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin

    got = ops.apply_rope_qk(q, k, pos, freq, 1.25)
    assert torch.equal(got[0], rotate(q)) and torch.equal(got[1], rotate(k))
    assert all(torch.equal(a, b) for a, b in zip(got, ops.apply_rope_qk(q, k, pos, freq, 1.25, (cos, sin))))

    gate, up = randn(3, 40, dtype=dtype, seed=6), randn(3, 40, dtype=dtype, seed=7)
    assert torch.equal(ops.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)

    x, w, b = randn(1, 40, dtype=dtype, seed=8), randn(24, 40, dtype=dtype, seed=9), randn(24, dtype=dtype, seed=10)
    assert torch.equal(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))
    gate_half, up_half = torch.nn.functional.linear(x, w, b).chunk(2, dim=-1)
    assert torch.equal(ops.linear_silu_mul(x, w, b), ops.silu_mul(gate_half, up_half))


def test_a_quantized_down_projection_that_multiplies_by_silu_gate_times_up_gets_gate_up_whole():
    """The MLP hands gate_up to a down projection that takes silu(gate) * up into its own kernel
    (the Triton target's QuantLinear at one row); when it declines (None), silu_mul runs first."""
    from types import SimpleNamespace

    import torch.nn as nn

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
    from tests.runtime.hf_models import make_model
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
        monkeypatch.setattr(model.ops, "_use_triton", lambda x: False)
        want = model(ids, positions, make_attention_batch([11], [11], None, 16, device=KERNEL_DEVICE), None)
        monkeypatch.setattr(model.ops, "_use_triton", lambda x: True)
        got = model(ids, positions, make_attention_batch([11], [11], None, 16, device=KERNEL_DEVICE), None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---- GPU: bf16 at Llama-3.2-1B sizes through the dispatchers --------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INNER = 2048, 32, 8, 64, 8192


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
def test_gpu_kernels_capture_in_a_cuda_graph():
    """The decoder spec's kernels replay from a CUDA graph with the results of a direct call."""
    ops = generated().decoder
    x = randn(1, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=1)
    r = randn(1, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=2)
    w = randn(HIDDEN, dtype=torch.bfloat16, device="cuda", seed=3)
    q = randn(1, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=4)
    k = randn(1, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda", seed=5)
    gate, up = randn(1, INNER, dtype=torch.bfloat16, device="cuda", seed=6), randn(1, INNER, dtype=torch.bfloat16, device="cuda", seed=7)
    pos, freq = torch.tensor([1234], device="cuda"), llama3_inv_freq().cuda()
    w_up = randn(INNER, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=8, scale=0.02)
    w_gate_up = randn(2 * INNER, HIDDEN, dtype=torch.bfloat16, device="cuda", seed=9, scale=0.02)

    def step():
        return (*ops.rms_norm(x, w, 1e-5, r), *ops.apply_rope_qk(q, k, pos, freq, 1.0), ops.silu_mul(gate, up),
                ops.linear(x, w_up), ops.linear_silu_mul(x, w_gate_up))

    direct = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, direct):
        assert torch.equal(a, b)

