"""`vibee bench throughput`: the offline engine at full load, like vLLM's benchmark_throughput with
its random dataset. Every request is added at once and the engine steps until all are done; the
figures are wall-clock over that loop (adding the requests included, the warm-up excluded)."""

from __future__ import annotations

import time
from typing import Any

from vibee.bench.report import Workload

WARMUP_PROMPT_TOKENS = 16
WARMUP_OUTPUT_TOKENS = 4


class StepPeaks:
    """Engine observer: the largest running batch and KV usage seen while `active`, and the steps
    that admitted a request (its prompt's first step: not a decode-only step, so on a GPU it runs
    eagerly rather than as a CUDA graph)."""

    def __init__(self) -> None:
        self.active = False
        self.max_running = 0
        self.peak_kv_usage = 0.0
        self.admitting_steps = 0

    def on_step(self, stats) -> None:
        if self.active:
            self.max_running = max(self.max_running, stats.num_running)
            self.peak_kv_usage = max(self.peak_kv_usage, stats.kv_cache_usage)
            self.admitting_steps += stats.num_prompt_tokens > 0

    def on_request_finished(self, stats) -> None:
        pass


def workload_vocab(engine) -> tuple[int, set[int]]:
    """The ids prompts may use: below both the tokenizer's and the model's vocabulary (a model's
    embedding is often padded past the tokenizer), minus special ids (EOS would end nothing with
    ignore_eos, but it and BOS/PAD in mid-prompt are not what real prompts look like)."""
    tok = engine.tokenizer
    vocab = min(int(tok.vocab_size), int(engine.model_config.vocab_size))
    special = set(getattr(tok, "all_special_ids", ()) or ()) | set(engine.eos_token_ids)
    return vocab, special


def check_workload(engine, workload: Workload) -> None:
    """Fail before any timing if some request can't run (too long for max_model_len or the KV cache)."""
    from vibee.runtime.sampling_params import SamplingParams

    for i, (prompt, out_len) in enumerate(zip(workload.prompts, workload.output_lens)):
        try:
            engine.check_prompt(prompt, SamplingParams(max_tokens=out_len))
        except ValueError as exc:
            raise ValueError(f"request {i} ({len(prompt)} prompt + {out_len} output tokens): {exc}") from None


def _drain(engine, on_step=None) -> None:
    while engine.has_unfinished():
        outs = engine.step()
        if on_step is not None:
            on_step(outs)


def warm_up(engine, workload: Workload, structured_output: str | None = None) -> dict[str, int]:
    """One short request so one-time costs (allocator, kernel selection, lazy imports) fall outside
    the timed loop; under the timed requests' grammar, so that its DFA's compilation and the mask
    kernels' first launches fall outside it too (with them timed, a 16-request json_schema run on
    an H100 measured 5,632 output tok/s against 29,787 unconstrained)."""
    from vibee.runtime.sampling_params import SamplingParams

    # The first prompt's tokens reversed: the prefix cache then has none of a timed prompt's blocks.
    prompt = workload.prompts[0][:WARMUP_PROMPT_TOKENS][::-1]
    params = SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=WARMUP_OUTPUT_TOKENS,
                            structured_output=structured_output)
    engine.add_request("bench-warmup", prompt, params)
    _drain(engine)
    return {"requests": 1, "prompt_tokens": len(prompt), "output_tokens": WARMUP_OUTPUT_TOKENS,
            "constrained": engine.structured.requests_by_path.copy() if structured_output else {}}



# A record whose JSON is a regular language (94 DFA states): decoded from a token DFA on the
# device, loaded once for every request (a 128k vocabulary's table holds 984 states on a GPU).
BENCH_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["name", "age", "email", "tags"]}


# Two functions a client offers with tool_choice "required" (the chat server's grammar for them).
BENCH_TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}}}
    for name, properties in [("get_weather", {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}),
                             ("get_time", {"zone": {"type": "string"}})]]


