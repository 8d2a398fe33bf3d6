"""`vibee bench tiles --quant fp8`: the W8A8 kernel's candidate launches, the fp8_tiles table and
fp8_triton_max_rows derived from their times beside cuBLASLt's, the spec lines it writes (read back
as the same values by the spec loader), and the command in Triton's interpreter."""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from vibee.bench import fp8_tile_sweep
from vibee.bench.cli import bench
from vibee.bench.fp8_tile_sweep import Fp8Measured, derive_fp8, fp8_candidates, paste_fp8
from vibee.ir.load import load_specs
from vibee.kinds.quantization.tiles import Fp8Tile

SPEC = Path(__file__).resolve().parents[2] / "specs" / "tri" / "igla_quantization.vibee"


@pytest.mark.parametrize("m", [1, 2, 16, 17, 32, 100, 128, 256, 4096])
def test_fp8_candidates_are_one_tile_tall_over_the_rows_and_half_that(m):
    tall = min(max(16, 1 << (m - 1).bit_length()), 128)
    tiles = fp8_candidates(m)
    assert {t.block_m for t in tiles} == ({tall} if m <= 16 else {tall, tall // 2})
    assert {(t.block_n, t.block_k) for t in tiles} == {(64, 128), (64, 256), (128, 128), (128, 256)}
    assert {(t.num_warps, t.num_stages) for t in tiles} == {(4, 3), (4, 4), (8, 4)}
    assert len(set(tiles)) == len(tiles) and all(t.max_m is None for t in tiles)


A, B, C = (Fp8Tile(block_m=16, block_n=64, block_k=128), Fp8Tile(block_m=16, block_n=128, block_k=128),
           Fp8Tile(block_m=64, block_n=128, block_k=256, num_warps=8))


def measured(m, times, cublas=None, n=64, dense=1.0):
    """One product at m rows over the candidates A, B, C with these times (None: did not run)."""
    return Fp8Measured(n, 32, m, dense, 1.0, [A, B, C], list(times), cublas_s=cublas)


def test_each_row_count_takes_its_fastest_launch_and_neighbours_with_one_merge():
    results = [measured(1, [1.0, 2.0, 3.0]), measured(16, [1.0, 2.0, 3.0]), measured(32, [3.0, 1.0, 2.0]),
               measured(256, [3.0, 2.0, 1.0])]
    table, max_rows = derive_fp8(results, current_max_rows=7)
    assert table == [A.model_copy(update={"max_m": 16}), B.model_copy(update={"max_m": 32}), C]
    assert max_rows == 7  # no cuBLASLt times: the spec's value stays


def test_times_are_summed_over_the_weights_relative_to_bf16():
    """A launch fast on a weight bf16 is slow on, slow where bf16 is fast, loses: each time counts over its
    weight's bf16 time."""
    results = [measured(1, [10.0, 12.0, None], n=64, dense=10.0), measured(1, [2.0, 1.0, None], n=128, dense=1.0)]
    assert derive_fp8(results, 16)[0] == [B]


def test_triton_runs_up_to_the_last_row_count_it_is_ahead_of_cublas_from_the_first():
    def run(cublas_by_m):
        return derive_fp8([measured(m, [1.0, 2.0, 3.0], cublas=c) for m, c in cublas_by_m.items()], 16)[1]

    assert run({1: 2.0, 16: 1.5, 64: 0.5, 256: 0.5}) == 16
    assert run({1: 2.0, 16: 1.0, 64: 5.0}) == 64  # a tie keeps the Triton kernel
    assert run({1: 0.5, 16: 2.0}) == 0  # behind at the first: cuBLASLt wherever it runs
    assert run({1: 2.0, 16: 0.5, 64: 2.0}) == 1  # ahead again later does not count: the rows up to it are cuBLASLt's


def test_a_launch_wrong_at_one_product_is_taken_at_none():
    """A launch whose product was off at one row count is taken at no row count: its bug may hide
    at a shape not swept."""
    wrong = measured(1, [None, 1.0, 2.0])
    wrong.wrong[0] = 0.5
    assert derive_fp8([wrong, measured(32, [0.1, 1.0, 2.0])], 16)[0] == [B]


def test_no_launch_that_ran_everywhere_is_an_error():
    with pytest.raises(ValueError, match="no fp8 launch ran correctly at 1 rows"):
        derive_fp8([measured(1, [None, None, None])], 16)


def outside_fp8_lines(text: str) -> list[str]:
    """The spec's lines but its fp8_tiles rows and fp8_triton_max_rows."""
    lines, inside = [], False
    for line in text.splitlines():
        inside = line == "  fp8_tiles:" or (inside and line.startswith("    - "))
        if not inside and not line.startswith("  fp8_triton_max_rows:"):
            lines.append(line)
    return lines


def test_pasted_lines_load_back_and_leave_the_rest_of_the_spec(tmp_path):
    table = [A.model_copy(update={"max_m": 16}), C]
    text = SPEC.read_text()
    pasted = paste_fp8(text, table, 32)
    path = tmp_path / SPEC.name
    path.write_text(pasted)
    (spec,), _ = load_specs([path])
    assert list(spec.config.fp8_tiles) == table and spec.config.fp8_triton_max_rows == 32
    assert outside_fp8_lines(pasted) == outside_fp8_lines(text)
    assert "    - {max_m: 16, block_m: 16, block_n: 64, block_k: 128}" in pasted.splitlines()  # defaults left out


def test_a_spec_without_the_fp8_lines_is_refused():
    with pytest.raises(ValueError, match="fp8_tiles"):
        paste_fp8("config:\n  bits: 4\n", [A], 16)


def test_gpu_rows_are_refused_for_fp8(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = CliRunner().invoke(bench, ["tiles", "--quant", "fp8", "--device", "cpu", "--gpu-rows", "--weights", "32x64",
                                        "--rows", "1", "--result-dir", str(tmp_path)])
    assert result.exit_code != 0 and "no rows for one GPU alone" in result.output


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on the CPU: set TRITON_INTERPRET=1")
def test_the_command_times_the_launches_and_writes_them_into_the_spec(tmp_path, monkeypatch):
    """Two candidates (the interpreter is slow); with --write-spec the spec takes the derived rows,
    its fp8_triton_max_rows kept (no cuBLASLt on a CPU)."""
    monkeypatch.setattr(fp8_tile_sweep, "fp8_candidates", lambda m: [A, B])
    specs = tmp_path / "specs"
    shutil.copytree(SPEC.parent, specs)
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, ["tiles", "--quant", "fp8", "--device", "cpu", "--weights", "32x64",
                                        "--rows", "1,32", "--spec-dir", str(specs), "--result-dir", str(out),
                                        "--write-spec"])
    assert result.exit_code == 0, result.output
    data = json.loads(next(out.glob("tiles-*.json")).read_text())
    assert [r["m"] for r in data["results"]] == [1, 32] and all(r["cublas_s"] is None for r in data["results"])
    assert all(c["seconds"] is not None for r in data["results"] for c in r["candidates"])
    (spec,), _ = load_specs([specs / SPEC.name])
    assert [t.model_dump() for t in spec.config.fp8_tiles] == data["fp8_tiles"]
    assert spec.config.fp8_triton_max_rows == data["fp8_triton_max_rows"] == 16
    assert {(t.block_m, t.block_n) for t in spec.config.fp8_tiles} <= {(16, 64), (16, 128)}
    assert next(out.glob("tiles-*.tiles.vibee")).read_text().startswith("  fp8_tiles:\n    - {")
