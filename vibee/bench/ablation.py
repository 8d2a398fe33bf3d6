"""`vibee bench ablation`: the original design's speed-up table (ORIGINAL.md's claims), measured.
One model and one load; each optimization on and off, in one process, one engine at a time (each
freed before the next is built), through the engine's public API. Every ratio is computed from
the two figures measured here; only the claims are constants, quoted from the design."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Callable

from vibee.bench.report import Workload
from vibee.bench.throughput import StepPeaks, check_workload, run_throughput, warm_up
from vibee.runtime.config import MEDUSA_HEADS_FILE as HEADS_FILE

# --- the runs ------------------------------------------------------------------------------------


def _params(temperature: float, max_tokens: int):
    from vibee.runtime.sampling_params import SamplingParams

    return SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=max_tokens)


def run_static(engine, workload: Workload, group_size: int, *, temperature: float) -> dict[str, Any]:
    """Static batching on the same engine: requests in fixed groups of `group_size`, a group
    added only once every member of the previous one has finished, so each group lasts as long
    as its slowest member. Finished members leave the batch (no padding work is done for them)."""
    n = len(workload.prompts)
    groups, generated, step = [], 0, 0
    admitting = StepPeaks()
    engine.add_observer(admitting)
    admitting.active = True
    start = time.perf_counter()
    for first in range(0, n, group_size):
        members = range(first, min(n, first + group_size))
        added_at_step = step
        for i in members:
            engine.add_request(f"static-{i}", workload.prompts[i], _params(temperature, workload.output_lens[i]))
        finished_at: dict[str, int] = {}
        while engine.has_unfinished():
            outs = engine.step()
            step += 1
            for out in outs:
                generated += sum(len(c.delta_token_ids) for c in out.outputs)
                if out.finished:
                    finished_at[out.request_id] = step
        groups.append({"requests": len(members), "added_at_step": added_at_step,
                       "output_lens": [workload.output_lens[i] for i in members],
                       "finished_at_step": [finished_at[f"static-{i}"] for i in members]})
    elapsed = time.perf_counter() - start
    admitting.active = False
    return {"elapsed_s": elapsed, "num_requests": n, "output_tokens": generated,
            "output_tokens_per_s": generated / elapsed, "steps": step, "admitting_steps": admitting.admitting_steps,
            "group_size": group_size, "groups": groups}


def prefill_peak_bytes(engine, prompt: list[int]) -> int | None:
    """Device memory allocated at the peak of one prefill of `prompt` (one output token), above
    what was allocated before it (weights, KV cache). CUDA's allocator counts it; a CPU has no
    such counter, so None there."""
    if not str(engine.device).startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize(engine.device)
    before = torch.cuda.memory_allocated(engine.device)
    torch.cuda.reset_peak_memory_stats(engine.device)
    engine.add_request("ablation-prefill", prompt, _params(0.0, 1))
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize(engine.device)
    return torch.cuda.max_memory_allocated(engine.device) - before


def with_engine(config, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Build an engine, run `work` on it, and free it (and its device memory) before returning,
    so the next configuration has the device to itself."""
    from vibee.runtime.engine import LLMEngine

    engine = LLMEngine(config, progress=False)
    try:
        return work(engine)
    finally:
        engine.close()
        del engine
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def timed(engine, workload: Workload, temperature: float) -> dict[str, Any]:
    """run_throughput on a workload the engine was checked to fit, after one untimed pass of the
    same load: every shape the timed pass meets (and every kernel it compiles) was met before,
    so the first configuration measured pays no cost the later ones skip."""
    check_workload(engine, workload)
    warm_up(engine, workload)
    run_throughput(engine, workload, temperature=temperature)
    if engine.speculative:
        engine.acceptance.reset()  # the timed requests' drafts only
    results = run_throughput(engine, workload, temperature=temperature)
    if engine.speculative:
        results["speculative"] = engine.stats()["speculative_decoding"]
    results["weight_bytes"] = engine.weight_bytes
    return results


def cap_outputs(workload: Workload, cap: int) -> Workload:
    return Workload(workload.prompts, [min(n, cap) for n in workload.output_lens])


def first(workload: Workload, n: int) -> Workload:
    return Workload(workload.prompts[:n], workload.output_lens[:n])


def speculative_figures(on: dict[str, Any], plain: dict[str, Any], k: int, draft_cost: float, spec_module) -> dict:
    """Measured acceptance and speed-up at batch 1, next to the generated module's predictions."""
    spec = on["speculative"]
    a = float(spec["acceptance_rate"])
    return {"acceptance_rate": a, "mean_emitted_tokens": spec["mean_emitted_tokens"], "k": k, "draft_cost": draft_cost,
            "measured_speedup": on["output_tokens_per_s"] / plain["output_tokens_per_s"],
            "predicted_claimed_formula": spec_module.claimed_speedup(a, k),
            "predicted_expected_speedup": spec_module.expected_speedup(a, k, draft_cost),
            "gate": spec.get("gate")}