# Arithmetic in a Lark grammar: a rule nested inside itself (brackets), open to the end.
BENCH_LARK = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")" | "-" factor
NUMBER: /[0-9]+/
%ignore " "
"""

# JSON-like values in a Lark grammar: two bracket types inside each other (its pushdown automaton).
BENCH_LARK_JSON = r"""start: value
value: "[" [value ("," value)*] "]" | "{" [pair ("," pair)*] "}" | NUMBER | STRING | "true" | "false" | "null"
pair: STRING ":" value
NUMBER: /-?[0-9]+(\.[0-9]+)?/
STRING: /"[^"\\\n]*"/
%ignore " "
"""


def bench_grammar(name: str) -> str | None:
    """The grammar of `--structured-output` NAME: none, json_object (JSON mode's token automaton
    with a stack), json_schema (BENCH_SCHEMA), text_regex ([^<>]*, open to the end), tool_call
    (BENCH_TOOLS, one call required), lark_expr (BENCH_LARK, nested up to 16 deep), those four token
    DFAs, or lark_json (BENCH_LARK_JSON, lark_pda.py's automaton); all on the device."""
    from vibee.runtime.structured_output import (grammar_for_json_object, grammar_for_json_schema, grammar_for_lark,
                                                 grammar_for_regex)
    from vibee.server.tool_calls import plan_tools

    makers = {"none": lambda: None, "json_object": grammar_for_json_object,
              "json_schema": lambda: grammar_for_json_schema(BENCH_SCHEMA), "text_regex": lambda: grammar_for_regex("[^<>]*"),
              "tool_call": lambda: plan_tools(BENCH_TOOLS, "required", False, "").grammar,
              "lark_expr": lambda: grammar_for_lark(BENCH_LARK), "lark_json": lambda: grammar_for_lark(BENCH_LARK_JSON)}
    return makers[name]()

def run_throughput(engine, workload: Workload, *, console=None, temperature: float = 1.0,
                   structured_output: str | None = None) -> dict[str, Any]:
    """Add every request, step until all finish, and measure. Shows a progress bar on `console`.
    structured_output: a grammar every request keeps to (its masks' host time is reported)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vibee.runtime.jit_compiles import JitCompiles
    from vibee.runtime.sampling_params import SamplingParams

    peaks = StepPeaks()
    engine.add_observer(peaks)
    masks_before = (engine.structured.mask_seconds, engine.structured.mask_steps, engine.structured.mask_rows,
                    dict(engine.structured.requests_by_path))
    before = engine.stats()["batching"]
    hits_before = engine.block_manager.prefix_cache_hits
    n = len(workload.prompts)
    generated = 0
    finished = 0

    progress = Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[tok_s]:>9.1f} output tok/s"), TimeElapsedColumn(),
                        console=console, transient=False, disable=console is None)
    with progress, JitCompiles() as jit:
        task = progress.add_task("requests", total=n, tok_s=0.0)
        peaks.active = True
        start = time.perf_counter()
        for i, (prompt, out_len) in enumerate(zip(workload.prompts, workload.output_lens)):
            engine.add_request(f"bench-{i}", prompt,
                               SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=out_len,
                                              structured_output=structured_output))

        def on_step(outs) -> None:
            nonlocal generated, finished
            for out in outs:
                generated += sum(len(c.delta_token_ids) for c in out.outputs)
                finished += out.finished
            elapsed = time.perf_counter() - start
            progress.update(task, completed=finished, tok_s=generated / elapsed if elapsed > 0 else 0.0)

        _drain(engine, on_step)
        elapsed = time.perf_counter() - start
        peaks.active = False

    structured = engine.structured
    masks = (structured.mask_seconds, structured.mask_steps, structured.mask_rows)
    after = engine.stats()["batching"]
    steps = after["steps"] - before["steps"]
    # avg_batch_size covers the engine's life; take the timed steps' share (the warm-up excluded).
    batched = after["avg_batch_size"] * after["steps"] - before["avg_batch_size"] * before["steps"]
    prompt_tokens = sum(workload.input_lens)
    return {
        "elapsed_s": elapsed,
        "num_requests": n,
        "finished_requests": finished,
        "prompt_tokens": prompt_tokens,
        "output_tokens": generated,
        "requests_per_s": n / elapsed,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (prompt_tokens + generated) / elapsed,
        "steps": steps,
        "mean_batch_size": batched / steps if steps else 0.0,
        "max_running": peaks.max_running,
        "peak_kv_cache_usage": peaks.peak_kv_usage,
        "admitting_steps": peaks.admitting_steps,
        # Prompt tokens the prefix cache handed over (0 with prefix caching off).
        "prefix_cache_hit_tokens": (engine.block_manager.prefix_cache_hits - hits_before) * engine.block_size,
        # Engine steps that ran plain decode steps as rounds on the device, and those rounds (None: off).
        "multi_step": None if after["multi_step"] is None else {
            key: after["multi_step"][key] - before["multi_step"][key] for key in ("steps", "rounds")},
        # Triton kernels compiled inside the timed loop (their time is in elapsed_s): 0 when the
        # warm-up and the engine's load compiled everything the run launches.
        "jit_compiles": jit.summary(),
        "preemptions": after["preemptions"] - before["preemptions"],
        "preemption_mode": after["preemption_mode"],
        **{key: after[key] - before[key] for key in ("swap_outs", "swap_ins", "swap_fallbacks")},
        # Host time of the grammar masks (structured_output.py), over the timed run.
        "grammar_masks": None if structured_output is None else {
            "steps": masks[1] - masks_before[1], "rows": masks[2] - masks_before[2],
            "ms_per_step": 1e3 * (masks[0] - masks_before[0]) / max(1, masks[1] - masks_before[1]),
            "us_per_row": 1e6 * (masks[0] - masks_before[0]) / max(1, masks[2] - masks_before[2]),
            **{f"{path}_requests": n - masks_before[3][path] for path, n in structured.requests_by_path.items()}},
    }


def engine_settings(engine) -> dict[str, Any]:
    """The engine as it resolved the flags and specs (what the run actually used)."""
    cfg = engine.config
    return {
        "model": str(cfg.model_dir), "model_name": cfg.model_name, "device": engine.device,
        "dtype": engine.dtype_name, "max_model_len": engine.max_model_len,
        "max_num_seqs": engine.max_num_seqs, "max_num_batched_tokens": engine.max_num_batched_tokens,
        "block_size": engine.block_size, "num_kv_blocks": engine.num_blocks,
        "kv_capacity_tokens": engine.kv_capacity_tokens, "kv_cache": engine.use_kv_cache,
        "flash_attn": cfg.flash_attn, "quant": cfg.quant, "enable_prefix_caching": engine.enable_prefix_caching,
        "num_scheduler_steps": engine.gen.configs.continuous_batch.num_scheduler_steps,
        "multi_step": engine.multi_step is not None,
        "tensor_parallel_size": engine.ranks.size if engine.ranks is not None else 1,
    }


# Under this many seconds of timed work the report says its rates are too noisy to compare: on an
# H100, 16 prompts x 64 tokens of the built-in model took 0.03 s (256 x 256 took 0.5 s), and the
# README once compared structured-output modes by such runs.
SHORT_RUN_S = 1.0


def report_sections(results: dict[str, Any], settings: dict[str, Any], env: dict[str, Any], warmup: dict[str, Any],
                    spec_rows: list[list[Any]]) -> tuple[list[Any], list[str]]:
    """`bench throughput`'s report: its sections (results, settings, environment) and notes."""
    from vibee.bench.report import Section

    repeat = settings["repeat"]
    notes = [f"Warm-up: {warmup['requests']} request ({warmup['prompt_tokens']} prompt + {warmup['output_tokens']} "
             "output tokens) ran before timing and is not counted. Times cover adding all requests and stepping "
             "until the last one finished."]
    if results["elapsed_s"] < SHORT_RUN_S:
        notes.append(f"The timed part took {results['elapsed_s']:.2f} s, too short to compare runs by: a few "
                     "milliseconds of host jitter move its rates by a tenth or more. Give it more prompts or output "
                     "tokens (or --repeat).")
    if results["jit_compiles"]["count"]:
        notes.append(f"{results['jit_compiles']['count']} Triton kernel compiles "
                     f"({', '.join(results['jit_compiles']['kernels'])}) fell inside the timed loop: the figures include "
                     f"their {results['jit_compiles']['seconds']:.1f} s.")
    r = results
    sections = [
        Section("Results", ["Metric", "Value"], [
            ["Elapsed (s)", r["elapsed_s"]], ["Requests", r["num_requests"]],
            ["Requests/s", r["requests_per_s"]], ["Output tokens/s", r["output_tokens_per_s"]],
            *([[f"Output tokens/s, each of {repeat} passes (the median's above)",
                " / ".join(f"{p['output_tokens_per_s']:.1f}" for p in r["passes"])]] if repeat > 1 else []),
            ["Total tokens/s (prompt + output)", r["total_tokens_per_s"]],
            ["Prompt tokens", r["prompt_tokens"]], ["Output tokens", r["output_tokens"]],
            ["Engine steps", r["steps"]], ["Mean batch size", r["mean_batch_size"]],
            ["Multi-steps (decode rounds on the device)",
             "off" if r["multi_step"] is None else f"{r['multi_step']['steps']} ({r['multi_step']['rounds']} rounds)"],
            ["Max running sequences", r["max_running"]], ["Peak KV cache usage", f"{100 * r['peak_kv_cache_usage']:.1f}%"],
            ["Preemptions", f"{r['preemptions']} ({r['preemption_mode']})"],
            ["Triton compiles inside the timed loop",
             f"{r['jit_compiles']['count']} ({r['jit_compiles']['seconds']:.2f} s)"],
            *([["Swap-outs / swap-ins / recomputed instead", f"{r['swap_outs']} / {r['swap_ins']} / {r['swap_fallbacks']}"]]
              if r["preemption_mode"] == "swap" else []), *spec_rows,
            *([["Grammars: on the device (token automata) / on the host (llguidance)",
                f"{r['grammar_masks']['device_requests']} / {r['grammar_masks']['host_requests']} requests"],
               ["Grammar masks outside rounds (host time): ms per step / us per row",
                f"{r['grammar_masks']['ms_per_step']:.3f} / {r['grammar_masks']['us_per_row']:.1f}"]]
              if r["grammar_masks"] else []),
        ]),
        Section("Settings", ["Setting", "Value"], [[k, v] for k, v in settings.items()]),
        Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()]),
    ]
    return sections, notes
