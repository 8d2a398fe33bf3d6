"""`vibee bench ablation`: every row written (JSON, markdown, plot), ratios made from the measured
figures, a static baseline that waits for its slowest member, one engine alive at a time, and
clear errors for flags the ablation sets itself. Tiny loads on the built-in model, on a CPU."""

from __future__ import annotations

import json
import random
import weakref

import pytest
from click.testing import CliRunner

from vibee.bench.ablation import run_static
from vibee.bench.ablation_report import AblationRow, table_rows
from vibee.bench.cli import bench
from vibee.bench.report import Workload
from vibee.runtime.config import DEFAULT_DRAFT_MODEL_DIR, DEFAULT_MODEL_DIR

needs_model = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists() or
                                 not (DEFAULT_DRAFT_MODEL_DIR / "config.json").exists(),
                                 reason="the built-in model and its draft model are not there")
TECHNIQUES = {"KV cache", "Continuous batching", "Flash attention", "INT4 weights", "INT8 weights",
              "Speculative decoding (n-gram)", "Speculative decoding (draft model)", "Speculative decoding (Medusa heads)",
              "Tensor parallelism"}
ARGS = ["--device", "cpu", "--num-prompts", "6", "--input-len", "8:20", "--output-len", "2:12",
        "--recompute-output-len", "6", "--batch1-prompts", "2", "--max-num-seqs", "2", "--seed", "3"]


def _expected_ratio(row: dict) -> float:
    return row["on"] / row["off"] if row["higher_is_better"] else row["off"] / row["on"]


