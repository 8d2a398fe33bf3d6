"""`vibee profile`: where a decode step's time goes, kernel by kernel, against the machine's
ceilings measured in the same run (vibee/bench/profile_step.py measures; this reports and plots).
`--compare` profiles a second spec directory (or `--compare-quant` a second precision) in the
same process, one model at a time, and puts the two side by side."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import click

from vibee.bench.report import Section, environment, finish
from vibee.engine_flags import user_errors

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
QUANTS = ["none", "int8", "int4", "fp8"]
TOP_KERNELS = 15


@click.command()
@click.option("--shape", type=click.Choice(["llama-3.2-1b", "llama-3.1-8b"]), default=None,
              help="A well-known model's shape with random weights (no files); default: --model.")
@click.option("--model", type=_DIR, default=None, help="A local Hugging Face model directory (default: the built-in models/vibee-tiny).")
@click.option("--spec-dir", type=_DIR, default=None, help="Directory of the .vibee specs, one per kind (default: specs/tri).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--quant", type=click.Choice(QUANTS), default="none", show_default=True)
@click.option("--phase", type=click.Choice(["decode", "prefill"]), default="decode", show_default=True,
              help="decode: one new token a sequence; prefill: whole prompts of --context-len tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences in the step.")
@click.option("--context-len", type=click.IntRange(min=4), default=512, show_default=True,
              help="Every sequence's length at the profiled step (its KV read; in prefill, its prompt).")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="Decode steps profiled (averaged).")
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True)
@click.option("--compare", "compare_dir", type=_DIR, default=None,
              help="A second spec directory, profiled the same way and shown beside the first.")
@click.option("--compare-quant", type=click.Choice(QUANTS), default=None,
              help="A second precision, profiled the same way and shown beside the first.")
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/profile"),
              show_default=True)
def profile(shape, model, spec_dir, device, dtype, quant, phase, batch_size, context_len, steps, flash_attn, compare_dir,
            compare_quant, result_dir):
    """Each kernel of a decode (or prefill) step: its time, the bytes and FLOPs of its work, and the share of
    the bandwidth or compute ceiling it reaches; the step's total against its limit; a plot."""
    from rich.console import Console

    from vibee.bench.ceilings import measure_ceilings
    from vibee.runtime.engine import TORCH_DTYPES

    out = Console()
    base = {"shape": shape, "model": None if model is None else str(model), "spec_dir": spec_dir, "device": device,
            "dtype": dtype, "quant": quant, "flash_attn": flash_attn, "enforce_eager": False}
    variants = [("A", base)]
    if compare_dir is not None or compare_quant is not None:
        variants.append(("B", {**base, "spec_dir": compare_dir or spec_dir, "quant": compare_quant or quant}))
    results, ceilings = [], None
    with user_errors():
        for label, params in variants:
            result = _profile_variant(params, phase=phase, batch_size=batch_size, context_len=context_len, steps=steps)
            if ceilings is None:
                ceilings = measure_ceilings(result["device"], TORCH_DTYPES[result["dtype_name"]])
            results.append((label, params, result))
    bandwidth, compute = ceilings.copy_tb_s * 1e12, ceilings.matmul_tflop_s * 1e12
    first = results[0][2]
    env = environment(first["device"])
    title = f"vibee profile: {first['name']}, {phase}, batch {batch_size}, context {context_len} on {env.get('device_name', first['device'])}"
    sections, data_variants = [], {}
    rows_of = {label: _rows(result, bandwidth, compute) for label, _, result in results}
    for label, params, result in results:
        rows, summary = rows_of[label]
        sections.append(Section(f"{label}: {_describe(params)}", _HEADER, _table(rows, summary)))
        sections.append(Section(f"{label}: longest kernels", ["Scope", "Kernel", "Launches", "µs/step"],
                                [[k.scope, k.kernel[:80], k.launches, 1e6 * k.seconds]
                                 for k in sorted(result["profile"].kernels, key=lambda k: -k.seconds)[:TOP_KERNELS]]))
        data_variants[label] = {"settings": _describe(params), "modules": result["modules"],
                                "kv_block_size": result["kv_block_size"], "summary": summary,
                                "scopes": [r.__dict__ | {"fraction": r.fraction} for r in rows],
                                "kernels": [k.__dict__ for k in result["profile"].kernels]}
    if len(results) == 2:
        sections.append(_comparison(*(rows_of[label][0] for label, _, _ in results),
                                    *(r["profile"].kernel_seconds for _, _, r in results)))
    notes = [f"Eager steps under torch.profiler, {steps} averaged, after warm-up; a kernel belongs to the innermost "
             "named scope it was launched in (module paths, layers folded). Work is the least a scope must move "
             "(weights once, activations in and out, the KV read and written) and its FLOPs; the limit is "
             "max(bytes / bandwidth, FLOPs / compute) at the ceilings below.",
             f"Ceilings measured in this run: {ceilings.how}: {ceilings.copy_tb_s:.2f} TB/s, "
             f"{ceilings.matmul_tflop_s:.1f} TFLOP/s ({ceilings.dtype})."]
    sections.append(Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()]))
    data = {"benchmark": "profile", "phase": phase, "batch_size": batch_size, "context_len": context_len, "steps": steps,
            "variants": data_variants, "ceilings": ceilings.as_dict(), "environment": env}
    json_path = finish(out, result_dir, "profile", data, title, sections, notes)
    png = plot_profile([(label, rows_of[label][0]) for label, _, _ in results], json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)


