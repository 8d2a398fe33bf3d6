"""What a generated decoder module provides to the model (vibee/runtime/model.py): the decoder
layer's ops. Each takes CUDA tensors to the spec's Triton kernels on the triton target and runs the
torch expressions everywhere else, so CPU results do not depend on the target."""

from __future__ import annotations

from typing import Protocol

import torch


class DecoderModule(Protocol):
    """The generated decoder module (vibee_gen/<module>.py)."""

    KERNELS: bool  # the triton target: CUDA tensors take the spec's kernels

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * normalised(h), h) with h = x + residual (x when residual is None)."""
        ...

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias)."""
        ...

    def silu_mul_linear(self, gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(silu_mul(gate, up), weight, bias) for gate_up = cat(gate, up) along the last dim."""
        ...