def draft_cost(engine, k: int) -> tuple[float, str]:
    """c of the speed-up formula, and what it was measured from. A draft model speculating in
    rounds: its step's time over the target's, from replays of the engine's own graphs (a small
    model's steps are launch-bound, so its weight bytes would flatter it: on the H200 the built-in
    draft reads ~1/8 of the target's bytes and takes 0.61 of its step time). Otherwise the draft's
    weight bytes over the target's (a decode step reads each once; Medusa heads read their own
    and the target's lm_head once more); 0 for n-gram drafts."""
    from torch.nn import ModuleList

    speculator = engine.speculator
    rounds = speculator.rounds
    if speculator.draft_model is not None and rounds is not None:
        times = rounds.step_times()
        return max(times["round"] - times["verify"], 0.0) / k / times["step"], "step time"
    medusa = speculator.medusa
    draft = speculator.draft_model or (medusa and ModuleList([medusa.heads, engine.model.lm_head]))
    if draft is None:
        return 0.0, "n-gram: none"
    return engine.gen.quantization.weight_bytes(draft) / engine.weight_bytes, "weight bytes"


# --- the configurations, one engine at a time ----------------------------------------------------


def variant(base, *, knobs: dict[str, dict[str, Any]] | None = None, **fields):
    """The base EngineConfig with some settings and knobs changed."""
    merged = {kind: dict(values) for kind, values in base.knobs.items()}
    for kind, values in (knobs or {}).items():
        merged.setdefault(kind, {}).update(values)
    return base.model_copy(update={**fields, "knobs": merged})


def measure(base, make_workload: Callable[[Any], Workload], *, temperature: float, recompute_output_len: int,
            batch1_prompts: int, draft_dir: Path | None, console=None) -> dict[str, Any]:
    """Run every configuration and return {"runs": {label: figures}, "speculative": {drafter:
    figures}, "workload": Workload}. `make_workload(engine)` draws the load on the first engine."""
    runs: dict[str, dict[str, Any]] = {}
    spec: dict[str, dict[str, Any]] = {}
    load: dict[str, Workload] = {}

    def baseline(engine):
        workload = load["all"] = make_workload(engine)
        load["capped"] = cap_outputs(workload, recompute_output_len)
        load["batch1"] = first(workload, batch1_prompts)
        out = {"continuous": timed(engine, workload, temperature)}
        out["static"] = run_static(engine, workload, engine.max_num_seqs, temperature=temperature)
        out["kv_capped"] = {**run_throughput(engine, load["capped"], temperature=temperature),
                            "output_cap": recompute_output_len}
        out["prefill_peak_bytes"] = prefill_peak_bytes(engine, max(workload.prompts, key=len))
        out["weight_bytes"] = engine.weight_bytes
        out["max_num_seqs"] = engine.max_num_seqs
        return out

    def reference(engine):
        return {**timed(engine, load["all"], temperature),
                "prefill_peak_bytes": prefill_peak_bytes(engine, max(load["all"].prompts, key=len))}

    def speculative(drafter):
        def work(engine):
            out = timed(engine, load["batch1"], temperature)
            k = engine.gen.configs.speculative_decode.num_speculative_tokens
            cost, source = draft_cost(engine, k)
            spec[drafter] = {**speculative_figures(out, runs["batch1_plain"], k, cost, engine.gen.speculative_decode),
                             "draft_cost_from": source}
            return out
        return work

    one = {"continuous_batch": {"max_num_seqs": 1}}
    steps = [
        ("baseline", "everything on (continuous, static, KV capped, prefill memory)", base, baseline),
        ("recompute", "no KV cache: recompute every step (capped outputs)", variant(base, kv_cache=False),
         lambda e: timed(e, load["capped"], temperature)),
        ("reference_attention", "reference attention", variant(base, flash_attn=False), reference),
        ("int8", "int8 weights", variant(base, quant="int8"), lambda e: timed(e, load["all"], temperature)),
        ("int4", "int4 weights", variant(base, quant="int4"), lambda e: timed(e, load["all"], temperature)),
        ("batch1_plain", "batch 1, plain decoding", variant(base, knobs=one),
         lambda e: timed(e, load["batch1"], temperature)),
        ("batch1_ngram", "batch 1, n-gram speculation",
         variant(base, speculative=True, knobs={**one, "speculative_decode": {"method": "ngram"}}), speculative("ngram")),
    ]
    if draft_dir is not None:
        steps.append(("batch1_draft_model", f"batch 1, draft-model speculation ({draft_dir.name})",
                      variant(base, speculative=True, draft_model=draft_dir, knobs=one), speculative("draft_model")))
    if base.shape is None and (base.model_dir / HEADS_FILE).is_file():
        steps.append(("batch1_medusa", "batch 1, Medusa heads", variant(
            base, speculative=True, knobs={**one, "speculative_decode": {"method": "medusa"}}), speculative("medusa")))
    for i, (label, what, config, work) in enumerate(steps, 1):
        t0 = time.perf_counter()
        if console is not None:
            with console.status(f"[{i}/{len(steps)}] {what} ..."):
                runs[label] = with_engine(config, work)
        else:
            runs[label] = with_engine(config, work)
        r = runs[label]
        tok_s = r["continuous"]["output_tokens_per_s"] if label == "baseline" else r["output_tokens_per_s"]
        if console is not None:
            console.print(f"[{i}/{len(steps)}] {what}: {tok_s:,.1f} output tok/s "
                          f"({time.perf_counter() - t0:.1f} s with load)", highlight=False)
    return {"runs": runs, "speculative": spec, "workload": load["all"]}
