"""`vibee bench latency`: the decode timing loop, the bandwidth-limit arithmetic and the shapes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tests.spec_edit import specs_with_knob
from vibee.bench.ceilings import measure_ceilings
from vibee.bench.cli import bench
from vibee.bench.latency import summarize_decode, weight_bytes
from vibee.runtime.shapes import shape_config
from vibee.runtime.config import DEFAULT_MODEL_DIR


def test_limit_arithmetic():
    measured = {"step_times_s": [0.002, 0.004], "context_lens": [10, 12]}
    s = summarize_decode(measured, batch_size=2, weight_bytes_=1_000_000, kv_bytes_per_token=1000, bandwidth_gbs=1.0)
    assert s["tokens_per_s"] == pytest.approx(2 / 0.003)
    assert s["bytes_per_step"] == 1_000_000 + 2 * 11 * 1000
    limit_step = s["bytes_per_step"] / 1e9
    assert s["fraction_of_limit"] == pytest.approx(limit_step / 0.003)
    assert s["limit_tokens_per_s"] == pytest.approx(2 / limit_step)
    assert "fraction_of_limit" not in summarize_decode(measured, batch_size=2, weight_bytes_=1, kv_bytes_per_token=1,
                                                       bandwidth_gbs=None)


def test_weight_bytes_count_an_untied_lookup_table_by_its_rows():
    # A quantized model's bf16 table only serves the lookup (lm_head reads its own codes): a step
    # reads the looked-up rows of it; tied to lm_head, the whole table; loaded, always the whole.
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(100, 8), "head": torch.nn.Linear(8, 100, bias=False),
                                 "norm": torch.nn.LayerNorm(8)})
    table, head, norm = 100 * 8 * 4, 8 * 100 * 4, 2 * 8 * 4
    assert weight_bytes(model) == table + head + norm
    assert weight_bytes(model, 3) == 3 * 8 * 4 + head + norm
    model["head"].weight = model["embed"].weight
    assert weight_bytes(model, 3) == weight_bytes(model) == table + norm


@pytest.mark.parametrize("shape, params", [("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248)])
def test_shapes_have_the_published_parameter_counts(shape, params):
    c = shape_config(shape)
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = attn + mlp + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    assert c.num_layers * per_layer + embed + c.hidden_size == params


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no default model")
def test_latency_command_writes_figures_and_plot(tmp_path):
    result = CliRunner().invoke(bench, ["latency", "--device", "cpu", "--prompt-len", "8", "--decode-steps", "3",
                                        "--warmup-steps", "1", "--bandwidth-gbs", "10", "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("latency-*.json")
    data = json.loads(path.read_text())
    r = data["results"]
    assert r["decode_steps"] == 3 and r["tokens_per_s"] > 0 and 0 < r["fraction_of_limit"]
    assert data["measured"]["context_lens"] == [10, 11, 12]  # prompt 8, one warm-up step, then 3 timed
    assert data["measured"]["timing"] == data["settings"]["step_timing"] == "each step waited for (host clock)"  # eager
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert r["bandwidth_gbs"] == 10 and r["bandwidth_source"] == "--bandwidth-gbs" and data["ceilings"] is None


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no default model")
def test_latency_runs_the_modules_of_the_spec_dir_it_is_given(tmp_path):
    specs = specs_with_knob(tmp_path / "specs", "igla_kv_cache.vibee", "block_size", "32")
    result = CliRunner().invoke(bench, ["latency", "--device", "cpu", "--prompt-len", "8", "--decode-steps", "1",
                                        "--warmup-steps", "0", "--bandwidth-gbs", "10", "--spec-dir", str(specs),
                                        "--result-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    settings = json.loads(next((tmp_path / "out").glob("latency-*.json")).read_text())["settings"]
    assert settings["block_size"] == 32


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no default model")
def test_latency_limit_uses_the_copy_bandwidth_measured_in_the_run(tmp_path):
    result = CliRunner().invoke(bench, ["latency", "--device", "cpu", "--dtype", "float32", "--prompt-len", "8",
                                        "--decode-steps", "2", "--warmup-steps", "0", "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(next(tmp_path.glob("latency-*.json")).read_text())
    assert data["ceilings"] == measure_ceilings("cpu", torch.float32).as_dict()
    r = data["results"]
    assert r["bandwidth_gbs"] == pytest.approx(1000 * data["ceilings"]["copy_tb_s"])
    assert r["bandwidth_source"] == "device-to-device copy measured in this run"
    assert r["limit_tokens_per_s"] == pytest.approx(1e9 * r["bandwidth_gbs"] / r["bytes_per_step"])


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no default model")
def test_latency_over_two_ranks_reads_half_the_sharded_weights(tmp_path):
    """-tp 2: a worker rank is launched, both take the same steps, and rank 0's step reads its shard."""
    args = ["latency", "--device", "cpu", "--prompt-len", "8", "--decode-steps", "2", "--warmup-steps", "0",
            "--bandwidth-gbs", "10"]
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        result = CliRunner().invoke(bench, [*args, "-tp", str(tp), "--result-dir", str(out)])
        assert result.exit_code == 0, result.output
        runs[tp] = json.loads(next(out.glob("latency-*.json")).read_text())
    assert runs[2]["settings"]["tensor_parallel_size"] == 2
    whole, shard = runs[1]["results"]["weight_bytes"], runs[2]["results"]["weight_bytes"]
    assert shard < 0.6 * whole  # the norms stay whole on every rank
    assert runs[2]["measured"]["context_lens"] == runs[1]["measured"]["context_lens"] == [9, 10]


