"""`vibee bench throughput` and `vibee bench serve` (registered in vibee/cli.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from vibee.engine_flags import engine_config, engine_options, user_errors
from vibee.bench.report import (Section, environment, parse_range, print_report, random_workload,
                                stdlib_workload, write_result)


def _range(ctx, param, value):
    try:
        return parse_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _rate(ctx, param, value):
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'inf'") from None
    if not rate > 0:
        raise click.BadParameter("must be > 0 (or inf: all requests at once)")
    return rate


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _workload_options(f):
    options = [
        click.option("--num-prompts", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Requests to send."),
        click.option("--input-len", default="128:512", show_default=True, callback=_range,
                     help="Prompt length in tokens: N or LOW:HIGH (uniform, inclusive)."),
        click.option("--output-len", default="64:256", show_default=True, callback=_range,
                     help="Output length in tokens (max_tokens, EOS ignored): N or LOW:HIGH."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds prompts, lengths and arrivals."),
        click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
                     show_default=True, help="Where <name>-<timestamp>.json and .md go."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group()
def bench() -> None:
    """Benchmarks: the offline engine (throughput) and a running server (serve)."""


# --- throughput ----------------------------------------------------------------------------------


@bench.command()
@_workload_options
@click.option("--dataset", type=click.Choice(["random", "stdlib"]), default="random", show_default=True,
              help="Prompts of random tokens, or windows of Python standard-library source (real text).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@engine_options
def throughput(num_prompts, input_len, output_len, seed, result_dir, dataset, temperature, **flags):
    """Offline engine throughput on random-token prompts (like vLLM's benchmark_throughput)."""
    import time

    from rich.console import Console

    from vibee.bench.throughput import check_workload, engine_settings, run_throughput, warm_up, workload_vocab
    from vibee.runtime.engine import LLMEngine, freeze_heap

    out, err = Console(), Console(stderr=True)
    config = engine_config(seed=seed, **flags)
    t0 = time.perf_counter()
    with user_errors():
        engine = LLMEngine(config, progress=True)
    load_s = time.perf_counter() - t0

    vocab, special = workload_vocab(engine)
    try:
        if dataset == "stdlib":
            def tokenize(text):
                return engine.tokenizer.encode(text, add_special_tokens=False)

            workload = stdlib_workload(tokenize, num_prompts, input_len, output_len, seed)
        else:
            workload = random_workload(num_prompts, input_len, output_len, vocab, special, seed)
        check_workload(engine, workload)
    except ValueError as exc:
        _fail(str(exc))
    warmup = warm_up(engine, workload)
    freeze_heap()
    err.print(f"warm-up done ({warmup['requests']} request, {warmup['prompt_tokens']} prompt + "
              f"{warmup['output_tokens']} output tokens, not timed); timing {num_prompts} requests", highlight=False)
    if engine.speculative:
        engine.acceptance.reset()  # count the timed requests only
    results = run_throughput(engine, workload, console=err, temperature=temperature)
    spec_rows = []
    if engine.speculative:
        results["speculative"] = spec = engine.stats()["speculative_decoding"]
        spec_rows = [["Draft acceptance rate", f"{100 * spec['acceptance_rate']:.1f}%"],
                     ["Tokens per verification step", spec["mean_emitted_tokens"]]]

    settings = {"num_prompts": num_prompts, "input_len": f"{input_len[0]}:{input_len[1]}",
                "output_len": f"{output_len[0]}:{output_len[1]}", "seed": seed, "temperature": temperature, "dataset": dataset,
                "ignore_eos": True, "prompt_vocab": vocab, "excluded_special_ids": len(special),
                **engine_settings(engine)}
    env = environment(engine.device)
    data = {"benchmark": "throughput", "settings": settings, "results": results,
            "warmup": warmup, "load_s": load_s, "environment": env}
    title = f"vibee bench throughput: {settings['model_name']} on {env.get('device_name', engine.device)}"
    notes = [f"Warm-up: {warmup['requests']} request ({warmup['prompt_tokens']} prompt + {warmup['output_tokens']} "
             "output tokens) ran before timing and is not counted. Times cover adding all requests and stepping "
             "until the last one finished."]
    r = results
    sections = [
        Section("Results", ["Metric", "Value"], [
            ["Elapsed (s)", r["elapsed_s"]], ["Requests", r["num_requests"]],
            ["Requests/s", r["requests_per_s"]], ["Output tokens/s", r["output_tokens_per_s"]],
            ["Total tokens/s (prompt + output)", r["total_tokens_per_s"]],
            ["Prompt tokens", r["prompt_tokens"]], ["Output tokens", r["output_tokens"]],
            ["Engine steps", r["steps"]], ["Mean batch size", r["mean_batch_size"]],
            ["Max running sequences", r["max_running"]], ["Peak KV cache usage", f"{100 * r['peak_kv_cache_usage']:.1f}%"],
            ["Preemptions", r["preemptions"]], *spec_rows,
        ]),
        Section("Settings", ["Setting", "Value"], [[k, v] for k, v in settings.items()]),
        Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()]),
    ]
    _finish(out, result_dir, "throughput", data, title, sections, notes)


