"""`vibee bench kernels` on a CPU (the torch paths at small shapes): every kernel is timed next to
its torch counterpart and the rates follow from the work and the times."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vibee.bench.ceilings import measure_ceilings
from vibee.bench.cli import bench


def test_kernels_command_times_each_kernel(tmp_path):
    result = CliRunner().invoke(bench, ["kernels", "--device", "cpu", "--shapes", "small", "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    path = next(tmp_path.glob("kernels-*.json"))
    rows = json.loads(path.read_text())["results"]
    # CPU: no torch int4 kernel, so one row per quantized product (a GPU adds one against torch int4).
    assert [r["kernel"] for r in rows[:2]] == ["attention prefill (causal, contiguous K/V)",
                                               "attention prefill (causal, paged K/V)"]
    assert [r["kernel"].split(" (")[0] for r in rows[2:]] == ["attention decode", "quantized GEMV", "quantized GEMM",
                                                              "kv write", "grammar token mask", "grammar token mask",
                                                              "grammar token mask"]  # token DFA, JSON mode, Lark PDA
    for r in rows:
        assert r["vibee_us"] > 0 and r["baseline_us"] > 0
        assert r["vibee_rate"] == pytest.approx(r["vibee_rate"])  # finite
    prefill = rows[0]
    assert prefill["vibee_rate"] == pytest.approx(4 * 2 * 4 * 128 * 128 * 64 / 2 / (prefill["vibee_us"] * 1e-6) / 1e12)
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_kernels_are_held_to_ceilings_measured_in_the_run(tmp_path):
    result = CliRunner().invoke(bench, ["kernels", "--device", "cpu", "--dtype", "float32", "--shapes", "small",
                                        "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    path = next(tmp_path.glob("kernels-*.json"))
    data = json.loads(path.read_text())
    # The same measurement this process made (cached), not a figure carried from another machine.
    assert data["ceilings"] == measure_ceilings("cpu", torch.float32).as_dict()
    copy, matmul = data["ceilings"]["copy_tb_s"], data["ceilings"]["matmul_tflop_s"]
    by_kernel = {r["kernel"].split(" (")[0]: r for r in data["results"]}
    prefill = by_kernel["attention prefill"]
    assert prefill["ceiling"] == pytest.approx(prefill["baseline_rate"])  # torch SDPA, timed in the same run
    assert prefill["ceiling_source"] == "torch SDPA, this run"
    for memory_bound in ("attention decode", "quantized GEMV", "kv write", "grammar token mask"):
        assert by_kernel[memory_bound]["ceiling"] == copy
    assert by_kernel["quantized GEMM"]["ceiling"] == matmul
    for r in data["results"]:
        assert r["fraction_of_ceiling"] == pytest.approx(r["vibee_rate"] / r["ceiling"])
    report = path.with_suffix(".md").read_text()
    assert "measured in this run" in report and f"{copy:.3f} TB/s" in report


def test_unknown_kernel_is_refused(tmp_path):
    result = CliRunner().invoke(bench, ["kernels", "--device", "cpu", "--only", "softmax", "--result-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--only takes" in result.output


def test_time_call_gives_the_time_of_one_call_of_several(monkeypatch):
    """Several calls (one per copy of the operands) are timed together and the time is per call."""
    from vibee.bench import kernels

    clock = [0.0]
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    calls = [0, 0, 0]

    def call(i):
        def run():
            calls[i] += 1
            clock[0] += 2.0 + i  # 2, 3 and 4 "seconds"
        return run

    assert kernels.time_call([call(0), call(1), call(2)], "cpu", repeats=12) == 3.0
    assert calls[0] == calls[1] == calls[2] == 4  # a warm-up and 3 timed runs each
    assert kernels.time_call(call(0), "cpu", repeats=12) == 2.0
    assert kernels.operand_copies(1 << 20, "cpu") == 1  # no L2 to outgrow on a CPU
