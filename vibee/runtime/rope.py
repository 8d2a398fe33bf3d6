"""RoPE's inputs on the host side: the inverse frequencies of a model's rotary embedding (plain,
linear, llama3 and YaRN scaling, as transformers computes them), the module that keeps them, and
what each layer's RoPE is handed per forward. The rotation itself is the decoder spec's
(apply_rope_qk of the generated decoder module: its torch path, or its kernel on a GPU)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from vibee.runtime.model_config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (float32 [head_dim / 2]) and the factor cos/sin are scaled by."""
    dim, theta = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["rope_type"], scaling["factor"]
    if kind == "linear":  # positions divided by factor
        return inv_freq / factor, 1.0
    if kind == "llama3":
        # Long wavelengths (beyond the pretraining context / low_freq_factor) are slowed down by
        # factor, short ones (below context / high_freq_factor) kept, the band between blended.
        context = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        blend = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        blended = (1 - blend) * inv_freq / factor + blend * inv_freq
        out = torch.where(wavelen > context / low, inv_freq / factor, blended)
        return torch.where(wavelen < context / high, inv_freq, out), 1.0
    if kind == "yarn":
        return _yarn(config, inv_freq, factor)
    raise ValueError(f"unsupported rope type {kind!r}")  # ModelConfig only lets the above through


def _yarn(config: ModelConfig, inv_freq: torch.Tensor, factor: float) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions that rotate fewer than beta_slow times over the pretraining context are
    interpolated (divided by factor), those rotating more than beta_fast times kept, a linear
    ramp between; cos/sin grow by the attention factor (0.1 ln(factor) + 1 unless given)."""
    s = config.rope_scaling
    dim, theta, context = config.head_dim, config.rope_theta, s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32.0, s.get("beta_slow") or 1.0

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # weight of the original (extrapolated) frequency
    out = (inv_freq / factor) * (1 - keep) + inv_freq * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    return out, float(attention)


class Rotary(nn.Module):
    """A model's RoPE frequencies (a buffer on its device) and the factor cos/sin are scaled by."""

    def __init__(self, config: ModelConfig, device: torch.device | str):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)


class RopeInputs(NamedTuple):
    """What each layer's RoPE needs: positions [T], the float32 inverse frequencies and the cos/sin
    factor; cos_sin precomputed once per forward for the torch path (None where the fused kernel
    computes them itself)."""
    positions: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: float
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None
