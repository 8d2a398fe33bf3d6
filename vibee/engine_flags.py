"""The engine's command-line flags, shared by `vibee serve` and `vibee bench throughput` (vLLM's
names). A flag left unset leaves the choice to the specs; the result is an EngineConfig."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)

ENGINE_OPTIONS = [
    click.option("--model", type=_DIR, default=None,
                 help="A local Hugging Face model directory (default: the built-in models/vibee-tiny)."),
    click.option("--shape", type=click.Choice(["llama-3.2-1b", "llama-3.1-8b"]), default=None,
                 help="Run a well-known model's shape with random weights and no tokenizer (measurements, load tests)."),
    click.option("--spec-dir", type=_DIR, default=None, help="Directory of the six .vibee specs (default: specs/tri)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                 show_default=True, help="auto: float32 on a CPU, bfloat16 on a GPU."),
    click.option("--max-model-len", type=int, default=None, help="Longest prompt + completion (default: the model's)."),
    click.option("--gpu-memory-utilization", type=float, default=None, help="Share of GPU memory to use (spec: kv_cache)."),
    click.option("--block-size", type=int, default=None, help="Tokens per KV block (spec: kv_cache.block_size)."),
    click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None,
                 help="Reuse KV of shared prompt prefixes (spec: kv_cache)."),
    click.option("--max-num-seqs", "--batch-size", "max_num_seqs", type=int, default=None,
                 help="Most sequences in a step (spec: continuous_batch)."),
    click.option("--max-num-batched-tokens", type=int, default=None, help="Token budget of a step (spec: continuous_batch)."),
    click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
                 help="Off: recompute every token each step (the naive baseline, for measurement)."),
    click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
                 help="Off: the generated reference attention."),
    click.option("--quant", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
                 help="Quantize weights at load time (spec: quantization)."),
    click.option("--speculative/--no-speculative", default=False, show_default=True,
                 help="Speculative decoding with the spec's drafter (spec: speculative_decode)."),
    click.option("--draft-model", type=_DIR, default=None,
                 help="Draft with this model (same tokenizer); implies --speculative with method draft_model."),
    click.option("--num-speculative-tokens", type=int, default=None, help="Draft tokens per step (spec: speculative_decode)."),
    click.option("--tensor-parallel-size", type=int, default=1, show_default=True),
    click.option("--num-kv-blocks", type=int, default=None, help="Fix the KV cache size in blocks."),
    click.option("--enforce-eager", is_flag=True, default=False, help="No CUDA graphs for decode steps (GPU)."),
]


def engine_options(f):
    for option in reversed(ENGINE_OPTIONS):
        f = option(f)
    return f


def engine_config(**flags: Any):
    """EngineConfig from the flags; a bad value exits 2 with the flag's name, and a flag whose
    feature is not built exits 2 saying so."""
    from pydantic import ValidationError

    from vibee.runtime.config import EngineConfig

    try:
        config = EngineConfig(**flags)
    except ValidationError as exc:
        for err in exc.errors():
            click.echo(f"error: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", err=True)
        sys.exit(2)
    problems = config.unbuilt_features()
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(2)
    return config


@contextmanager
def user_errors():
    """A mistake in the specs, the model directory or a setting ends the command with its message
    (a spec error with its source line and caret) and exit 2, never a traceback."""
    from vibee.runtime.loader import LoadError
    from vibee.frontend.errors import SpecError

    try:
        yield
    except SpecError as exc:
        for d in exc.diagnostics:
            click.echo(d.render(), err=True)
        sys.exit(2)
    except (LoadError, ValueError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
