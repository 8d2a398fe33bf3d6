"""`vibee bench ablation`'s report: the original design's claims (quoted from ORIGINAL.md), the
table rows computed from what `ablation.measure` ran, the plot, and the notes that say what each
row compared."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vibee.runtime.config import MEDUSA_HEADS_FILE as HEADS_FILE

# The original design's claims (ORIGINAL.md), as (text, the least ratio that meets it).
CLAIMS = {
    "kv_cache": ("2–3×", 2.0),
    "speculative": ("2–3×", 2.0),
    "continuous_batching": ("3–5× throughput", 3.0),
    "flash_attention_speed": ("2–4×", 2.0),
    "flash_attention_memory": ("5–20× (16× at 4K)", 5.0),
    "int4_speed": ("2×", 2.0),
    "int4_memory": ("4×", 4.0),
    "int8_memory": ("2×", 2.0),
    "tensor_parallel": ("N× on N GPUs (~1.8× on 2)", None),
}

@dataclass
class AblationRow:
    """One line of the table: a figure with the optimization on and off, and the design's claim."""

    technique: str
    compared: str  # "on vs off", in words
    metric: str
    on: float | None  # None: not measured (see note)
    off: float | None
    higher_is_better: bool  # speed: on / off; memory: off / on (the saving)
    claim: str
    claim_min: float | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """The measured speed-up (or memory saving) of the optimization, from the two figures."""
        if self.on is None or self.off is None or min(self.on, self.off) <= 0:
            return None
        return self.on / self.off if self.higher_is_better else self.off / self.on

    @property
    def met(self) -> str:
        if self.ratio is None:
            return "not measured"
        if self.claim_min is None:
            return "-"
        return "met" if self.ratio >= self.claim_min else "not met"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}

def claimed_row(key: str, technique: str, compared: str, metric: str, on, off, *, higher_is_better=True,
                note: str = "") -> AblationRow:
    claim, least = CLAIMS[key]
    return AblationRow(technique, compared, metric, on, off, higher_is_better, claim, least, note)

def table_rows(runs: dict[str, dict[str, Any]], spec: dict[str, dict[str, Any]], num_devices: int,
               draft_missing: str | None) -> list[AblationRow]:
    """The table from what was measured; `runs` by configuration label (see Ablation.CONFIGS)."""
    base = runs["baseline"]
    tok = "output tok/s"
    rows = [
        claimed_row("kv_cache", "KV cache", "paged KV cache vs recomputing every token each step", tok,
                    base["kv_capped"]["output_tokens_per_s"], runs["recompute"]["output_tokens_per_s"],
                    note=f"outputs capped at {base['kv_capped']['output_cap']} tokens on both sides"),
        claimed_row("continuous_batching", "Continuous batching",
                    "continuous batching vs static groups that wait for their slowest member", tok,
                    base["continuous"]["output_tokens_per_s"], base["static"]["output_tokens_per_s"],
                    note=f"{len(base['static']['groups'])} static groups of {base['static']['group_size']}"),
        claimed_row("flash_attention_speed", "Flash attention", "generated flash attention vs the reference", tok,
                    base["continuous"]["output_tokens_per_s"], runs["reference_attention"]["output_tokens_per_s"]),
        claimed_row("flash_attention_memory", "Flash attention", "generated flash attention vs the reference",
                    "prefill peak bytes", base.get("prefill_peak_bytes"),
                    runs["reference_attention"].get("prefill_peak_bytes"), higher_is_better=False,
                    note="" if base.get("prefill_peak_bytes") is not None else
                    "not measured: no allocator peak counter on this device"),
    ]
    for bits in ("int4", "int8"):
        q = runs[bits]
        if bits == "int4":
            rows.append(claimed_row("int4_speed", "INT4 weights", "int4 vs unquantized weights", tok,
                                    q["output_tokens_per_s"], base["continuous"]["output_tokens_per_s"]))
        else:
            rows.append(AblationRow("INT8 weights", "int8 vs unquantized weights", tok, q["output_tokens_per_s"],
                                    base["continuous"]["output_tokens_per_s"], True, "-", None,
                                    "the design claims no int8 speed-up"))
        rows.append(claimed_row(f"{bits}_memory", f"{bits.upper()} weights", f"{bits} vs unquantized weights",
                                "weight bytes", q["weight_bytes"], base["weight_bytes"], higher_is_better=False))
    plain = runs["batch1_plain"]
    missing = {"draft_model": draft_missing, "medusa": f"not measured: no {HEADS_FILE} for this model"}
    for drafter, label in (("ngram", "n-gram"), ("draft_model", "draft model"), ("medusa", "Medusa heads")):
        figures = spec.get(drafter)
        on = runs.get(f"batch1_{drafter}")
        note = missing.get(drafter) if on is None else ""
        if figures is not None:
            note = (f"acceptance {100 * figures['acceptance_rate']:.1f}%, k={figures['k']}; predicted "
                    f"{figures['predicted_claimed_formula']:.2f}× (1/(1-a+a/k)), "
                    f"{figures['predicted_expected_speedup']:.2f}× (E/(1+k·c), c={figures['draft_cost']:.3f} "
                    f"from {figures.get('draft_cost_from', 'weight bytes')})")
        rows.append(claimed_row("speculative", f"Speculative decoding ({label})",
                                f"{label} drafts vs plain decoding, batch 1", tok,
                                None if on is None else on["output_tokens_per_s"],
                                plain["output_tokens_per_s"], note=note))
    devices = f"{num_devices} CUDA device{'s' if num_devices != 1 else ''}" if num_devices else "no CUDA device"
    rows.append(claimed_row("tensor_parallel", "Tensor parallelism", f"{devices}: not measured", tok, None, None,
                            note="the speed-up needs 2 or more GPUs; `vibee bench throughput -tp 2` (and `bench latency -tp 2`)"
                                 " measure it there"))
    return rows

