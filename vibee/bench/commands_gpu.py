"""`vibee bench latency`, `perplexity` and `kernels`: the model runner and the generated kernels
measured in process (registered on the bench group in vibee/bench/cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vibee.engine_flags import engine_config, user_errors
from vibee.bench.report import Section, environment, fail, finish
from vibee.kinds.quantization.config import METHOD_NAMES


# --- latency -------------------------------------------------------------------------------------


@click.command()
@click.option("--shape", type=click.Choice(["llama-3.2-1b", "llama-3.1-8b"]), default=None,
              help="A well-known model's shape with random weights (no files); default: --model.")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A local Hugging Face model directory (default: the built-in models/vibee-tiny).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--decode-steps", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--quant", type=click.Choice(["none", "int8", "int4", "fp8"]), default="none", show_default=True)
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True)
@click.option("--bandwidth-gbs", type=float, default=None,
              help="Memory bandwidth ceiling for the limit (default: a device-to-device copy measured in this run).")
@click.option("--enforce-eager", is_flag=True, default=False, help="No CUDA graphs (on a GPU, steps replay graphs).")
@click.option("--sync-steps", is_flag=True, default=False,
              help="Wait for each step before preparing the next, so that each also pays its host work (default: "
                   "replayed steps go back to back, as the engine launches them, timed on the GPU).")
@click.option("--tensor-parallel-size", "-tp", "tp_size", type=click.IntRange(min=1, max=8), default=1, show_default=True,
              help="Shard the model over N ranks, one process each (launched here, or by torchrun), every rank "
                   "running the same steps; the figures are rank 0's, its limit from its shard's bytes.")
@click.option("--spec-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Directory of the .vibee specs, one per kind (default: specs/tri).")
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def latency(shape, model, device, dtype, batch_size, prompt_len, decode_steps, warmup_steps, quant, flash_attn,
            bandwidth_gbs, enforce_eager, sync_steps, tp_size, spec_dir, result_dir):
    """Decode tokens/s of the model runner and the fraction of the memory-bandwidth limit."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vibee.bench.ceilings import measure_ceilings
    from vibee.bench.latency import measure_rank, plot_decode, summarize_decode, weight_bytes
    from vibee.bench.latency_rank import latency_ranks
    from vibee.runtime.engine import TORCH_DTYPES

    out, err = Console(), Console(stderr=True)
    params = {"shape": shape, "model": None if model is None else str(model), "device": device, "dtype": dtype,
              "batch_size": batch_size, "prompt_len": prompt_len, "decode_steps": decode_steps,
              "warmup_steps": warmup_steps, "quant": quant, "flash_attn": flash_attn, "enforce_eager": enforce_eager,
              "tp_size": tp_size, "sync_steps": sync_steps, "spec_dir": None if spec_dir is None else str(spec_dir)}
    progress = Progress(TextColumn("[bold]decode steps"), BarColumn(), MofNCompleteColumn(), console=err)
    with user_errors():
        ranks = latency_ranks(params)
        try:
            with progress:
                task = progress.add_task("steps", total=warmup_steps + decode_steps)
                run = measure_rank(params, ranks, on_step=lambda: progress.advance(task), progress=True)
        except BaseException:
            if ranks is not None:
                ranks.close()
            raise
        if ranks is not None:
            ranks.finish()
    if ranks is not None and ranks.rank > 0:  # under torchrun: rank 0 reports
        return
    measured, runner, model_config, name = run["measured"], run["model"], run["model_config"], run["name"]
    dev, dtype_name, loaded_bytes = run["device"], run["dtype_name"], run["loaded_bytes"]
    block_size = run["gen"].configs.kv_cache.block_size
    # What this rank's step reads: its shard of the weights and of the KV heads.
    kv_bytes_per_token = 2 * model_config.num_layers * run["num_kv_heads"] * model_config.head_dim * \
        TORCH_DTYPES[dtype_name].itemsize
    ceilings = None if bandwidth_gbs else measure_ceilings(dev, TORCH_DTYPES[dtype_name])
    bandwidth = bandwidth_gbs or 1000 * ceilings.copy_tb_s
    bandwidth_source = "--bandwidth-gbs" if bandwidth_gbs else "device-to-device copy measured in this run"
    summary = summarize_decode(measured, batch_size=batch_size, weight_bytes_=weight_bytes(runner, batch_size),
                               kv_bytes_per_token=kv_bytes_per_token, bandwidth_gbs=bandwidth)
    summary["bandwidth_source"] = bandwidth_source
    settings = {"model": name, "device": dev, "dtype": dtype_name, "quant": quant, "flash_attn": flash_attn,
                "batch_size": batch_size, "prompt_len": prompt_len, "decode_steps": decode_steps,
                "warmup_steps": warmup_steps, "block_size": block_size, "weight_bytes_loaded": loaded_bytes,
                "cuda_graphs": run["cuda_graphs"], "step_timing": measured["timing"], "tensor_parallel_size": tp_size,
                "modules": str(run["gen"].source)}
    env = environment(dev)
    s = summary
    rows = [["Tokens/s", s["tokens_per_s"]], ["Mean step (ms)", s["mean_step_ms"]],
            ["Median step (ms)", s["median_step_ms"]], ["Weight bytes read per step", s["weight_bytes"]],
            ["Bytes read per step (weights + KV)", s["bytes_per_step"]], ["Achieved GB/s", s["achieved_gbs"]]]
    if "fraction_of_limit" in s:
        rows += [["Bandwidth ceiling (GB/s)", f"{s['bandwidth_gbs']:.1f} ({bandwidth_source})"],
                 ["Bandwidth-limit tokens/s", s["limit_tokens_per_s"]],
                 ["Fraction of the limit", f"{100 * s['fraction_of_limit']:.1f}%"]]
    title = f"vibee bench latency: {name} on {env.get('device_name', dev)}"
    notes = [f"Greedy decode after a {prompt_len}-token prompt; {warmup_steps} warm-up steps are not timed. The "
             "limit is the bytes a step must read (weights once, plus the batch's KV) over the bandwidth ceiling.",
             f"Steps timed {measured['timing']}: " + (
                 "launched as the engine launches them, the host preparing a step while the one before runs."
                 if measured["timing"].startswith("back") else "each step's host work is in its time.")]
    sections = [Section("Results", ["Metric", "Value"], rows),
                Section("Settings", ["Setting", "Value"], [[k, v] for k, v in settings.items()]),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    if ceilings is not None:
        notes.append(f"Ceilings measured in this run: {ceilings.how}.")
    data = {"benchmark": "latency", "settings": settings, "results": summary, "measured": measured,
            "ceilings": None if ceilings is None else ceilings.as_dict(), "environment": env}
    json_path = finish(out, result_dir, "latency", data, title, sections, notes)
    png = plot_decode(measured, summary, json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)


# --- perplexity ----------------------------------------------------------------------------------


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A local Hugging Face model directory (default: the built-in models/vibee-tiny).")
@click.option("--text-file", "text_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Score these files (default: the model's held-out files from its training_stats.json).")
@click.option("--quant", "quants", default="none,int8,int4", show_default=True,
              help="Comma-separated weight precisions to compare: none, int8, int4, fp8; int8/int4 may name the "
                   "method after a colon (int4:rtn, int4:gptq, int4:awq; default: the spec's).")
@click.option("--group-size", type=int, default=None,
              help="Input weights per scale for the quantized rows (spec: quantization.group_size; default: the spec's).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per scored window.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score only the first N tokens.")
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def perplexity(model, text_files, quants, group_size, device, dtype, window, max_tokens, result_dir):
    """Held-out perplexity with unquantized, int8 and int4 weights (what --quant costs). A
    precision that cannot be applied to the model is reported in its row; the others still are."""
    from rich.console import Console

    from vibee.bench.perplexity import held_out_texts, perplexity as score, token_stream
    from vibee.engine_flags import render_user_error
    from vibee.runtime.engine import TORCH_DTYPES
    from vibee.runtime.generated import load_generated
    from vibee.runtime.loader import load_model_dir
    from vibee.runtime.model import build_model
    from vibee.runtime.served_model import quantize

    out = Console()
    wanted = [q.strip() for q in quants.split(",") if q.strip()]
    methods = ("", ":rtn", ":gptq", ":awq")
    bad = [q for q in wanted if q not in {"none", "fp8"} and q not in {f"{b}{m}" for b in ("int8", "int4") for m in methods}]
    if bad or not wanted or len(set(wanted)) < len(wanted):
        fail(f"--quant takes none, int8, int4 and fp8 (int8/int4 with :rtn, :gptq or :awq) separated by commas, once each, "
             f"got {quants!r}")
    rows, figures = [], {}
    base = engine_config(model=model, device=device, dtype=dtype)
    dev = base.resolve_device()
    dtype_name = base.resolve_dtype(dev)
    with user_errors():
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in text_files] or held_out_texts(base.model_dir)
    for quant in wanted:
        bits, _, method = quant.partition(":")
        knobs = {} if bits in ("none", "fp8") else {"group_size": group_size, "quant_method": method or None}
        config = engine_config(model=model, device=device, dtype=dtype, quant=bits,
                               **{k: v for k, v in knobs.items() if v is not None})
        try:
            gen = load_generated(config.spec_dir, config.knob_settings(dtype_name))
            loaded = load_model_dir(config.model_dir, dtype=TORCH_DTYPES[dtype_name], device=dev, progress=False)
            runner = build_model(loaded, gen).eval()
            if bits != "none":
                quantize(runner, loaded.tokenizer, gen, config.model_dir, loaded.config.max_position_embeddings, dev,
                         progress=True)
        except Exception as exc:  # a user's mistake or a model this precision does not fit: its row says so
            if render_user_error(exc) is None:
                raise
            figures[quant] = {"error": str(exc)}
            out.print(f"--quant {quant}: {exc}", style="red", highlight=False)
            continue
        eos = sorted(loaded.config.eos_token_ids)
        ids = token_stream(loaded.tokenizer, texts, eos[0] if eos else None)
        figures[quant] = score(runner, ids, window, max_tokens, dev)
        # What the generated module was compiled with, not a second copy of the spec's values.
        figures[quant]["quantization"] = ({"bits": gen.quantization.BITS, "group_size": gen.quantization.GROUP_SIZE,
                                           "method": gen.quantization.METHOD} if bits != "none" else None)
    scored = [q for q in wanted if "perplexity" in figures[q]]
    for quant in wanted:
        f = figures[quant]
        if "error" in f:
            rows.append([quant, f"failed: {f['error']}", "", "", ""])
            continue
        f["change_vs_first"] = f["perplexity"] / figures[scored[0]]["perplexity"] - 1
        q = f["quantization"]
        groups = "per channel" if q is not None and q["group_size"] == -1 else f"group {q and q['group_size']}"
        what = "unquantized" if q is None else f"{q['bits']}-bit, {groups}, {METHOD_NAMES[q['method']]}"
        rows.append([quant, what, f["tokens"], f["perplexity"], f"{100 * f['change_vs_first']:+.2f}%"])
    env = environment(dev)
    title = f"vibee bench perplexity: {base.model_name} on {env.get('device_name', dev)} ({dtype_name})"
    notes = [f"Non-overlapping windows of {window} tokens, token-weighted; change is relative to "
             f"'{scored[0] if scored else wanted[0]}'."]
    sections = [Section("Perplexity", ["--quant", "weights", "tokens", "perplexity", "change"], rows),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "perplexity", "settings": {"model": base.model_name, "device": dev, "dtype": dtype_name,
                                                    "window": window, "max_tokens": max_tokens, "group_size": group_size},
            "results": figures, "environment": env}
    finish(out, result_dir, "perplexity", data, title, sections, notes)
    if len(scored) < len(wanted):
        sys.exit(1)


