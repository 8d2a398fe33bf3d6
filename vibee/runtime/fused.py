"""RoPE on q and k for the model: one Triton kernel on CUDA tensors (rope_kernel.py), optionally
storing the rotated k and v in the KV cache's pages, and the torch expressions everywhere else.

The decoder layer's other ops (add + RMSNorm, SiLU * up, the one-token GEMV) are the decoder
spec's (specs/tri/igla_decoder.vibee, vibee/kinds/decoder/); RoPE stays here until it joins them.
The kernel keeps the torch path's rounding: cos/sin in float32 rounded to the dtype before the
rotation, each product of the rotation rounded; what can differ is the last bit of cos/sin.
"""

from __future__ import annotations

import torch

from vibee.runtime.rope_kernel import HAVE_TRITON, KVWrite, triton_apply_rope_qk

__all__ = ["apply_rope_qk", "torch_apply_rope_qk", "rope_cos_sin", "triton_apply_rope_qk", "HAVE_TRITON", "KVWrite"]


def _use_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda


# ---- the torch expressions (the model's numerics) -------------------------------------------------


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, 1, head_dim] for the tokens' positions, computed in float32, cast to dtype."""
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    return (angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def torch_apply_rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                        attention_scaling: float,
                        cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, D] and k [T, kv_heads, D] rotated (pairs (i, i + D/2)); new tensors.
    cos_sin: the rope_cos_sin of these positions when the caller already has them."""
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin(positions, inv_freq, attention_scaling, q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


# ---- dispatch -------------------------------------------------------------------------------


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                  attention_scaling: float, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                  kv_write: KVWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half) on q [T, heads, D] and k [T, kv_heads, D]; returns new (q, k).
    On CUDA one kernel computes cos/sin itself (cos_sin is ignored), and stores the rotated k and
    kv_write.v in kv_write's pages where one is given (only on CUDA: elsewhere it is an error)."""
    if _use_triton(q):
        return triton_apply_rope_qk(q, k, positions, inv_freq, attention_scaling, kv_write)
    if kv_write is not None:
        raise ValueError("apply_rope_qk writes K/V pages only on CUDA (the KV cache's write does it elsewhere)")
    return torch_apply_rope_qk(q, k, positions, inv_freq, attention_scaling, cos_sin)