def plot_ablation(rows: list[AblationRow], path: Path, title: str) -> Path:
    """Measured ratio of each row (bars, log scale) over the design's claimed least ratio (marks)."""
    from vibee.bench.plot import figure, save

    fig, ax = figure(figsize=(10, 0.5 * len(rows) + 1.5))
    labels = [f"{r.technique}: {r.metric}" for r in rows]
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        if r.ratio is None:
            ax.text(1.0, y, "  not measured", va="center", color="gray")
            continue
        color = {"met": "tab:green", "not met": "tab:red"}.get(r.met, "tab:blue")
        ax.barh(y, r.ratio - 1.0, left=1.0, color=color, alpha=0.8)  # from 1× (no change) to the ratio
        ax.text(r.ratio, y, f" {r.ratio:.2f}×", va="center")
        if r.claim_min is not None:
            ax.plot([r.claim_min], [y], marker="|", markersize=18, color="black")
    ax.plot([], [], marker="|", linestyle="", markersize=12, color="black", label="claimed (least)")
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ratios = [r.ratio for r in rows if r.ratio] + [r.claim_min for r in rows if r.claim_min] + [1.0]
    ax.set_xlim(min(ratios) / 1.5, max(ratios) * 2.0)
    ticks = [t for t in (0.01, 0.03, 0.1, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 50, 100) if min(ratios) / 1.5 <= t <= max(ratios) * 2]
    ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_yticks(ys, labels)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("measured ratio (on vs off; memory: saving)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return save(fig, path, title)

def _step_costs(continuous: dict[str, Any], static: dict[str, Any]) -> str:
    """Steps and time per step of both sides: a step that admits a request is not decode-only,
    so on a GPU it runs eagerly instead of as a CUDA graph, and continuous batching has one per
    admission where the static baseline has one per group."""
    def side(r: dict[str, Any]) -> str:
        return (f"{r['steps']} steps ({r['admitting_steps']} admitting requests) at "
                f"{1000 * r['elapsed_s'] / max(r['steps'], 1):.2f} ms a step")
    return (f"Here continuous batching ran {side(continuous)}, the static baseline {side(static)}; a step that "
            "admits a request is not decode-only and runs eagerly on a GPU, not as a CUDA graph.")

def _figure(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if "bytes" in metric:
        return f"{value / 2**20:,.2f} MiB"
    return f"{value:,.1f}"

def report_sections(rows: list[AblationRow], measured: dict[str, Any]) -> tuple[list, list[str]]:
    """(sections, notes) of the report: the table, speculation's predictions, every run's figures."""
    from vibee.bench.report import Section

    table = [[r.technique, r.metric, _figure(r.on, r.metric), _figure(r.off, r.metric),
              "-" if r.ratio is None else f"{r.ratio:.2f}×", r.claim, r.met] for r in rows]
    compared = [[r.technique, r.metric, r.compared, r.note] for r in rows]
    spec_rows = [[drafter, f["k"], f"{100 * f['acceptance_rate']:.1f}%", f["mean_emitted_tokens"], f["draft_cost"],
                  f"{f['measured_speedup']:.2f}×", f"{f['predicted_claimed_formula']:.2f}×",
                  f"{f['predicted_expected_speedup']:.2f}×"] for drafter, f in measured["speculative"].items()]
    run_rows = []
    for label, r in measured["runs"].items():
        parts = {"continuous": r["continuous"], "static": r["static"], "kv_capped": r["kv_capped"]} \
            if label == "baseline" else {"": r}
        for part, f in parts.items():
            run_rows.append([f"{label} {part}".strip(), f["num_requests"], f["output_tokens"], f["elapsed_s"],
                             f["output_tokens_per_s"], f["steps"]])
    sections = [
        Section("Measured vs the original design's claims",
                ["Technique", "Metric", "On", "Off", "Measured", "Claimed", "Met"], table),
        Section("What each row compares", ["Technique", "Metric", "On vs off", "Note"], compared),
        Section("Speculative decoding at batch 1: measured vs predicted",
                ["Drafter", "k", "Acceptance", "Tokens per target step", "Draft cost c", "Measured",
                 "Predicted 1/(1-a+a/k)", "Predicted E/(1+k·c)"], spec_rows),
        Section("Runs", ["Configuration", "Requests", "Output tokens", "Elapsed (s)", "Output tok/s", "Steps"], run_rows),
    ]
    base = measured["runs"]["baseline"]
    notes = [
        "Each configuration ran in this process on its own engine, freed before the next was built; each timed "
        "run followed one untimed warm-up request and an untimed pass of the same load. Prefix caching is off in every engine, since the same "
        "requests run more than once. Ratios: on / off for speed, off / on for memory (the saving).",
        f"KV cache: the baseline is the same engine with no KV cache, recomputing every sequence's whole context "
        f"each step; both sides ran the load with outputs capped at {base['kv_capped']['output_cap']} tokens, so "
        "recomputation finishes (its cost grows with the square of the length: longer outputs favour the cache).",
        f"Continuous batching: the baseline runs the same requests on the same engine in fixed groups of "
        f"max_num_seqs ({base['max_num_seqs']}); a group is added only after every member of the previous group "
        "finished, so each group lasts as long as its slowest member. Finished members leave the batch (no padding "
        "work), which makes this baseline a little kinder than a padded static batch. "
        + _step_costs(base["continuous"], base["static"]),
        "Flash attention: the baseline is the generated reference attention (materialized scores). Memory is "
        "CUDA's peak allocated bytes during one prefill of the load's longest prompt (one output token), above "
        "what was allocated before it: the whole forward's activations, not attention alone. On a GPU the engine "
        "captures CUDA graphs only with the generated attention; pass --enforce-eager to compare without graphs.",
        "Quantization: weights quantized at load time by the generated module (round to nearest); weight memory "
        "is engine.weight_bytes, every parameter and buffer once; skipped modules stay unquantized.",
        "Speculative decoding: plain and speculative engines both run with max_num_seqs 1 on the load's first "
        "requests. a is the measured acceptance rate, k the spec's num_speculative_tokens; the draft cost c is "
        "approximated by the draft model's parameter bytes over the target's (0 for n-gram); at batch 1 a small "
        "model's step costs its kernel launches more than its bytes, so the draft's real cost is higher. With "
        "--speculative the speed gate keeps the faster mode, so the measured speed-up is that of the mix it chose.",
        "Tensor parallelism: not measured by the ablation (its engines run on one device); `vibee bench throughput "
        "-tp 2` and `bench latency -tp 2` shard the served model over 2 ranks (GPUs, or gloo processes on a CPU, "
        "which measure the collectives' overhead, not a speed-up).",
    ]
    return sections, notes