# --- kernels -------------------------------------------------------------------------------------


@click.command()
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--shapes", type=click.Choice(["h100", "small"]), default=None,
              help="h100: the issue's target shapes (default on a GPU); small: CPU-sized (default on a CPU).")
@click.option("--only", default="prefill,decode,gemv,gemm,kv_write,token_mask", show_default=True,
              help="Comma-separated kernels to time.")
@click.option("--spec-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def kernels(device, dtype, shapes, only, spec_dir, result_dir):
    """Each generated kernel against its torch counterpart, against ceilings measured in the same run."""
    from rich.console import Console

    from vibee.bench import kernels as kb
    from vibee.bench import mask_kernels as mk
    from vibee.bench.ceilings import measure_ceilings
    from vibee.runtime.engine import TORCH_DTYPES
    from vibee.runtime.generated import load_generated

    out, err = Console(), Console(stderr=True)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = ("prefill", "decode", "gemv", "gemm", "kv_write", "token_mask")
    if not wanted or any(w not in known for w in wanted):
        fail(f"--only takes {', '.join(known)} separated by commas, got {only!r}")
    config = engine_config(device=device, dtype=dtype, spec_dir=spec_dir, quant="int4")
    dev = config.resolve_device()
    dtype_name = config.resolve_dtype(dev)
    torch_dtype = TORCH_DTYPES[dtype_name]
    shape_set = kb.SHAPES[shapes or ("h100" if dev.startswith("cuda") else "small")]
    with user_errors():
        gen = load_generated(config.spec_dir, config.knob_settings(dtype_name))
    runs = {
        "prefill": lambda: kb.bench_prefill(gen.flash_attention, shape_set["prefill"], torch_dtype, dev),
        "decode": lambda: [kb.bench_decode(gen.flash_attention, shape_set["decode"], torch_dtype, dev)],
        "gemv": lambda: kb.bench_quant_linear(gen.quantization, shape_set["gemv"], torch_dtype, dev, "quantized GEMV"),
        "gemm": lambda: kb.bench_quant_linear(gen.quantization, shape_set["gemm"], torch_dtype, dev, "quantized GEMM"),
        "kv_write": lambda: [kb.bench_kv_write(gen.kv_cache, gen.config("kv_cache").block_size, shape_set["kv_write"], torch_dtype, dev)],
        "token_mask": lambda: [mk.bench_token_mask(shape_set["token_mask"], torch_dtype, dev),
                               mk.bench_json_mask(shape_set["token_mask"], torch_dtype, dev),
                               mk.bench_lark_mask(shape_set["token_mask"], torch_dtype, dev)],
    }
    err.print("measuring the device's copy bandwidth and matmul throughput ...", highlight=False)
    ceilings = measure_ceilings(dev, torch_dtype)
    rows = []
    for name in wanted:
        err.print(f"timing {name} ...", highlight=False)
        rows.extend(timing.row() for timing in runs[name]())

    def fmt(x, digits=1):
        return "-" if x is None else f"{x:.{digits}f}"

    table = [[r["kernel"], r["shape"], fmt(r["vibee_us"]), f"{fmt(r['vibee_rate'], 3)} {r['unit']}", r["baseline"],
              fmt(r["baseline_us"]), f"{fmt(r['baseline_rate'], 3)} {r['unit']}",
              "-" if r["fraction_of_ceiling"] is None else
              f"{100 * r['fraction_of_ceiling']:.0f}% of {r['ceiling']:.3g} {r['unit']} ({r['ceiling_source']})"]
             for r in rows]
    env = environment(dev)
    title = f"vibee bench kernels on {env.get('device_name', dev)} ({dtype_name})"
    notes = ["Times are medians per call. CUDA: calls over distinct copies of their operands (together twice "
             "the L2, four at least, as a model's layers) captured back to back in a CUDA graph and replayed "
             "after an L2 flush by a read, so they are GPU time (what a graph-replayed decode step sees), not "
             "Python launch time.",
             f"Ceilings were measured in this run on this device: {ceilings.how}. Memory-bound kernels are held "
             "to the copy bandwidth, GEMMs to the matmul, attention prefill to torch SDPA's rate in this run."]
    sections = [Section("Kernels", ["kernel", "shape", "vibee µs", "vibee rate", "torch counterpart", "torch µs",
                                    "torch rate", "vs ceiling"], table),
                Section("Ceilings (measured in this run)", ["Ceiling", "Value"],
                        [["device-to-device copy", f"{ceilings.copy_tb_s:.3f} TB/s"],
                         [f"{ceilings.dtype} matmul", f"{ceilings.matmul_tflop_s:.3f} TFLOP/s"]]),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "kernels", "settings": {"device": dev, "dtype": dtype_name, "shapes": shape_set,
                                                 "modules": str(gen.source)},
            "ceilings": ceilings.as_dict(), "results": rows, "environment": env}
    json_path = finish(out, result_dir, "kernels", data, title, sections, notes)
    png = kb.plot_kernels(rows, json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)
