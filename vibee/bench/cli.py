"""The `vibee bench` group (registered in vibee/cli.py) and its `throughput`, `serve` and `parse`
commands; `latency`, `perplexity` and `kernels` come from vibee/bench/commands_gpu.py."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vibee.engine_flags import engine_config, engine_options, user_errors
from vibee.bench.adversary import adversary
from vibee.bench.commands_gpu import kernels, latency, perplexity
from vibee.bench.commands_tiles import tiles
from vibee.bench.report import (Section, environment, fail, finish, first_tokens_varied, parse_range,
                                random_workload, stdlib_workload)


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


for _command in (latency, perplexity, kernels, adversary, tiles):  # commands_gpu.py, adversary.py, commands_tiles.py
    bench.add_command(_command)


# --- throughput ----------------------------------------------------------------------------------


@bench.command()
@_workload_options
@click.option("--dataset", type=click.Choice(["random", "stdlib"]), default="random", show_default=True,
              help="Prompts of random tokens, or windows of Python standard-library source (real text).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--structured-output",
              type=click.Choice(["none", "json_object", "json_schema", "text_regex", "tool_call", "lark_expr", "lark_json"]),
              default="none", show_default=True,
              help="Constrain every request: any JSON object (a token automaton with a stack), a JSON schema of a record, "
              "the regex [^<>]* (open to the end, a mask over most of the vocabulary every step), a required call "
              "of one of two tools, arithmetic in a Lark grammar with brackets nested up to 16 deep (those four "
              "token DFAs), or JSON-like lists and objects in a Lark grammar (a token automaton with a stack of "
              "return points); all on the device; reports where the masks ran and their host time.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Time the requests this many times in one engine (pass i moves each prompt's first token i ids along, "
              "so the prefix cache holds nothing of an earlier pass); the report takes the median pass and lists them all.")
@engine_options
def throughput(num_prompts, input_len, output_len, seed, result_dir, dataset, temperature, structured_output, repeat,
               **flags):
    """Offline engine throughput on random-token prompts (like vLLM's benchmark_throughput)."""
    import time

    from rich.console import Console

    from vibee.bench.throughput import (bench_grammar, check_workload, engine_settings, report_sections, run_throughput,
                                        warm_up, workload_vocab)
    from vibee.runtime.engine import LLMEngine
    from vibee.runtime.offline import freeze_heap

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
        fail(str(exc))
    grammar = bench_grammar(structured_output)
    warmup = warm_up(engine, workload, grammar)
    freeze_heap()
    err.print(f"warm-up done ({warmup['requests']} request, {warmup['prompt_tokens']} prompt + "
              f"{warmup['output_tokens']} output tokens, not timed); timing {num_prompts} requests", highlight=False)
    if engine.speculative:
        engine.acceptance.reset()  # count the timed requests only
    passes = []
    for i in range(repeat):
        passes.append(run_throughput(engine, first_tokens_varied(workload, i, vocab, special), console=err,
                                     temperature=temperature, structured_output=grammar))
    # The median pass (the lower one of an even count) is the run reported; every pass's figures beside it.
    results = sorted(passes, key=lambda r: r["output_tokens_per_s"])[(repeat - 1) // 2]
    results["passes"] = [{key: r[key] for key in ("elapsed_s", "output_tokens_per_s", "total_tokens_per_s", "steps",
                                                      "prefix_cache_hit_tokens")}
                         for r in passes]
    spec_rows = []
    if engine.speculative:
        results["speculative"] = spec = engine.stats()["speculative_decoding"]
        spec_rows = [["Draft acceptance rate", f"{100 * spec['acceptance_rate']:.1f}%"],
                     ["Tokens per verification step", spec["mean_emitted_tokens"]]]
    engine.close()  # tensor-parallel workers stop with it

    settings = {"num_prompts": num_prompts, "input_len": f"{input_len[0]}:{input_len[1]}",
                "output_len": f"{output_len[0]}:{output_len[1]}", "seed": seed, "temperature": temperature, "dataset": dataset,
                "structured_output": structured_output, "repeat": repeat,
                "ignore_eos": True, "prompt_vocab": vocab, "excluded_special_ids": len(special),
                **engine_settings(engine)}
    env = environment(engine.device)
    data = {"benchmark": "throughput", "settings": settings, "results": results,
            "warmup": warmup, "load_s": load_s, "environment": env}
    title = f"vibee bench throughput: {settings['model_name']} on {env.get('device_name', engine.device)}"
    sections, notes = report_sections(results, settings, env, warmup, spec_rows)
    finish(out, result_dir, "throughput", data, title, sections, notes)


# --- ablation ------------------------------------------------------------------------------------


@bench.command()
@click.option("--num-prompts", type=click.IntRange(min=1), default=64, show_default=True, help="Requests in the load.")
@click.option("--input-len", default="32:256", show_default=True, callback=_range,
              help="Prompt length in tokens: N or LOW:HIGH (uniform, inclusive).")
@click.option("--output-len", default="16:128", show_default=True, callback=_range,
              help="Output length in tokens (max_tokens, EOS ignored): N or LOW:HIGH.")
@click.option("--dataset", type=click.Choice(["random", "stdlib"]), default="stdlib", show_default=True,
              help="Random tokens, or windows of Python standard-library source (real text: drafts can hold).")
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--recompute-output-len", type=click.IntRange(min=1), default=32, show_default=True,
              help="The KV-cache row caps outputs at this on both sides, so recomputation finishes.")
@click.option("--batch1-prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="The speculative rows run the load's first N requests at batch 1.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds prompts and lengths.")
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True, help="Where ablation-<timestamp>.json, .md and .png go.")
@engine_options
def ablation(num_prompts, input_len, output_len, dataset, temperature, recompute_output_len, batch1_prompts, seed,
             result_dir, **flags):
    """The original design's speed-up table measured: each optimization on and off, one engine at a time.
    --max-num-seqs defaults to a quarter of --num-prompts here, so static batching runs several groups."""
    from rich.console import Console

    from vibee.bench.ablation import measure
    from vibee.bench.ablation_report import plot_ablation, report_sections, table_rows
    from vibee.bench.throughput import workload_vocab
    from vibee.runtime.config import DEFAULT_DRAFT_MODEL_DIR, DEFAULT_MODEL_DIR

    toggled = {"kv_cache": (False, "--no-kv-cache"), "flash_attn": (False, "--no-flash-attn"),
               "speculative": (True, "--speculative"), "enable_prefix_caching": (True, "--enable-prefix-caching")}
    for param, (value, flag) in toggled.items():
        if flags.get(param) == value:
            fail(f"{flag}: the ablation turns this on and off itself (prefix caching stays off: requests repeat)")
    if flags["quant"] != "none":
        fail("--quant: the ablation measures int8 and int4 against unquantized weights itself")
    if flags.get("max_num_seqs") is None:
        flags["max_num_seqs"] = max(1, num_prompts // 4)
    flags["enable_prefix_caching"] = False
    # Validated with speculation on, so the speculative knobs pass; the base engine drops them.
    checked = engine_config(seed=seed, **{**flags, "speculative": True})
    base = checked.model_copy(update={"speculative": False, "draft_model": None, "knobs": {
        kind: values for kind, values in checked.knobs.items() if kind != "speculative_decode"}})
    builtin = base.shape is None and base.model_dir.resolve() == DEFAULT_MODEL_DIR.resolve()
    draft_dir = flags["draft_model"] or (DEFAULT_DRAFT_MODEL_DIR if builtin else None)
    draft_missing = None if draft_dir else "not measured: no draft model for this model (pass --draft-model)"

    def make_workload(engine):
        vocab, special = workload_vocab(engine)
        if dataset == "stdlib":
            return stdlib_workload(lambda text: engine.tokenizer.encode(text, add_special_tokens=False),
                                   num_prompts, input_len, output_len, seed)
        return random_workload(num_prompts, input_len, output_len, vocab, special, seed)

    out, err = Console(), Console(stderr=True)
    with user_errors():
        measured = measure(base, make_workload, temperature=temperature, recompute_output_len=recompute_output_len,
                           batch1_prompts=batch1_prompts, draft_dir=draft_dir, console=err)
    device = base.resolve_device()
    num_devices = _cuda_devices()
    rows = table_rows(measured["runs"], measured["speculative"], num_devices, draft_missing)
    sections, notes = report_sections(rows, measured)
    settings = {"model": base.model_source, "device": device, "dtype": base.resolve_dtype(device),
                "num_prompts": num_prompts, "input_len": f"{input_len[0]}:{input_len[1]}",
                "output_len": f"{output_len[0]}:{output_len[1]}", "dataset": dataset, "temperature": temperature,
                "seed": seed, "max_num_seqs": flags["max_num_seqs"], "recompute_output_len": recompute_output_len,
                "batch1_prompts": batch1_prompts, "draft_model": str(draft_dir) if draft_dir else None,
                "cuda_devices": num_devices}
    env = environment(device)
    sections.append(Section("Settings", ["Setting", "Value"], [[k, v] for k, v in settings.items()]))
    sections.append(Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()]))
    data = {"benchmark": "ablation", "settings": settings, "rows": [r.as_dict() for r in rows],
            "speculative": measured["speculative"], "runs": measured["runs"], "environment": env}
    title = f"vibee bench ablation: {base.model_name} on {env.get('device_name', device)}"
    json_path = finish(out, result_dir, "ablation", data, title, sections, notes)
    png = plot_ablation(rows, json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


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
@click.option("--client-processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Send the load from this many processes (request i from process i mod N), for servers "
                   "faster than one Python client can read.")
def serve(base_url, model, num_prompts, input_len, output_len, seed, result_dir, request_rate, max_concurrency,
          api_key, vocab_size, timeout, client_processes):
    """Load a running server over HTTP: TTFT, TPOT, ITL, latency, throughput (like vLLM's benchmark_serving)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vibee.bench.serve_clients import busy_client_note, rate_label, send_load
    from vibee.bench.serve_load import FALLBACK_MIN_ID, ServeBenchError, probe_server, summarize_load

    out, err = Console(), Console(stderr=True)
    base_url = base_url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]  # both spellings are common; the paths below add /v1
    try:
        server = probe_server(base_url, api_key, model)
    except ServeBenchError as exc:
        fail(str(exc))
    vocab = vocab_size or server.vocab_size
    if vocab is None:
        fail(f"{base_url}/v1/inference/info gave no vocabulary size; pass --vocab-size")
    if server.special_ids is not None:
        excluded, exclusion = set(server.special_ids), f"{len(server.special_ids)} special ids from the server"
    else:
        excluded, exclusion = set(range(FALLBACK_MIN_ID)), f"ids below {FALLBACK_MIN_ID} (server gave no special ids)"
    longest = input_len[1] + output_len[1]
    if server.max_model_len is not None and longest > server.max_model_len:
        fail(f"--input-len up to {input_len[1]} plus --output-len up to {output_len[1]} is {longest} tokens, "
              f"more than the server's max_model_len {server.max_model_len}")
    try:
        workload = random_workload(num_prompts, input_len, output_len, vocab, excluded, seed)
    except ValueError as exc:
        fail(str(exc))

    progress = Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), console=err)
    failed = 0

    def on_done(ok: bool) -> None:
        nonlocal failed
        failed += not ok
        progress.update(task, advance=1, failed=failed)

    with progress:
        task = progress.add_task("requests", total=num_prompts, failed=0)
        try:
            results, duration, busy = send_load(base_url, server.model, workload, processes=client_processes,
                                                request_rate=request_rate, max_concurrency=max_concurrency,
                                                api_key=api_key, seed=seed, timeout=timeout, on_done=on_done)
        except ServeBenchError as exc:
            fail(str(exc))
    figures = summarize_load(results, duration)
    figures["client_cpu_share"] = busy

    info_model = (server.info or {}).get("model") or {}
    settings = {"base_url": base_url, "model": server.model, "num_prompts": num_prompts,
                "input_len": f"{input_len[0]}:{input_len[1]}", "output_len": f"{output_len[0]}:{output_len[1]}",
                "request_rate": request_rate, "max_concurrency": max_concurrency, "client_processes": client_processes,
                "seed": seed,
                "temperature": 1.0, "ignore_eos": True, "prompt_vocab": vocab, "excluded_ids": exclusion,
                "server_device": info_model.get("device"), "server_dtype": info_model.get("dtype")}
    env = environment()
    data = {"benchmark": "serve", "settings": settings, "results": figures, "server_info": server.info,
            "environment": env}
    title = f"vibee bench serve: {server.model} at {base_url}"
    notes = [f"{num_prompts} requests, request rate {rate_label(request_rate)}, max concurrency "
             f"{max_concurrency or 'unlimited'}, from {client_processes} client process(es) using "
             f"{', '.join(f'{100 * b:.0f}%' for b in busy)} of a core. Latencies over successful requests; the "
             "environment below is the client's."]
    busy_note = busy_client_note(busy)
    if busy_note:
        notes.append(busy_note)
        err.print(f"[yellow]note[/yellow]: {busy_note}", highlight=False)
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
    json_path = finish(out, result_dir, "serve", data, title, sections, notes)
    from vibee.bench.plot import plot_serve_latencies

    png = plot_serve_latencies(results, json_path.with_suffix(".png"), title)
    out.print(f"wrote {png}", highlight=False)
    if f["completed"] == 0:
        sys.exit(1)


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
        fail(str(exc))
    finish(Console(), result_dir, "parse", data, title, sections, notes)