def _describe(params: dict[str, Any]) -> str:
    return f"specs {params['spec_dir'] or 'specs/tri'}, quant {params['quant']}"


def _profile_variant(params: dict[str, Any], *, phase: str, batch_size: int, context_len: int,
                     steps: int) -> dict[str, Any]:
    """Build the variant's model, profile its step, time a decode step as the engine runs it (CUDA
    graph replay on a GPU) and free the model before the next variant."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vibee.bench.latency import build_rank_model, measure_decode
    from vibee.bench.profile_step import profile_step
    from vibee.runtime.cuda_graphs import num_sms, splits_for_batch

    err = Console(stderr=True)
    run = build_rank_model(params, progress=True)
    model, gen, dev = run["model"], run["gen"], run["device"]
    block_size = gen.configs.kv_cache.block_size
    warmup = 2
    with Progress(TextColumn(f"[bold]profiling {phase}, {_describe(params)}"), BarColumn(), MofNCompleteColumn(), console=err) as bar:
        task = bar.add_task("steps", total=warmup + steps)
        # On a GPU the decode attention gets the fixed split count the engine's graph for this batch uses.
        splits = (splits_for_batch(gen.flash_attention.num_splits_for(context_len + steps), batch_size,
                                   run["num_kv_heads"], num_sms(dev)) if run["cuda_graphs"] else None)
        prof = profile_step(model, gen.kv_cache, batch_size=batch_size, context_len=context_len, device=dev,
                            block_size=block_size, phase=phase, num_kv_heads=run["num_kv_heads"], steps=steps,
                            warmup_steps=warmup, num_splits=splits, on_step=lambda: bar.advance(task))
    graph_step = None
    if run["cuda_graphs"] and phase == "decode":  # the same step replayed as a CUDA graph: what a served step costs
        decode = 8
        prompt_len = max(1, context_len - warmup - decode // 2)
        splits = splits_for_batch(gen.flash_attention.num_splits_for(prompt_len + warmup + decode + 1), batch_size,
                                  run["num_kv_heads"], num_sms(dev))
        measured = measure_decode(model, gen.kv_cache, batch_size=batch_size, prompt_len=prompt_len, decode_steps=decode,
                                  warmup_steps=warmup, device=dev, block_size=block_size, num_splits=splits,
                                  num_kv_heads=run["num_kv_heads"])
        graph_step = sorted(measured["step_times_s"])[decode // 2]
    result = {"profile": prof, "graph_step_s": graph_step, "name": run["name"], "device": dev,
              "dtype_name": run["dtype_name"], "modules": str(gen.source), "kv_block_size": block_size}
    del run, model
    gc.collect()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


_HEADER = ["Scope", "Kernels", "µs/step", "% of step", "Bytes", "FLOPs", "Achieved", "Limit µs", "% of limit"]


def _rows(result: dict[str, Any], bandwidth: float, compute: float):
    from vibee.bench.profile_step import scope_rows

    p = result["profile"]
    rows = scope_rows(p, bandwidth, compute)
    limit = sum(r.limit_seconds for r in rows)
    summary = {"kernel_seconds": p.kernel_seconds, "bytes": sum(r.bytes for r in rows),
               "flops": sum(r.flops for r in rows), "limit_seconds": limit,
               "fraction_of_limit": limit / p.kernel_seconds if p.kernel_seconds else None,
               "graph_step_seconds": result["graph_step_s"]}
    if result["graph_step_s"]:
        summary["graph_fraction_of_limit"] = limit / result["graph_step_s"]
    return rows, summary


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _si(value: float, unit: str) -> str:
    """1.5e9, "B" -> "1.50 GB"."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _achieved(r) -> str:
    """The rate against the ceiling that bounds the scope: bytes/s or FLOP/s."""
    if not r.seconds:
        return ""
    return _si(r.flops / r.seconds, "FLOP/s") if r.bound == "compute" else _si(r.bytes / r.seconds, "B/s")


