"""`vibee bench tiles --quant none`: the decoder GEMV's candidate launches, the gemv_tiles table
derived from their times (each timed weight takes its fastest through the spec's first-match rule),
the spec lines it writes (read back as the same table), and the command in Triton's interpreter."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vibee.bench import gemv_tile_sweep
from vibee.bench.cli import bench
from vibee.bench.gemv_tile_sweep import derive_gemv_table, gemv_candidates, paste_gemv_table
from vibee.bench.tile_sweep import Measured
from vibee.ir.load import load_specs
from vibee.kinds.decoder.config import MAX_TILE_ELEMENTS, DecoderConfig, GemvTile

SPEC = Path(__file__).resolve().parents[2] / "specs" / "tri" / "igla_decoder.vibee"
A, B, C = GemvTile(block_n=4, block_k=512), GemvTile(block_n=8, block_k=256, num_warps=8), GemvTile(block_n=2, block_k=1024, num_stages=1)


def test_candidates_span_rows_depths_warps_and_stages_within_the_registers():
    tiles = gemv_candidates()
    assert len(set(tiles)) == len(tiles) and all(t.max_n is None and t.min_k == 0 for t in tiles)
    assert {t.block_n for t in tiles} == {1, 2, 4, 8, 16} and {t.block_k for t in tiles} == {128, 256, 512, 1024}
    assert {t.num_warps for t in tiles} == {2, 4, 8} and {t.num_stages for t in tiles} == {1, 3}
    assert all(t.block_n * t.block_k <= min(MAX_TILE_ELEMENTS, 128 * 32 * t.num_warps) for t in tiles)
    assert GemvTile(block_n=16, block_k=1024, num_warps=2) not in tiles  # 256 partial sums a thread


def measured(n, k, times, wrong=()):
    """One weight's times over the candidates A, B, C (None: did not run); `wrong`: indices that computed a wrong product."""
    r = Measured(n, k, 1, 1.0, 1.0, [A, B, C], list(times))
    r.wrong.update({i: 0.5 for i in wrong})
    return r


def test_each_timed_weight_takes_its_fastest_launch_through_the_first_match_rule():
    weights = {(3072, 2048): [1, 2, 3], (2048, 8192): [3, 1, 2], (16384, 2048): [2, 3, 1], (2048, 2048): [1, 3, 2],
               (128256, 2048): [3, 2, 1], (4096, 14336): [2, 1, 3]}
    table = derive_gemv_table([measured(n, k, t) for (n, k), t in weights.items()])
    config = DecoderConfig(gemv_tiles=table)  # the spec's own checks: no row covered by an earlier one, the last any
    for (n, k), times in weights.items():
        assert config.gemv_tile(n, k).model_copy(update={"max_n": None, "min_k": 0}) == [A, B, C][times.index(min(times))], (n, k)
    assert [(t.max_n, t.min_k) for t in table][:2] == [(4096, 14336), (2048, 8192)]  # deepest first
    assert (table[-1].max_n, table[-1].min_k) == (None, 0)
    # An untimed weight takes the first row whose corner holds it: 5000 x 4096 is too shallow for the
    # 14336- and 8192-deep rows and too wide for 2048 and 3072 rows: 16384 x 2048's launch.
    assert config.gemv_tile(5000, 4096).model_copy(update={"max_n": None, "min_k": 0}) == C


def test_a_launch_wrong_on_one_weight_is_taken_on_none():
    table = derive_gemv_table([measured(64, 64, [1, 2, 3], wrong=[0]), measured(32, 128, [1, 2, 3])])
    assert all(t.model_copy(update={"max_n": None, "min_k": 0}) != A for t in table)


def test_a_weight_no_launch_ran_is_an_error():
    with pytest.raises(ValueError, match="no launch ran the 64 x 64 weight"):
        derive_gemv_table([measured(64, 64, [None, None, None])])


def outside_gemv_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("  gemv_tiles:")
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    - "))
    return lines[:start] + lines[end:]


def test_pasted_lines_load_back_and_leave_the_rest_of_the_spec(tmp_path):
    table = [A.model_copy(update={"max_n": 4096, "min_k": 8192}), B.model_copy(update={"max_n": 2048}), C]
    text = SPEC.read_text()
    pasted = paste_gemv_table(text, table)
    path = tmp_path / SPEC.name
    path.write_text(pasted)
    (spec,), _ = load_specs([path])
    assert list(spec.config.gemv_tiles) == table
    assert outside_gemv_lines(pasted) == outside_gemv_lines(text)
    assert "    - {block_n: 2, block_k: 1024, num_warps: 4, num_stages: 1}" in pasted.splitlines()  # any: keys left out
    with pytest.raises(ValueError, match="gemv_tiles"):
        paste_gemv_table("config:\n  one_token_gemv: true\n", table)


