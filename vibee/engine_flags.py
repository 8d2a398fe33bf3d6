"""The engine's command-line flags, shared by `vibee serve` and `vibee bench throughput` (vLLM's
names). Two sorts: the engine's own settings (model, device, dtype, the measurement switches),
declared here; and one flag per knob that a kind's config model declares with `flag=`, made
here from that declaration (its names, type, help) and validated by that model when applied.
A flag left unset leaves the choice to the specs; the result is an EngineConfig."""

from __future__ import annotations

import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import click

from vibee.kinds.registry import KIND_NAMES, config_model

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)

ENGINE_OPTIONS = [
    click.option("--model", type=click.Path(exists=True, path_type=Path), default=None,
                 help="A local Hugging Face model directory or a .gguf file (default: the built-in models/vibee-tiny)."),
    click.option("--shape", type=click.Choice(["llama-3.2-1b", "llama-3.1-8b"]), default=None,
                 help="Run a well-known model's shape with random weights and no tokenizer (measurements, load tests)."),
    click.option("--spec-dir", type=_DIR, default=None, help="Directory of the .vibee specs, one per kind (default: specs/tri)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                 show_default=True, help="auto: float32 on a CPU, bfloat16 on a GPU."),
    click.option("--max-model-len", type=int, default=None, help="Longest prompt + completion (default: the model's)."),
    click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
                 help="Off: recompute every token each step (the naive baseline, for measurement)."),
    click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
                 help="Off: the generated reference attention."),
    click.option("--quant", type=click.Choice(["none", "int8", "int4", "fp8"]), default="none", show_default=True,
                 help="Quantize weights at load time: sets quantization.bits and code_type (the spec decides the rest); "
                      "fp8: e4m3 weights, activations rounded to fp8 per row on GPUs with fp8 tensor cores (W8A8)."),
    click.option("--speculative/--no-speculative", default=False, show_default=True,
                 help="Speculative decoding with the spec's drafter (spec: speculative_decode)."),
    click.option("--draft-model", type=_DIR, default=None,
                 help="Draft with this model (same tokenizer); implies --speculative with method draft_model."),
    click.option("--num-kv-blocks", type=int, default=None, help="Fix the KV cache size in blocks."),
    click.option("--enforce-eager", is_flag=True, default=False, help="No CUDA graphs for decode steps (GPU)."),
]


def _click_type(annotation: Any, where: str) -> Any:
    """The click type of a knob's annotation: conversion only; the config model checks the value."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0], where)  # an optional knob: the flag gives a value
    if typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in args):
        return click.Choice(args)
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"{where} declares a flag, but its type {annotation!r} has no command-line spelling")


def _knob_option(kind: str, field: str, param: str):
    info = config_model(kind).model_fields[field]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    names = [extra["flag"], *extra.get("aliases", [])]
    help_text = f"{info.description} (spec: {kind}.{field})"
    if info.annotation is bool:  # on and off: --x/--no-x, for each spelling
        switches = [f"{name}/--no-{name.removeprefix('--')}" for name in names]
        return click.option(*switches, param, default=None, help=help_text)
    return click.option(*names, param, type=_click_type(info.annotation, f"{kind}.{field}"), default=None, help=help_text)


def _knob_flags() -> dict[str, tuple[str, str]]:
    """Parameter name (the flag's, as click spells it: --block-size -> block_size) -> (kind, field)
    of every knob declared with a flag, in registry order."""
    flags = {}
    for kind in KIND_NAMES:
        for field, info in config_model(kind).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get("flag"):
                param = extra["flag"].removeprefix("--").replace("-", "_")
                if param in flags:
                    raise TypeError(f"{kind}.{field} and {'.'.join(flags[param])} both declare flag {extra['flag']}")
                flags[param] = (kind, field)
    return flags


KNOB_FLAGS = _knob_flags()


def split_flags(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(engine settings, knob settings {kind: {field: value}}) of flags given by parameter name;
    a knob flag left unset (None) is left to the spec."""
    settings, knobs = {}, {}
    for param, value in flags.items():
        if param not in KNOB_FLAGS:
            settings[param] = value
        elif value is not None:
            kind, field = KNOB_FLAGS[param]
            knobs.setdefault(kind, {})[field] = value
    return settings, knobs


def engine_options(f):
    for param, (kind, field) in reversed(KNOB_FLAGS.items()):
        f = _knob_option(kind, field, param)(f)
    for option in reversed(ENGINE_OPTIONS):
        f = option(f)
    return f


def engine_config(**flags: Any):
    """EngineConfig from the flags, knob flags gathered as {kind: {field: value}}; a bad engine
    setting exits 2 with the flag's name, and a flag whose feature is not built exits 2 saying so.
    Knob values are checked by their config model when the specs load (vibee.runtime.generated)."""
    from pydantic import ValidationError

    from vibee.runtime.config import EngineConfig

    settings, knobs = split_flags(flags)
    try:
        config = EngineConfig(**settings, knobs=knobs)
    except ValidationError as exc:
        for err in exc.errors():
            click.echo(f"error: --{str(err['loc'][0]).replace('_', '-')}: {err['msg']}", err=True)
        sys.exit(2)
    with user_errors():  # it reads the model's config.json (a pre-quantized checkpoint's format)
        problems = config.unbuilt_features()
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(2)
    return config


def render_user_error(exc: BaseException) -> str | None:
    """The text a mistake in the specs, the model directory or a setting is reported with (a spec
    error with its source line and caret); None for anything else (a bug: it keeps its traceback)."""
    from vibee.frontend.errors import SpecError
    from vibee.runtime.async_engine import EngineStartError
    from vibee.runtime.loader import LoadError

    if isinstance(exc, SpecError):
        return "\n".join(d.render() for d in exc.diagnostics)
    if isinstance(exc, EngineStartError):
        return str(exc)  # rendered in the engine's process
    if isinstance(exc, (LoadError, ValueError, OSError)):
        return f"error: {exc}"
    return None


@contextmanager
def user_errors():
    """A user's mistake ends the command with its message (render_user_error) and exit 2, never
    a traceback."""
    try:
        yield
    except Exception as exc:
        text = render_user_error(exc)
        if text is None:
            raise
        click.echo(text, err=True)
        sys.exit(2)
