"""Write a copy of a model whose activations have outlier channels, computing the same function.

    python scripts/make_outlier_model.py /tmp/vibee-tiny-outliers            # from the built-in model
    python scripts/make_outlier_model.py OUT --model DIR --channels 4 --factor 32

Large language models trained at scale carry a few input channels of each layer whose activations
are tens of times larger than the rest (the observation behind AWQ and SmoothQuant). The built-in
model, trained small, has none, so round-to-nearest int4 barely hurts it. This makes such a model
without training: in every decoder layer, `--channels` channels of each RMSNorm's weight are
multiplied by `--factor` and the matching input columns of the projections that read that norm
(q/k/v after input_layernorm, gate/up after post_attention_layernorm) are divided by it. The
product is unchanged (up to bfloat16 rounding), so the unquantized perplexity stays; but those
columns' weights become small next to their group's largest, round-to-nearest erases them, and
their large activations multiply the error. Calibrated methods see the activations and keep them:

    vibee bench perplexity --model /tmp/vibee-tiny-outliers --quant none,int4,int4:gptq,int4:awq

The channels are a seeded random choice per layer: they need not be special, the scaling is what
makes them outliers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def add_outliers(tensors: dict[str, torch.Tensor], channels: int, factor: float, seed: int = 0) -> int:
    """Scale `channels` channels of every decoder layer's norms by `factor` and the columns of
    the projections reading them by 1 / factor, in place; returns the layers changed."""
    if channels < 1 or factor <= 0:
        raise ValueError(f"--channels must be >= 1 and --factor > 0, got {channels}, {factor}")
    gen = torch.Generator().manual_seed(seed)
    layers = sorted({int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")})
    for layer in layers:
        prefix = f"model.layers.{layer}."
        for norm, readers in READERS.items():
            weight = tensors[prefix + norm + ".weight"]
            if channels > weight.numel():
                raise ValueError(f"--channels {channels} is more than the model's width {weight.numel()}")
            picked = torch.randperm(weight.numel(), generator=gen)[:channels]
            tensors[prefix + norm + ".weight"] = _scaled(weight, picked, factor, dim=0)
            for reader in readers:
                name = prefix + reader + ".weight"
                tensors[name] = _scaled(tensors[name], picked, 1.0 / factor, dim=1)
    return len(layers)


def _scaled(weight: torch.Tensor, index: torch.Tensor, factor: float, dim: int) -> torch.Tensor:
    out = weight.float().clone()
    out.index_copy_(dim, index, out.index_select(dim, index) * factor)
    return out.to(weight.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write (must not exist)")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "vibee-tiny", help="model directory to copy")
    parser.add_argument("--channels", type=int, default=4, help="outlier channels per norm in each layer")
    parser.add_argument("--factor", type=float, default=32.0, help="how much larger their activations get")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    weights = args.model / "model.safetensors"
    if not weights.is_file():
        parser.error(f"{weights}: no such file (a directory with one model.safetensors)")
    if args.out.exists():
        parser.error(f"{args.out} exists; choose a new directory")
    tensors = load_file(str(weights))
    try:
        layers = add_outliers(tensors, args.channels, args.factor, args.seed)
    except (ValueError, KeyError) as exc:
        parser.error(str(exc))
    shutil.copytree(args.model, args.out, ignore=shutil.ignore_patterns("model.safetensors", "medusa_heads.safetensors"))
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {args.out}: {args.channels} outlier channels x{args.factor:g} in each norm of {layers} layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
