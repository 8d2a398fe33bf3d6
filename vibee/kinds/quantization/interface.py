"""What a generated quantization module provides to the runtime: the compile-time choices the
runtime reports (read here, never from a second copy), quantize_model to swap a model's linear
layers, and the QuantLinear twin the benchmarks time."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import nn


class QuantLinear(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class QuantLinearClass(Protocol):
    def from_linear(self, linear: nn.Linear, *, dtype: torch.dtype = ...) -> QuantLinear: ...


class QuantizationModule(Protocol):
    """The generated quantization module (vibee_gen/<module>.py)."""

    BITS: int  # bits per weight code
    GROUP_SIZE: int  # input weights per scale; -1: one scale per output channel
    QuantLinear: QuantLinearClass

    def quantize_model(self, model: nn.Module, skip_modules: Sequence[str]) -> Any:
        """Swap model's nn.Linear layers (except skip_modules, the spec's list the runtime passes) for QuantLinear; returns a QuantStats."""
        ...

    def weight_bytes(self, model: nn.Module) -> int: ...

    def compile_kernels(self, model: nn.Module, max_rows: int) -> int:
        """Compile before serving every kernel launch model's quantized layers take for 1..max_rows rows; returns how many ran."""
        ...
