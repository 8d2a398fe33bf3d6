"""GPTQ (Frantar et al., 2022): codes chosen one input column at a time, each column's rounding
error spread over the columns not yet quantized in proportion to how the layer's inputs
correlate (the inverse Hessian of the layer's output error, H = X^T X / n over calibration
inputs X), so the layer's outputs on such inputs move less than round-to-nearest moves them.

Static code, copied (from the marker below on) into every generated quantization module, whose
quantizer supplies each group's scale (and zero point) from the weights as they stand when the
group's first column is reached, the rule round-to-nearest uses.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ---- copied into generated modules from here ----

GPTQ_BLOCK = 128  # columns whose errors are applied to the rest of the weight at once (speed, not results)

# (weight columns of one group [out, group]) -> (scale [out] as stored, zero point [out] or None)
GroupParams = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


class HessianSum:
    """X^T X over every row of input a linear layer sees (float32, on the input's device)."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.total: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_features).to(torch.float32)
        if self.total is None:
            self.total = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=rows.device)
        self.total.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def mean(self) -> torch.Tensor:
        if self.total is None or self.rows == 0:
            raise ValueError("the layer saw no calibration input: the calibration pass never reached it")
        return self.total / self.rows


class InputRecorder(nn.Module):
    """A linear layer that hands every input it is called on to `sink` (its .add), then runs as
    itself: a calibration pass puts it in the layer's place (GPTQ's Hessians, AWQ's samples)."""

    def __init__(self, linear: nn.Linear, sink):
        super().__init__()
        self.layer = (linear,)  # a tuple: not a submodule, so the model's module tree keeps one copy
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sink.add(x)
        linear = self.layer[0]
        return F.linear(x, linear.weight, linear.bias)


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float, qmin: int, qmax: int,
               group_params: GroupParams, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes [out, in] (int16), scales [out, n_groups] (float32, the stored values) and zero points
    [out, n_groups] (None when symmetric) of `weight` [out, in] by GPTQ with `hessian` [in, in].

    `damp` times the Hessian's mean diagonal is added to its diagonal (inputs that never vary
    otherwise make it singular); an input that was always 0 keeps code 0's weight. A group's scale
    comes from group_params over its columns when its first column is reached. act_order: the
    columns go in the order of their Hessian diagonal, largest first (the inputs with the largest
    activations are rounded while the most columns are left to take up their error), and every
    group's scale comes from the weights before any update ("static groups": a group's columns
    are no longer reached together), so the stored layout is unchanged."""
    out_features, in_features = weight.shape
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor | None] = []
    col_scale = torch.empty_like(w)  # each column's scale and zero point, in processing order
    col_zero = torch.zeros_like(w)
    order = None
    if act_order:
        for start in range(0, in_features, group_size):
            scale, zero = group_params(w[:, start:start + group_size])
            scales.append(scale.to(torch.float32))
            zeros.append(zero)
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
        group_of = (order // group_size).to(w.device)
        col_scale = torch.stack(scales, dim=1)[:, group_of]
        if zeros[0] is not None:
            col_zero = torch.stack(zeros, dim=1).to(torch.float32)[:, group_of]
    # The upper Cholesky factor of H^-1: row i holds how column i's error moves the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(out_features, in_features, dtype=torch.int16, device=w.device)
    block = min(GPTQ_BLOCK, group_size)  # a group starts on a block: its columns have every earlier error
    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        if not act_order and start % group_size == 0:
            scale, zero = group_params(w[:, start:start + group_size])
            scales.append(scale.to(torch.float32))
            zeros.append(zero)
            col_scale[:, start:start + group_size] = scales[-1][:, None]
            if zero is not None:
                col_zero[:, start:start + group_size] = zero.to(torch.float32)[:, None]
        cols = w[:, start:stop]  # updated in place as each column's error arrives
        errors = torch.empty_like(cols)
        for j in range(stop - start):
            scale, zero = col_scale[:, start + j], col_zero[:, start + j]
            code = torch.clamp(torch.round(cols[:, j] / scale) + zero, qmin, qmax)
            codes[:, start + j] = code.to(torch.int16)
            error = (cols[:, j] - (code - zero) * scale) / hinv[start + j, start + j]
            cols[:, j:] -= error[:, None] * hinv[start + j, start + j:stop][None, :]
            errors[:, j] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    zero_points = None if zeros[0] is None else torch.stack(zeros, dim=1)
    return codes, torch.stack(scales, dim=1), zero_points
