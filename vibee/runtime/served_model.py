"""The model an engine serves: a Hugging Face directory (or a known shape with random weights)
on the generated attention, its tokenizer, and its weights quantized by the generated
quantization module when --quant asks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vibee.runtime.calibration import awq_folds, calibration_pass, calibration_windows, held_out_files
from vibee.runtime.config import EngineConfig
from vibee.runtime.generated import GeneratedModules
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model
from vibee.runtime.model_config import ModelConfig
from vibee.runtime.shapes import SyntheticTokenizer, random_model, shape_config


@dataclass
class ServedModel:
    model: Any  # LlamaForCausalLM, in eval mode
    config: ModelConfig
    tokenizer: Any
    weight_bytes_loaded: int  # before quantization
    weight_bytes: int  # as served
    quant_stats: Any  # what quantize_model reported (None: full precision)
    quant_method: str | None = None  # how the codes were chosen: rtn, gptq (at load), or the checkpoint's gptq/awq
    quant_source: str | None = None  # "quantized at load" or "<method> checkpoint"
    num_kv_heads: int = 0  # KV heads this rank computes (its KV cache holds them): all of them on one rank


def shard_served_model(model: Any, gen: GeneratedModules, ranks: Any) -> int:
    """Keep this rank's shard of every layer the spec's plan splits; returns its KV heads."""
    from vibee.runtime.tensor_parallel import shard_model

    plan = gen.configs.tensor_parallel
    return shard_model(model, gen.tensor_parallel, ranks.rank, ranks.size, ranks.group, sharding=plan.sharding,
                       gather_output=plan.gather_output, quant=gen.quantization).num_kv_heads


def load_served_model(config: EngineConfig, gen: GeneratedModules, *, dtype: torch.dtype, device: str,
                      progress: bool, ranks: Any = None) -> ServedModel:
    """ranks: the tensor-parallel group (rank_group.RankGroup) whose rank's shard to keep, or None."""
    if config.shape is not None:  # random weights of a known shape; its tokenizer only spells ids
        model_config = shape_config(config.shape)
        tokenizer = SyntheticTokenizer(model_config.vocab_size)
        model = random_model(model_config, gen, flash_attn=config.flash_attn, dtype=dtype, device=device, seed=config.seed)
    else:
        loaded = load_model_dir(config.model_dir, dtype=dtype, device=device, progress=progress)
        model_config, tokenizer = loaded.config, loaded.tokenizer
        model = build_model(loaded, gen, flash_attn=config.flash_attn)
    model.eval()
    loaded_bytes = gen.quantization.weight_bytes(model)
    quant_stats, method, source = None, None, None
    if config.quant != "none":
        model_dir = None if config.shape is not None else config.model_dir
        quant_stats = quantize(model, tokenizer, gen, model_dir, model_config.max_position_embeddings, device, progress)
        method = "fp8" if gen.quantization.CODE_TYPE == "fp8" else gen.quantization.METHOD
        source = "quantized at load"
    elif config.shape is None and loaded.quantization is not None:  # codes as the checkpoint holds them
        layers = sum(isinstance(m, gen.quantization.QuantLinear) for m in model.modules())
        quant_stats = gen.quantization.QuantStats(layers_quantized=layers, layers_skipped=0,
                                                  weight_bytes_before=loaded_bytes, weight_bytes_after=loaded_bytes)
        method, source = loaded.quantization.method, f"{loaded.quantization.method} checkpoint"
    num_kv_heads = shard_served_model(model, gen, ranks) if ranks is not None else model_config.num_kv_heads
    if quant_stats is not None and torch.device(device).type == "cuda":
        compile_quantized_kernels(model, gen, progress)
    return ServedModel(model, model_config, tokenizer, loaded_bytes, gen.quantization.weight_bytes(model), quant_stats,
                       method, source, num_kv_heads)


def quantize(model: Any, tokenizer: Any, gen: GeneratedModules, model_dir: Path | None, max_len: int, device: str,
             progress: bool) -> Any:
    """The generated quantize_model over `model`, with calibration text when the spec's method
    chooses codes from it (GPTQ, AWQ: stdlib windows, the model card's held-out files left out; AWQ's
    folds into the norms and projections), and a progress bar over its stages. Returns its QuantStats."""
    knobs = gen.configs.quantization
    if gen.quantization.METHOD == "rtn":
        return gen.quantization.quantize_model(model, knobs.skip_modules)
    seq_len = min(knobs.calibration_seq_len, max_len)
    windows = calibration_windows(lambda text: tokenizer.encode(text, add_special_tokens=False),
                                  knobs.calibration_samples, seq_len, held_out_files(model_dir))
    calibrate = calibration_pass(model, windows, device)
    folds = awq_folds(model)
    if not progress:
        return gen.quantization.quantize_model(model, knobs.skip_modules, calibrate, folds=folds)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    label = f"[bold]{gen.quantization.METHOD} int{gen.quantization.BITS}[/] over {len(windows)} x {seq_len} tokens"
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("stages"), TimeElapsedColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("", total=None)
        return gen.quantization.quantize_model(model, knobs.skip_modules, calibrate,
                                               lambda done, total: bar.update(task, completed=done, total=total), folds)


def compile_quantized_kernels(model: Any, gen: GeneratedModules, progress: bool) -> int:
    """Compile the quantized layers' kernel launches for every step size up to the largest step
    (max_num_batched_tokens) now, not on the first step of that size while requests wait."""
    rows = gen.configs.continuous_batch.max_num_batched_tokens
    if not progress:
        return gen.quantization.compile_kernels(model, rows)
    from rich.console import Console

    with Console(stderr=True).status(f"compiling the quantized layers' kernels for 1..{rows} rows"):
        return gen.quantization.compile_kernels(model, rows)


def max_model_len_for(config: EngineConfig, model_config: Any) -> int:
    """--max-model-len, or the model's whole context; longer than the model's is an error."""
    limit = model_config.max_position_embeddings
    if config.max_model_len and config.max_model_len > limit:
        raise ValueError(f"--max-model-len {config.max_model_len} is longer than the model's "
                         f"max_position_embeddings ({limit})")
    return min(config.max_model_len or limit, limit)
