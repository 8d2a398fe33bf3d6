"""Calibration for quantization methods that choose codes from what a model sees (GPTQ, AWQ): windows
of the Python standard library's source (text every machine has, and the built-in model's
training text), leaving out the files a model card lists as held out so that a held-out
perplexity still measures text the quantizer never saw; a pass of the model over them; and
AWQ's folds, where each scaled layer's inverse scale goes in vibee's Llama-family model."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from typing import Any, Callable

import torch

from vibee.runtime.attention import make_attention_batch

WINDOWS_PER_BATCH = 8


def held_out_files(model_dir: Path | None) -> set[str]:
    """Paths (relative to the stdlib) a model card's training_stats.json lists as held out."""
    stats = None if model_dir is None else model_dir / "training_stats.json"
    if stats is None or not stats.exists():
        return set()
    return set(json.loads(stats.read_text(encoding="utf-8")).get("data", {}).get("held_out_files", []))


def calibration_windows(tokenize: Callable[[str], list[int]], samples: int, seq_len: int,
                        exclude: set[str] = frozenset(), seed: int = 0) -> list[list[int]]:
    """`samples` windows of `seq_len` token ids, cut from stdlib source files in a seeded order
    (files named in `exclude`, relative to the stdlib, are skipped): consecutive windows of each
    file until there are enough."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if p.relative_to(root).as_posix() not in exclude
                   and "site-packages" not in p.parts and "test" not in p.parts)
    random.Random(seed).shuffle(files)
    windows: list[list[int]] = []
    for path in files:
        ids = tokenize(path.read_text(encoding="utf-8", errors="replace"))
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            windows.append(ids[start:start + seq_len])
            if len(windows) == samples:
                return windows
    if not windows:
        raise ValueError(f"no stdlib source under {root} is {seq_len} tokens long: lower calibration_seq_len")
    return windows  # all there is: fewer than asked


def calibration_pass(model: Any, windows: list[list[int]], device: str | torch.device) -> Callable[[], None]:
    """A function that runs `model` (vibee's LlamaForCausalLM) over the windows, logits included
    (so an lm_head sees its inputs too), WINDOWS_PER_BATCH at a time, with no KV cache."""

    @torch.inference_mode()
    def run() -> None:
        for i in range(0, len(windows), WINDOWS_PER_BATCH):
            chunk = windows[i:i + WINDOWS_PER_BATCH]
            lens = [len(w) for w in chunk]
            batch = make_attention_batch(lens, lens, None, 16, device)
            ids = torch.tensor([t for w in chunk for t in w], device=device)
            model.compute_logits(model(ids, batch.positions(), batch, None))

    return run


def awq_folds(model: Any) -> dict[str, Callable[[torch.Tensor], None]]:
    """Layer name -> a function that multiplies the layer's input channels by a factor, by changing
    what produces them (vibee's LlamaForCausalLM): qkv_proj's input is input_layernorm's output,
    gate_up_proj's post_attention_layernorm's, down_proj's the up half of gate_up_proj (times
    silu(gate)), o_proj's the v rows of qkv_proj when every query head has its own KV head, the
    lm_head's the final norm's unless it shares the embedding's weight."""
    config = model.config
    folds: dict[str, Callable[[torch.Tensor], None]] = {}

    def rows(linear: torch.nn.Linear, start: int) -> Callable[[torch.Tensor], None]:
        def fold(factor: torch.Tensor) -> None:
            linear.weight[start:].mul_(factor[:, None])
            if linear.bias is not None:
                linear.bias[start:].mul_(factor)
        return fold

    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        folds[prefix + "self_attn.qkv_proj"] = layer.input_layernorm.weight.mul_
        folds[prefix + "mlp.gate_up_proj"] = layer.post_attention_layernorm.weight.mul_
        folds[prefix + "mlp.down_proj"] = rows(layer.mlp.gate_up_proj, config.intermediate_size)
        if config.num_heads == config.num_kv_heads:
            folds[prefix + "self_attn.o_proj"] = rows(layer.self_attn.qkv_proj, 2 * config.num_heads * config.head_dim)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        folds["lm_head"] = model.model.norm.weight.mul_
    return folds