def test_gpu_rows_are_refused_for_the_decoder(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = CliRunner().invoke(bench, ["tiles", "--quant", "none", "--device", "cpu", "--gpu-rows", "--weights", "32x64",
                                        "--result-dir", str(tmp_path)])
    assert result.exit_code != 0 and "no rows for one GPU alone" in result.output


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on the CPU: set TRITON_INTERPRET=1")
def test_the_command_times_the_launches_and_writes_them_into_the_decoder_spec(tmp_path, monkeypatch):
    """Two candidates on two small weights (the interpreter is slow); with --write-spec the decoder
    spec takes the derived rows and still generates."""
    small = [GemvTile(block_n=4, block_k=128), GemvTile(block_n=8, block_k=128, num_stages=1)]
    monkeypatch.setattr(gemv_tile_sweep, "gemv_candidates", lambda: small)
    specs = tmp_path / "specs"
    shutil.copytree(SPEC.parent, specs)
    out = tmp_path / "results"
    result = CliRunner().invoke(bench, ["tiles", "--quant", "none", "--device", "cpu", "--weights", "24x256,40x64",
                                        "--spec-dir", str(specs), "--result-dir", str(out), "--write-spec"])
    assert result.exit_code == 0, result.output
    data = json.loads(next(out.glob("tiles-*.json")).read_text())
    assert [(r["n"], r["k"], r["m"]) for r in data["results"]] == [(24, 256, 1), (40, 64, 1)]
    assert all(c["seconds"] is not None for r in data["results"] for c in r["candidates"])
    (spec,), _ = load_specs([specs / SPEC.name])
    assert [t.model_dump() for t in spec.config.gemv_tiles] == data["gemv_tiles"]
    assert [(t.max_n, t.min_k) for t in spec.config.gemv_tiles] == [(24, 256), (None, 0)]
    assert {(t.block_n, t.num_stages) for t in spec.config.gemv_tiles} <= {(4, 3), (8, 1)}
    assert next(out.glob("tiles-*.tiles.vibee")).read_text().startswith("  gemv_tiles:\n    - {max_n: 24, min_k: 256, ")
    assert next(out.glob("tiles-*.png")).read_bytes()[:4] == b"\x89PNG"


def test_a_shapes_qkv_and_gate_up_weights_run_through_their_epilogues():
    from vibee.bench.gemv_tile_sweep import Epilogue, shapes_epilogues

    assert shapes_epilogues(["llama-3.2-1b"]) == {(3072, 2048): Epilogue("rope", 32, 8, 64), (16384, 2048): Epilogue("silu_mul")}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on the CPU: set TRITON_INTERPRET=1")
def test_each_weight_is_timed_as_a_step_runs_it(monkeypatch):
    """The QKV weight through the GEMV with RoPE's epilogue, gate_up's with silu * up, another plain:
    every candidate's result checked against torch's float32 one, so a launch that ran the plain GEMV
    where the step runs an epilogue would be dropped as wrong."""
    from tests.runtime.hf_models import generated
    from vibee.bench.gemv_tile_sweep import Epilogue, sweep_gemv

    decoder = generated().decoder
    monkeypatch.setattr(gemv_tile_sweep, "gemv_candidates", lambda: [GemvTile(block_n=4, block_k=32), GemvTile(block_n=1, block_k=64)])
    epilogues = {(32, 64): Epilogue("rope", 2, 1, 8), (48, 64): Epilogue("silu_mul")}
    weights = [(32, 64), (48, 64), (24, 64)]

    def time_call(calls, device):
        calls[0]()
        return 1e-6

    def sweep(weights):
        return sweep_gemv(decoder, weights, device="cpu", dtype=torch.float32, time_call=time_call, epilogues=epilogues)

    results = sweep(weights)
    assert [(r.n, r.k) for r in results] == weights
    assert all(t is not None for r in results for t in r.times) and not any(r.wrong or r.errors for r in results)
    monkeypatch.setattr(decoder, "triton_gemv_rope", lambda x, w, bias, rope, tile=None: decoder.triton_gemv(x, w, tile=tile))
    monkeypatch.setattr(decoder, "triton_gemv_silu_mul", lambda x, w, tile=None: decoder.triton_gemv(x, w, tile=tile)[:, :w.shape[0] // 2])
    rope, silu = sweep([(32, 64), (48, 64)])
    assert len(rope.wrong) == len(silu.wrong) == 2  # the plain GEMV is not what these weights run