def _finish(console, result_dir, name, data, title, sections, notes) -> Path:
    try:
        json_path, md_path = write_result(result_dir, name, data, title, sections, notes)
    except OSError as exc:
        print_report(console, title, sections, notes)
        _fail(f"could not write results to {result_dir}: {exc}")
    print_report(console, title, sections, notes)
    console.print(f"wrote {json_path} and {md_path}", highlight=False)
    return json_path


# --- serve ---------------------------------------------------------------------------------------


@bench.command()
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True, help="The server (without /v1).")
@click.option("--model", default=None, help="Model name to request (default: the first of GET /v1/models).")
@_workload_options
@click.option("--request-rate", default="inf", show_default=True, callback=_rate,
              help="Requests per second, Poisson arrivals (seeded); inf sends all at once.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help="Most requests in flight at once (default: no limit).")
@click.option("--api-key", envvar="VIBEE_API_KEY", default=None, help="Bearer token (also from VIBEE_API_KEY).")
@click.option("--vocab-size", type=click.IntRange(min=2), default=None,
              help="Draw prompt ids below this (default: the server's /v1/inference/info).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds one request may stall.")
def serve(base_url, model, num_prompts, input_len, output_len, seed, result_dir, request_rate, max_concurrency,
          api_key, vocab_size, timeout):
    """Load a running server over HTTP: TTFT, TPOT, ITL, latency, throughput (like vLLM's benchmark_serving)."""
    import asyncio

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vibee.bench.serve_load import FALLBACK_MIN_ID, ServeBenchError, probe_server, run_load, summarize_load

    out, err = Console(), Console(stderr=True)
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]  # both spellings are common; the paths below add /v1
    try:
        server = probe_server(base_url, api_key, model)
    except ServeBenchError as exc:
        _fail(str(exc))
    vocab = vocab_size or server.vocab_size
    if vocab is None:
        _fail(f"{base_url}/v1/inference/info gave no vocabulary size; pass --vocab-size")
    if server.special_ids is not None:
        excluded, exclusion = set(server.special_ids), f"{len(server.special_ids)} special ids from the server"
    else:
        excluded, exclusion = set(range(FALLBACK_MIN_ID)), f"ids below {FALLBACK_MIN_ID} (server gave no special ids)"
    longest = input_len[1] + output_len[1]
    if server.max_model_len is not None and longest > server.max_model_len:
        _fail(f"--input-len up to {input_len[1]} plus --output-len up to {output_len[1]} is {longest} tokens, "
              f"more than the server's max_model_len {server.max_model_len}")
    try:
        workload = random_workload(num_prompts, input_len, output_len, vocab, excluded, seed)
    except ValueError as exc:
        _fail(str(exc))

    progress = Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), console=err)
    failed = 0

    def on_done(result) -> None:
        nonlocal failed
        failed += not result.ok
        progress.update(task, advance=1, failed=failed)

    with progress:
        task = progress.add_task("requests", total=num_prompts, failed=0)
        results, duration = asyncio.run(run_load(base_url, server.model, workload, request_rate=request_rate,
                                                 max_concurrency=max_concurrency, api_key=api_key, seed=seed,
                                                 timeout=timeout, on_done=on_done))
    figures = summarize_load(results, duration)

    info_model = (server.info or {}).get("model") or {}
    settings = {"base_url": base_url, "model": server.model, "num_prompts": num_prompts,
                "input_len": f"{input_len[0]}:{input_len[1]}", "output_len": f"{output_len[0]}:{output_len[1]}",
                "request_rate": request_rate, "max_concurrency": max_concurrency, "seed": seed,
                "temperature": 1.0, "ignore_eos": True, "prompt_vocab": vocab, "excluded_ids": exclusion,
                "server_device": info_model.get("device"), "server_dtype": info_model.get("dtype")}
    env = environment()
    data = {"benchmark": "serve", "settings": settings, "results": figures, "server_info": server.info,
            "environment": env}
    title = f"vibee bench serve: {server.model} at {base_url}"
    rate = "inf (all at once)" if math.isinf(request_rate) else f"{request_rate:g} req/s (Poisson)"
    notes = [f"{num_prompts} requests, request rate {rate}, max concurrency {max_concurrency or 'unlimited'}. "
             "Latencies over successful requests; the environment below is the client's."]
    f = figures
    latency_rows = [[label] + [f[key][s] for s in ("mean", "median", "p90", "p99")] + [f[key]["count"]]
                    for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E latency", "e2e_ms"))]
    sections = [
        Section("Results", ["Metric", "Value"], [
            ["Successful requests", f["completed"]], ["Failed requests", f["failed"]],
            ["First error", f["first_error"]], ["Duration (s)", f["duration_s"]],
            ["Total input tokens", f["total_input_tokens"]], ["Total output tokens", f["total_output_tokens"]],
            ["Request throughput (req/s)", f["request_throughput"]],
            ["Output token throughput (tok/s)", f["output_throughput"]],
            ["Total token throughput (tok/s)", f["total_token_throughput"]],
        ]),
        Section("Latency (ms)", ["Metric", "Mean", "Median", "P90", "P99", "Samples"], latency_rows),
        Section("Settings", ["Setting", "Value"], [[k, v] for k, v in settings.items()]),
        Section("Environment (client)", ["Item", "Value"], [[k, v] for k, v in env.items()]),
    ]
    if f["requests_without_usage"]:
        notes.append(f"{f['requests_without_usage']} responses had no usage chunk: their output tokens were "
                     "counted as text chunks.")
    json_path = _finish(out, result_dir, "serve", data, title, sections, notes)
    from vibee.bench.plot import plot_serve_latencies

    png = plot_serve_latencies(results, json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)
    if f["completed"] == 0:
        sys.exit(1)


# --- latency -------------------------------------------------------------------------------------


@bench.command()
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
@click.option("--quant", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True)
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True)
@click.option("--bandwidth-gbs", type=float, default=None,
              help="Memory bandwidth ceiling for the limit (default: GPU.md's measured copy bandwidth, where known).")