@needs_model
def test_ablation_writes_every_row_from_measured_figures(tmp_path, monkeypatch):
    from vibee.runtime.engine import LLMEngine

    alive = weakref.WeakSet()
    built = []
    init = LLMEngine.__init__

    def one_at_a_time(self, *args, **kwargs):
        built.append(len(alive))  # engines still alive when this one is built
        init(self, *args, **kwargs)
        alive.add(self)

    monkeypatch.setattr(LLMEngine, "__init__", one_at_a_time)
    result = CliRunner().invoke(bench, ["ablation", *ARGS, "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(built) == 9 and set(built) == {0}  # each engine freed before the next was built

    data = json.loads(next(tmp_path.glob("ablation-*.json")).read_text())
    assert next(tmp_path.glob("ablation-*.png")).stat().st_size > 0
    markdown = next(tmp_path.glob("ablation-*.md")).read_text()
    rows = data["rows"]
    assert {r["technique"] for r in rows} == TECHNIQUES
    for row in rows:
        assert row["technique"] in markdown and row["claim"] in markdown
        if row["on"] is None or row["off"] is None:
            assert row["ratio"] is None and row["met"] == "not measured"
        else:
            assert row["ratio"] == pytest.approx(_expected_ratio(row))
            assert row["met"] == ("-" if row["claim_min"] is None else
                                  "met" if row["ratio"] >= row["claim_min"] else "not met")

    runs = {(r["technique"], r["metric"]): r for r in rows}
    base = data["runs"]["baseline"]
    kv = runs[("KV cache", "output tok/s")]
    assert (kv["on"], kv["off"]) == (base["kv_capped"]["output_tokens_per_s"], data["runs"]["recompute"]["output_tokens_per_s"])
    assert data["runs"]["recompute"]["output_tokens"] == base["kv_capped"]["output_tokens"]  # the same capped load
    assert base["kv_capped"]["output_cap"] == 6 and base["kv_capped"]["output_tokens"] <= 6 * 6
    cb = runs[("Continuous batching", "output tok/s")]
    assert (cb["on"], cb["off"]) == (base["continuous"]["output_tokens_per_s"], base["static"]["output_tokens_per_s"])
    int4 = runs[("INT4 weights", "weight bytes")]
    assert int4["on"] == data["runs"]["int4"]["weight_bytes"] < int4["off"] == base["weight_bytes"]
    assert runs[("Flash attention", "prefill peak bytes")]["met"] == "not measured"  # no allocator counter on a CPU
    assert "not measured" in runs[("Tensor parallelism", "output tok/s")]["compared"]

    # The static baseline: a group starts only when the previous one's slowest member finished.
    groups = base["static"]["groups"]
    assert [g["requests"] for g in groups] == [2, 2, 2]
    for before, after in zip(groups, groups[1:]):
        assert after["added_at_step"] == max(before["finished_at_step"])
    assert base["static"]["steps"] > base["continuous"]["steps"]  # waiting for the slowest costs steps
    # A step admits each group at once in the static baseline; continuous batching admits as
    # requests finish (the report names both counts: such steps are not CUDA graphs on a GPU).
    assert base["static"]["admitting_steps"] == len(groups)
    assert len(groups) <= base["continuous"]["admitting_steps"] <= 6
    c = base["continuous"]
    assert (f"continuous batching ran {c['steps']} steps ({c['admitting_steps']} admitting requests)" in
            " ".join(data_notes(tmp_path)))

    # Speculation: predictions are the generated module's formulas at the measured acceptance.
    from vibee.kinds.speculative_decode.speedup import claimed_speedup, expected_speedup

    for drafter in ("ngram", "draft_model"):
        s = data["speculative"][drafter]
        assert 0.0 <= s["acceptance_rate"] <= 1.0 and s["k"] >= 1
        assert s["predicted_claimed_formula"] == pytest.approx(claimed_speedup(s["acceptance_rate"], s["k"]))
        assert s["predicted_expected_speedup"] == pytest.approx(
            expected_speedup(s["acceptance_rate"], s["k"], s["draft_cost"]))
        assert s["measured_speedup"] == pytest.approx(data["runs"][f"batch1_{drafter}"]["output_tokens_per_s"] /
                                                      data["runs"]["batch1_plain"]["output_tokens_per_s"])
    assert data["speculative"]["ngram"]["draft_cost"] == 0.0 < data["speculative"]["draft_model"]["draft_cost"] < 1.0
    assert 0.0 < data["speculative"]["medusa"]["draft_cost"] < 1.0  # the heads and the lm_head they read again
    assert [line for line in result.output.splitlines() if line.startswith("[")][-1].startswith("[9/9]")


def data_notes(result_dir) -> list[str]:
    """The notes of the ablation's markdown report, as one line each."""
    text = next(result_dir.rglob("ablation-*.md")).read_text()
    return [" ".join(text.split())]


@needs_model
def test_static_batch_waits_for_its_slowest_member():
    from vibee.runtime.engine import LLMEngine
    from vibee.runtime.config import EngineConfig

    engine = LLMEngine(EngineConfig(device="cpu", max_model_len=64, num_kv_blocks=16), progress=False)
    prompts = [[5 + i, 6, 7, 8] for i in range(5)]
    out = run_static(engine, Workload(prompts, [2, 9, 3, 3, 4]), 2, temperature=0.0)
    g = out["groups"]
    assert [x["requests"] for x in g] == [2, 2, 1] and out["output_tokens"] == 21
    # The short member finished early; the group went on until the 9-token one was done.
    assert g[0]["finished_at_step"][0] < g[0]["finished_at_step"][1] == g[1]["added_at_step"]
    assert g[0]["finished_at_step"][1] - g[0]["added_at_step"] >= 9
    assert g[2]["added_at_step"] == max(g[1]["finished_at_step"]) and out["steps"] == max(g[2]["finished_at_step"])
    assert out["admitting_steps"] == 3  # one step admits each group


def _fake_runs(rng: random.Random) -> tuple[dict, dict]:
    def run(**extra):
        return {"output_tokens_per_s": rng.uniform(1, 1000), "weight_bytes": rng.randint(1, 10**6), **extra}

    base = {"continuous": run(steps=20, admitting_steps=5, elapsed_s=0.1),
            "static": {**run(steps=30, admitting_steps=3, elapsed_s=0.1), "groups": [{}] * 3, "group_size": 4},
            "kv_capped": {**run(), "output_cap": 8}, "prefill_peak_bytes": rng.randint(1, 10**6),
            "weight_bytes": rng.randint(1, 10**6)}
    runs = {"baseline": base, "recompute": run(), "reference_attention": run(prefill_peak_bytes=rng.randint(1, 10**6)),
            "int8": run(), "int4": run(), "batch1_plain": run(), "batch1_ngram": run()}
    spec = {"ngram": {"acceptance_rate": 0.5, "k": 4, "draft_cost": 0.0, "predicted_claimed_formula": 1.6,
                      "predicted_expected_speedup": 1.9}}
    return runs, spec


def test_table_ratios_follow_the_figures():
    """Two different sets of figures give each row the ratio of its own figures, never a constant."""
    seen = []
    for seed in (1, 2):
        runs, spec = _fake_runs(random.Random(seed))
        rows = table_rows(runs, spec, 0, "not measured: no draft model")
        for r in rows:
            if r.on is not None and r.off is not None:
                assert r.ratio == pytest.approx(r.on / r.off if r.higher_is_better else r.off / r.on)
        seen.append([r.ratio for r in rows])
        by_name = {(r.technique, r.metric): r for r in rows}
        assert by_name[("KV cache", "output tok/s")].on == runs["baseline"]["kv_capped"]["output_tokens_per_s"]
        assert by_name[("Flash attention", "prefill peak bytes")].off == runs["reference_attention"]["prefill_peak_bytes"]
        draft = by_name[("Speculative decoding (draft model)", "output tok/s")]
        assert draft.ratio is None and draft.met == "not measured" and "no draft model" in draft.note
    assert all(a != b for a, b in zip(*seen) if a is not None)
    memory = AblationRow("x", "y", "weight bytes", 25.0, 100.0, False, "4×", 4.0)
    assert memory.ratio == 4.0 and memory.met == "met"
    memory.on = 50.0
    assert memory.ratio == 2.0 and memory.met == "not met"


@pytest.mark.parametrize("flag,message", [
    (["--quant", "int4"], "--quant"),
    (["--no-kv-cache"], "--no-kv-cache"),
    (["--no-flash-attn"], "--no-flash-attn"),
    (["--speculative"], "--speculative"),
    (["--enable-prefix-caching"], "--enable-prefix-caching"),
    (["--input-len", "x"], "--input-len"),
    (["--dataset", "nope"], "--dataset"),
])
def test_bad_flag_is_a_clear_error(tmp_path, flag, message):
    result = CliRunner().invoke(bench, ["ablation", "--device", "cpu", *flag, "--result-dir", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_ablation_measures_attention_memory_on_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    args = [a if a != "cpu" else "cuda" for a in ARGS]
    result = CliRunner().invoke(bench, ["ablation", *args, "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(next(tmp_path.glob("ablation-*.json")).read_text())
    memory = next(r for r in data["rows"] if r["metric"] == "prefill peak bytes")
    assert memory["on"] > 0 and memory["off"] > 0 and memory["ratio"] == pytest.approx(_expected_ratio(memory))