def _table(rows, summary) -> list[list[Any]]:
    total = summary["kernel_seconds"]
    table = []
    for r in rows:
        counted = r.bytes or r.flops  # copies outside the scopes have no work counted
        table.append([r.scope, r.kernels, 1e6 * r.seconds, _pct(r.seconds / total if total else None),
                      _si(r.bytes, "B") if counted else "-", _si(r.flops, "FLOP") if r.flops else "-",
                      _achieved(r) if counted else "-", 1e6 * r.limit_seconds if counted else "-",
                      f"{_pct(r.fraction)} ({r.bound})" if counted and r.fraction is not None else "-"])
    table.append(["all kernels", sum(r.kernels for r in rows), 1e6 * total, "100%", _si(summary["bytes"], "B"),
                  _si(summary["flops"], "FLOP"), "", 1e6 * summary["limit_seconds"], _pct(summary["fraction_of_limit"])])
    if summary["graph_step_seconds"]:
        table.append(["step (CUDA graph replay)", "", 1e6 * summary["graph_step_seconds"], "", "", "", "",
                      1e6 * summary["limit_seconds"], _pct(summary["graph_fraction_of_limit"])])
    return table


def _comparison(rows_a, rows_b, total_a: float, total_b: float) -> Section:
    a = {r.scope: r for r in rows_a}
    b = {r.scope: r for r in rows_b}
    table = []
    for scope in list(dict.fromkeys([*a, *b])):
        ta, tb = (1e6 * x[scope].seconds if scope in x else None for x in (a, b))
        table.append([scope, "" if ta is None else ta, "" if tb is None else tb, f"{tb / ta:.2f}x" if ta and tb else ""])
    table.append(["all kernels", 1e6 * total_a, 1e6 * total_b, f"{total_b / total_a:.2f}x" if total_a else ""])
    return Section("B against A", ["Scope", "A µs/step", "B µs/step", "B / A"], table)


def plot_profile(variants, path: Path, title: str) -> Path:
    """Time per scope (bars, one per variant) with each scope's limit marked."""
    import numpy as np

    from vibee.bench.plot import figure, save

    scopes = list(dict.fromkeys(r.scope for _, rows in variants for r in rows))
    y = np.arange(len(scopes))
    height = 0.8 / len(variants)
    fig, ax = figure(figsize=(10, 0.45 * len(scopes) + 1.5))
    for i, (label, rows) in enumerate(variants):
        by = {r.scope: r for r in rows}
        us = [1e6 * by[s].seconds if s in by else 0 for s in scopes]
        limit = [1e6 * by[s].limit_seconds if s in by else np.nan for s in scopes]
        offset = y + (i - (len(variants) - 1) / 2) * height
        ax.barh(offset, us, height=height, label=f"{label}: kernel time")
        ax.plot(limit, offset, "k|", markersize=10, label="limit at the ceilings" if i == 0 else None)
    ax.set_yticks(y, scopes)
    ax.invert_yaxis()
    ax.set_xlabel("µs per step")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return save(fig, path, title)