@click.option("--enforce-eager", is_flag=True, default=False, help="No CUDA graphs (on a GPU, steps replay graphs).")
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def latency(shape, model, device, dtype, batch_size, prompt_len, decode_steps, warmup_steps, quant, flash_attn,
            bandwidth_gbs, enforce_eager, result_dir):
    """Decode tokens/s of the model runner and the fraction of the memory-bandwidth limit."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from vibee.bench.latency import BANDWIDTH_GBS, measure_decode, plot_decode, summarize_decode, weight_bytes
    from vibee.runtime.shapes import random_model, shape_config
    from vibee.runtime.engine import TORCH_DTYPES
    from vibee.runtime.generated import load_generated
    from vibee.runtime.loader import load_model_dir
    from vibee.runtime.model import build_model

    out, err = Console(), Console(stderr=True)
    config = engine_config(model=model, device=device, dtype=dtype, quant=quant, flash_attn=flash_attn)
    dev = config.resolve_device()
    dtype_name = config.resolve_dtype(dev)
    with user_errors():
        gen = load_generated(config.spec_dir, config.knob_settings(dtype_name))
        fa = gen.flash_attention if flash_attn else gen.flash_attention_reference
        if shape is not None:
            model_config = shape_config(shape)
            runner = random_model(model_config, fa, dtype=TORCH_DTYPES[dtype_name], device=dev)
            name = f"{shape} (random weights)"
        else:
            loaded = load_model_dir(config.model_dir, dtype=TORCH_DTYPES[dtype_name], device=dev, progress=True)
            runner, model_config, name = build_model(loaded, gen, flash_attn=flash_attn).eval(), loaded.config, config.model_name
        loaded_bytes = weight_bytes(runner)
        if quant != "none":
            gen.quantization.quantize_model(runner, gen.configs.quantization.skip_modules)
    block_size = gen.configs.kv_cache.block_size
    kv_bytes_per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * \
        TORCH_DTYPES[dtype_name].itemsize
    device_name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else None
    bandwidth = bandwidth_gbs or BANDWIDTH_GBS.get(device_name or "")

    progress = Progress(TextColumn("[bold]decode steps"), BarColumn(), MofNCompleteColumn(), console=err)
    with progress:
        task = progress.add_task("steps", total=warmup_steps + decode_steps)
        use_graphs = dev.startswith("cuda") and flash_attn and not enforce_eager
        splits = gen.flash_attention.num_splits_for(prompt_len + warmup_steps + decode_steps + 1) if use_graphs else None
        measured = measure_decode(runner, gen.kv_cache, batch_size=batch_size, prompt_len=prompt_len,
                                  decode_steps=decode_steps, warmup_steps=warmup_steps, device=dev,
                                  block_size=block_size, on_step=lambda: progress.advance(task), num_splits=splits)
    summary = summarize_decode(measured, batch_size=batch_size, weight_bytes_=weight_bytes(runner),
                               kv_bytes_per_token=kv_bytes_per_token, bandwidth_gbs=bandwidth)
    settings = {"model": name, "device": dev, "dtype": dtype_name, "quant": quant, "flash_attn": flash_attn,
                "batch_size": batch_size, "prompt_len": prompt_len, "decode_steps": decode_steps,
                "warmup_steps": warmup_steps, "block_size": block_size, "weight_bytes_loaded": loaded_bytes,
                "cuda_graphs": splits is not None,
                "modules": str(gen.source)}
    env = environment(dev)
    s = summary
    rows = [["Tokens/s", s["tokens_per_s"]], ["Mean step (ms)", s["mean_step_ms"]],
            ["Median step (ms)", s["median_step_ms"]], ["Weight bytes read per step", s["weight_bytes"]],
            ["Bytes read per step (weights + KV)", s["bytes_per_step"]], ["Achieved GB/s", s["achieved_gbs"]]]
    if "fraction_of_limit" in s:
        rows += [["Bandwidth ceiling (GB/s)", s["bandwidth_gbs"]], ["Bandwidth-limit tokens/s", s["limit_tokens_per_s"]],
                 ["Fraction of the limit", f"{100 * s['fraction_of_limit']:.1f}%"]]
    title = f"vibee bench latency: {name} on {env.get('device_name', dev)}"
    notes = [f"Greedy decode after a {prompt_len}-token prompt; {warmup_steps} warm-up steps are not timed. The "
             "limit is the bytes a step must read (weights once, plus the batch's KV) over the bandwidth ceiling."]
    sections = [Section("Results", ["Metric", "Value"], rows),
                Section("Settings", ["Setting", "Value"], [[k, v] for k, v in settings.items()]),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "latency", "settings": settings, "results": summary, "measured": measured, "environment": env}
    json_path = _finish(out, result_dir, "latency", data, title, sections, notes)
    png = plot_decode(measured, summary, json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)


# --- perplexity ----------------------------------------------------------------------------------


@bench.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A local Hugging Face model directory (default: the built-in models/vibee-tiny).")
@click.option("--text-file", "text_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Score these files (default: the model's held-out files from its training_stats.json).")
@click.option("--quant", "quants", default="none,int8,int4", show_default=True,
              help="Comma-separated weight precisions to compare: none, int8, int4.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per scored window.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Score only the first N tokens.")
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def perplexity(model, text_files, quants, device, dtype, window, max_tokens, result_dir):
    """Held-out perplexity with unquantized, int8 and int4 weights (what --quant costs)."""
    from rich.console import Console

    from vibee.bench.perplexity import held_out_texts, perplexity as score, token_stream
    from vibee.runtime.engine import TORCH_DTYPES
    from vibee.runtime.generated import load_generated
    from vibee.runtime.loader import load_model_dir
    from vibee.runtime.model import build_model

    out = Console()
    wanted = [q.strip() for q in quants.split(",") if q.strip()]
    bad = [q for q in wanted if q not in ("none", "int8", "int4")]
    if bad or not wanted:
        _fail(f"--quant takes none, int8 and int4 separated by commas, got {quants!r}")
    rows, figures = [], {}
    base = engine_config(model=model, device=device, dtype=dtype)
    dev = base.resolve_device()
    dtype_name = base.resolve_dtype(dev)
    with user_errors():
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in text_files] or held_out_texts(base.model_dir)
        for quant in wanted:
            config = engine_config(model=model, device=device, dtype=dtype, quant=quant)
            gen = load_generated(config.spec_dir, config.knob_settings(dtype_name))
            loaded = load_model_dir(config.model_dir, dtype=TORCH_DTYPES[dtype_name], device=dev, progress=False)
            runner = build_model(loaded, gen).eval()
            if quant != "none":
                gen.quantization.quantize_model(runner, gen.configs.quantization.skip_modules)
            eos = sorted(loaded.config.eos_token_ids)
            ids = token_stream(loaded.tokenizer, texts, eos[0] if eos else None)
            figures[quant] = score(runner, ids, window, max_tokens, dev)
            # What the generated module was compiled with, not a second copy of the spec's values.
            figures[quant]["quantization"] = ({"bits": gen.quantization.BITS, "group_size": gen.quantization.GROUP_SIZE}
                                              if quant != "none" else None)
    reference = figures[wanted[0]]["perplexity"]
    for quant in wanted:
        f = figures[quant]
        f["change_vs_first"] = f["perplexity"] / reference - 1
        q = f["quantization"]
        groups = "per channel" if q is not None and q["group_size"] == -1 else f"group {q and q['group_size']}"
        what = "unquantized" if q is None else f"{q['bits']}-bit, {groups}, round to nearest"
        rows.append([quant, what, f["tokens"], f["perplexity"], f"{100 * f['change_vs_first']:+.2f}%"])
    env = environment(dev)
    title = f"vibee bench perplexity: {base.model_name} on {env.get('device_name', dev)} ({dtype_name})"
    notes = [f"Non-overlapping windows of {window} tokens, token-weighted; change is relative to '{wanted[0]}'."]
    sections = [Section("Perplexity", ["--quant", "weights", "tokens", "perplexity", "change"], rows),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "perplexity", "settings": {"model": base.model_name, "device": dev, "dtype": dtype_name,
                                                    "window": window, "max_tokens": max_tokens},
            "results": figures, "environment": env}
    _finish(out, result_dir, "perplexity", data, title, sections, notes)


# --- kernels -------------------------------------------------------------------------------------


@bench.command()
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--shapes", type=click.Choice(["h100", "small"]), default=None,
              help="h100: the issue's target shapes (default on a GPU); small: CPU-sized (default on a CPU).")
@click.option("--only", default="prefill,decode,gemv,gemm,kv_write", show_default=True,
              help="Comma-separated kernels to time.")
@click.option("--spec-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def kernels(device, dtype, shapes, only, spec_dir, result_dir):
    """Each generated kernel against its torch counterpart, against the GPU.md ceilings."""
    from rich.console import Console

    from vibee.bench import kernels as kb
    from vibee.runtime.engine import TORCH_DTYPES
    from vibee.runtime.generated import load_generated

    out, err = Console(), Console(stderr=True)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = ("prefill", "decode", "gemv", "gemm", "kv_write")
    if not wanted or any(w not in known for w in wanted):
        _fail(f"--only takes {', '.join(known)} separated by commas, got {only!r}")
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
    }
    rows = []
    for name in wanted:
        err.print(f"timing {name} ...", highlight=False)
        rows.extend(timing.row() for timing in runs[name]())

    def fmt(x, digits=1):
        return "-" if x is None else f"{x:.{digits}f}"

    table = [[r["kernel"], r["shape"], fmt(r["vibee_us"]), f"{fmt(r['vibee_rate'], 3)} {r['unit']}", r["baseline"],
              fmt(r["baseline_us"]), f"{fmt(r['baseline_rate'], 3)} {r['unit']}",
              "-" if r["fraction_of_ceiling"] is None else f"{100 * r['fraction_of_ceiling']:.0f}% of {r['ceiling']}"]
             for r in rows]
    env = environment(dev)
    title = f"vibee bench kernels on {env.get('device_name', dev)} ({dtype_name})"
    notes = ["Times are medians. CUDA: each call captured in a CUDA graph and replayed after an L2 flush, so "
             "they are GPU time (what a graph-replayed decode step sees), not Python launch time. Ceilings are the "
             "GPU machine's (shared/GPU.md); on other hardware read the rates, not the fractions."]
    sections = [Section("Kernels", ["kernel", "shape", "vibee µs", "vibee rate", "torch counterpart", "torch µs",
                                    "torch rate", "vs ceiling"], table),
                Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()])]
    data = {"benchmark": "kernels", "settings": {"device": dev, "dtype": dtype_name, "shapes": shape_set,
                                                 "modules": str(gen.source)},
            "results": rows, "environment": env}
    json_path = _finish(out, result_dir, "kernels", data, title, sections, notes)
    png = kb.plot_kernels(rows, json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)


# --- parse ---------------------------------------------------------------------------------------


@bench.command("parse")
@click.option("--spec-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The shipped specs to time (default: specs/tri).")
@click.option("--generated", type=click.IntRange(min=0), default=300, show_default=True,
              help="Older descriptive specs to generate and time (seeded).")
@click.option("--corpus", "corpora", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Also time and count the parse rate of every .vibee file under this directory (repeatable).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def parse(spec_dir, generated, corpora, repeats, seed, result_dir):
    """MB/s of the spec front end (parse_document, in process) and the share of each corpus that parses."""
    from rich.console import Console

    from vibee.bench.parse import run_parse_bench

    try:
        data, title, sections, notes = run_parse_bench(spec_dir, generated, corpora, repeats, seed, Console(stderr=True))
    except ValueError as exc:
        _fail(str(exc))
    _finish(Console(), result_dir, "parse", data, title, sections, notes)