def test_decode_replays_the_split_count_the_engines_graph_for_its_batch_uses(monkeypatch):
    """The engine's decode graph for b sequences splits the KV only until b * kv_heads * splits
    programs fill the GPU (cuda_graphs.splits_for_batch); benchmarks that replay steps as graphs
    use the same count, not the one a single sequence would take."""
    from types import SimpleNamespace

    from vibee.bench import kernels, latency

    fa = SimpleNamespace(num_splits_for=lambda n: 16)
    configs = SimpleNamespace(kv_cache=SimpleNamespace(block_size=16))
    run = {"model": None, "device": "cpu", "cuda_graphs": True, "num_kv_heads": 8, "name": "m", "dtype_name": "float32",
           "gen": SimpleNamespace(flash_attention=fa, kv_cache=None, source="gen", configs=configs)}
    seen: dict = {}
    monkeypatch.setattr(latency, "build_rank_model", lambda params, ranks=None, progress=False: dict(run))
    monkeypatch.setattr(latency, "measure_decode", lambda *args, **kwargs: seen.update(kwargs) or {})
    for batch, splits in ((1, 16), (32, 2), (128, 1)):
        latency.measure_rank(dict(prompt_len=8, warmup_steps=1, decode_steps=2, batch_size=batch))
        assert seen["num_splits"] == splits and seen["sync_steps"] is False, batch
    latency.measure_rank(dict(prompt_len=8, warmup_steps=1, decode_steps=2, batch_size=1, sync_steps=True))
    assert seen["sync_steps"] is True  # --sync-steps

    from vibee.bench import commands_profile, profile_step

    profiled: dict = {}
    steps = {"step_times_s": [0.0] * 8}
    monkeypatch.setattr(latency, "measure_decode", lambda *args, **kwargs: seen.update(kwargs) or steps)
    monkeypatch.setattr(profile_step, "profile_step", lambda *args, **kwargs: profiled.update(kwargs) or {})
    commands_profile._profile_variant({"spec_dir": None, "quant": "none"}, phase="decode", batch_size=128,
                                      context_len=64, steps=2)
    assert profiled["num_splits"] == seen["num_splits"] == 1

    asked = []

    def paged_decode(q, k_cache, v_cache, tables, lens, num_splits):
        asked.append(num_splits)
        return q

    fa.paged_decode = paged_decode
    kernels.bench_decode(fa, dict(batch=32, heads=16, kv_heads=8, kv_len=32, head_dim=8), torch.float32, "cpu")
    assert set(asked) == {2}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not (DEFAULT_MODEL_DIR / "config.json").exists(),
                    reason="needs a CUDA GPU and the default model")
def test_replayed_steps_are_timed_back_to_back_on_the_gpu_unless_each_is_waited_for():
    """Replayed steps go back to back (a CUDA event before each and after the last) as the engine
    launches them; with sync_steps each is waited for and timed on the host clock."""
    from vibee.bench.latency import build_rank_model, measure_decode

    params = dict(shape=None, model=None, device="cuda", dtype="bfloat16", quant="none", flash_attn=True,
                  enforce_eager=False)
    run = build_rank_model(params)
    for sync, timing in ((False, "back to back (CUDA events)"), (True, "each step waited for (host clock)")):
        m = measure_decode(run["model"], run["gen"].kv_cache, batch_size=2, prompt_len=8, decode_steps=5, warmup_steps=2,
                           device="cuda", block_size=run["gen"].configs.kv_cache.block_size,
                           num_splits=run["gen"].flash_attention.num_splits_for(16), sync_steps=sync)
        assert m["timing"] == timing and m["context_lens"] == [11, 12, 13, 14, 15]
        assert len(m["step_times_s"]) == 5 and all(t > 0 for t in m["step_times_s"])
