"""AWQ (Lin et al., 2023): the few input channels that carry large activations matter most, so
before rounding, each input channel's weights are scaled up by s (and the input down by 1/s,
folded into the operation that produces it: an RMSNorm's weight, or the rows of the projection
before). Larger weights round with a smaller relative error. s = mean|x|^alpha, normalized, with
alpha picked on a grid by the layer's output error on calibration inputs; alpha = 0 (s = 1) is
round to nearest, so the search never does worse than it on those inputs.

Static code, copied (from the marker below on) into every generated quantization module, after
gptq.py (whose InputRecorder takes the layer's place during a calibration pass).
"""

from __future__ import annotations

from typing import Callable

import torch

# ---- copied into generated modules from here ----

AWQ_GRID = 20  # alphas 0, 1/20, ..., 19/20
AWQ_SAMPLE_ROWS = 8192  # input rows kept per layer to measure the output error on
AWQ_SAMPLE_STRIDE = 4  # every 4th row is kept (until there are enough): from more of the text than the first windows


class ActivationSample:
    """Mean |x| per input channel over every row a layer sees, and every AWQ_SAMPLE_STRIDE-th row of
    them up to AWQ_SAMPLE_ROWS."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.abs_total: torch.Tensor | None = None
        self.count = 0
        self.kept: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.in_features).to(torch.float32)
        total = rows.abs().sum(dim=0)
        self.abs_total = total if self.abs_total is None else self.abs_total + total
        self.count += rows.shape[0]
        room = AWQ_SAMPLE_ROWS - sum(r.shape[0] for r in self.kept)
        if room > 0:
            self.kept.append(rows[::AWQ_SAMPLE_STRIDE][:room].clone())

    def mean_abs(self) -> torch.Tensor:
        if self.abs_total is None:
            raise ValueError("the layer saw no calibration input: the calibration pass never reached it")
        return self.abs_total / self.count

    def rows(self) -> torch.Tensor:
        return torch.cat(self.kept)


def awq_scale(weight: torch.Tensor, sample: ActivationSample, roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The per-input-channel scale s [in] (float32) minimizing |x W^T - x (Q(W s) / s)^T| over the
    sample's rows, among s = mean|x|^alpha / sqrt(max * min) for the grid's alphas; roundtrip(W)
    is the dequantized round-to-nearest of W."""
    w = weight.detach().to(torch.float32)
    x = sample.rows().to(w.device)
    expected = x @ w.T
    mean_abs = sample.mean_abs().to(w.device).clamp(min=1e-4)
    best_error, best = float("inf"), torch.ones_like(mean_abs)
    for step in range(AWQ_GRID):
        s = mean_abs.pow(step / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()
        error = (x @ (roundtrip(w * s).to(torch.float32) / s).T - expected).pow(2).mean().item()
        if error < best_error:
            best_error, best = error, s
    return best
