"""What a generated decoder module provides to the model (vibee/runtime/model.py): the decoder
layer's ops. Each takes CUDA tensors to the spec's Triton kernels on the triton target and runs the
torch expressions everywhere else, so CPU results do not depend on the target."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class DecoderModule(Protocol):
    """The generated decoder module (vibee_gen/<module>.py)."""

    KERNELS: bool  # the triton target: CUDA tensors take the spec's kernels
    KVWrite: Any  # KVWrite(v, k_pages, v_pages, slots): where apply_rope_qk also stores K/V (a NamedTuple)

    def runs_kernels(self, x: torch.Tensor) -> bool:
        """Whether the ops send x to kernels: RoPE then computes cos/sin itself and may store K/V."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * normalised(h), h) with h = x + residual (x when residual is None)."""
        ...

    def rope_cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim] of the positions, in float32, cast to dtype (the torch path's input)."""
        ...

    def apply_rope_qk(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                      attention_scaling: float, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                      kv_write: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, D] and k [T, kv_heads, D] rotated; with kv_write (only where runs_kernels)
        the rotated k and v also stored in the KV pages at the tokens' slots."""
        ...

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias)."""
        ...

    def linear_silu_mul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """silu_mul(gate, up) of [gate | up] = F.linear(x, weight, bias): a merged gate_up projection and
        the MLP's activation (one kernel for a one-token step on a GPU)."""
        ...

    def rope_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    **rope_target: Any) -> torch.Tensor | None:
        """F.linear(x, weight, bias) for one token's QKV row with q and k rotated and k, v stored in
        the KV pages by the same kernel (rope_target: quantization's RopeTarget fields by name); None
        where no such launch applies."""
        ...
