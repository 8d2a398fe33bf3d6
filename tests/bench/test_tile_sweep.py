"""`vibee bench tiles`: the candidates it times, the first-match table it derives from the times,
the spec lines it writes (which the spec loader reads back as the same table), and the command."""

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from vibee.bench.cli import bench
from vibee.bench.tile_sweep import Measured, candidates, derive_table, gpu_rows, paste_table, spec_lines, splice_table
from vibee.ir.load import load_specs
from vibee.kinds.quantization.tiles import MatmulTile

SPEC = Path(__file__).resolve().parents[2] / "specs" / "tri" / "igla_quantization.vibee"


def first_match(table, m: int, n: int):
    return next(t for t in table if (t.max_m is None or m <= t.max_m) and n >= t.min_n)


def launch(tile):
    """A tile's launch, whatever products it covers."""
    return tile.model_copy(update={"max_m": None, "min_n": 0})


@pytest.mark.parametrize("m", [1, 2, 16, 17, 32, 64, 100, 128, 200, 256, 512])
def test_candidates_fit_the_row_count(m):
    tiles = candidates(m)
    kinds = {t.kernel for t in tiles}
    assert ("gemv" in kinds) == (m == 1) and ("slices" in kinds) == (1 < m <= 16) and ("dense" in kinds) == (m >= 32)
    assert ("wgmma" in kinds) == (m >= 32)
    # wgmma tiles 64 deep and 128 deep (2-3 stages: a 128-deep stage holds twice x's tile)
    # (6 stages of a 64-deep ring where x's tile is at most 128 rows)
    assert {(t.block_k, t.num_stages) for t in tiles if t.kernel == "wgmma"} == (
        {(64, 2), (64, 3), (64, 4), (128, 2), (128, 3)} | ({(64, 6)} if m <= 128 else set()) if m >= 32 else set())
    # two warpgroups of 64 weight rows (8 warps, 128 wide) at every height
    assert ({t.block_m for t in tiles if t.kernel == "wgmma" and t.num_warps == 8 and t.block_n == 128}
            == ({max(64, t.block_m) for t in tiles if t.kernel == "mm"} if m >= 32 else set()))
    assert all(t.block_m >= min(m, 256) for t in tiles if t.kernel in ("mm", "wgmma"))  # one tile tall covers the rows
    assert len(set(tiles)) == len(tiles)
    assert candidates(m, wgmma=False) == [t for t in tiles if t.kernel != "wgmma"]  # off sm_90 the wgmma launch is an mm tile


def _measured(m: int, n: int, k: int, best: int, slower=None) -> Measured:
    """Times over a 10 us dense product: 1.0x for `best`, 2.0x for the rest, None at `slower`."""
    times = [10e-6 * (1.0 if c == best else 2.0) for c in range(len(candidates(m)))]
    if slower is not None:
        times[slower] = None
    return Measured(n, k, m, 10e-6, 15e-6, candidates(m), times)


def test_derived_table_takes_each_widths_best_at_each_row_count():
    dense = len(candidates(512)) - 1
    results = [
        _measured(1, 16384, 2048, 3), _measured(1, 3072, 2048, 0), _measured(1, 2048, 2048, 0),
        # 64 rows: the wide weight's best differs; the two 2048-row weights agree
        _measured(64, 16384, 2048, 5), _measured(64, 3072, 2048, 1), _measured(64, 2048, 2048, 1), _measured(64, 2048, 8192, 1),
        # past 256 rows: A for wide and narrow weights, dense between (three rows, first match); a failed launch is never taken
        _measured(512, 16384, 2048, 2, slower=0), _measured(512, 3072, 2048, dense), _measured(512, 2048, 2048, 2),
    ]
    table = derive_table(results)
    for r in results:
        assert launch(first_match(table, r.m, r.n)) == launch(candidates(r.m)[r.best()]), (r.m, r.n)
    assert [(t.max_m, t.min_n) for t in table] == [(1, 16384), (1, 0), (64, 16384), (64, 0), (None, 16384), (None, 3072), (None, 0)]
    assert launch(first_match(table, 40, 3072)) == launch(candidates(64)[1])  # between row counts: the next one's row
    assert table[-1].max_m is None and table[-1].min_n == 0  # covers every product, as the spec requires


def test_two_weights_of_one_width_share_the_candidate_with_the_least_summed_time():
    a, b = _measured(64, 2048, 2048, 1), _measured(64, 2048, 8192, 2)
    b.times[1] = 10e-6 * 1.1  # 1 is a near-best for b; 2 is 2.0x for a
    (row,) = derive_table([a, b])
    assert launch(row) == launch(candidates(64)[1])


def test_a_launch_wrong_at_one_product_is_taken_at_none():
    """mm 128x64x128 split-K swap_ab gave NaN at 128 x 14336 @ 14336 x 4096 on an H100 and was the best elsewhere."""
    fine, broken = _measured(128, 6144, 4096, 3), _measured(128, 4096, 14336, 1)
    broken.times[3], broken.wrong[3] = None, float("nan")
    fine.times[1] = 10e-6 * 1.5  # the next best where 3 is right
    (row,) = derive_table([fine, broken])
    assert launch(row) == launch(candidates(128)[1])
    assert launch(derive_table([fine])[0]) == launch(candidates(128)[3])


def test_spec_lines_load_back_as_the_same_table(tmp_path):
    results = [_measured(1, 4096, 2048, 1), _measured(32, 4096, 2048, 4), _measured(32, 2048, 2048, len(candidates(32)) - 1),
               _measured(256, 4096, 2048, 0)]
    table = derive_table(results)
    table = gpu_rows(derive_table(results[1:3]), table, 32, 32, "H100 80GB HBM3")  # a GPU's rows, its name quoted
    text = SPEC.read_text(encoding="utf-8")
    pasted = paste_table(text, table)
    assert pasted.split("  tiles:\n")[0] == text.split("  tiles:\n")[0]  # the comments above the block kept
    path = tmp_path / SPEC.name
    path.write_text(pasted, encoding="utf-8")
    (spec,), _ = load_specs([path])
    assert spec.config.tiles == table and any(t.gpu == "H100 80GB HBM3" for t in table)
    with pytest.raises(ValueError, match="no `tiles:` block"):
        paste_table(re.sub(r"^  tiles:\n(?:    - .*\n)+", "", text, flags=re.M), table)


def test_the_default_sweep_takes_the_weights_of_both_shapes_once_each():
    from vibee.bench.commands_tiles import model_weights, shapes_weights

    both = shapes_weights(("llama-3.2-1b", "llama-3.1-8b"))
    assert both == model_weights("llama-3.2-1b") + model_weights("llama-3.1-8b")  # no weight shared between them
    assert (28672, 4096) in both and (2048, 8192) in both and shapes_weights(("llama-3.2-1b",) * 2) == model_weights("llama-3.2-1b")
    assert bench.commands["tiles"].params[0].default == ("llama-3.2-1b", "llama-3.1-8b")


def test_the_command_needs_a_gpu_or_the_interpreter(monkeypatch, tmp_path):
    result = CliRunner().invoke(bench, ["tiles", "--device", "cpu", "--weights", "64y128", "--result-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--weights takes" in result.output
    # (it refuses before importing any kernel: modules decorated now would stay compiled, not interpreted)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = CliRunner().invoke(bench, ["tiles", "--device", "cpu", "--result-dir", str(tmp_path)])
    assert result.exit_code == 2 and "run it on a GPU" in result.output


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep in the interpreter (half a minute), --write-spec into a copy of the specs: both tests below
    check it, the report and the spec it wrote."""
    tmp_path = tmp_path_factory.mktemp("tiles")
    specs, out = tmp_path / "specs", tmp_path / "out"
    shutil.copytree(SPEC.parent, specs)
    args = ["tiles", "--device", "cpu", "--weights", "64x128,32x128", "--rows", "1,32", "--spec-dir", str(specs),
            "--result-dir", str(out), "--write-spec"]
    return SimpleNamespace(result=CliRunner().invoke(bench, args), args=args, spec=specs / SPEC.name, out=out)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on the CPU: set TRITON_INTERPRET=1")
def test_the_command_times_every_candidate_and_writes_the_table(swept):
    result = swept.result
    assert result.exit_code == 0, result.output
    data = json.loads(next(swept.out.glob("tiles-*.json")).read_text())
    assert [(r["n"], r["m"]) for r in data["results"]] == [(64, 1), (64, 32), (32, 1), (32, 32)]
    assert all(len(r["candidates"]) == len(candidates(r["m"], wgmma=False)) and all(c["seconds"] for c in r["candidates"])
               for r in data["results"])  # every candidate launched and matched the dequantized product
    snippet = next(swept.out.glob("tiles-*.tiles.vibee")).read_text()
    assert next(swept.out.glob("tiles-*.png")).read_bytes().startswith(b"\x89PNG")
    assert snippet.startswith("  tiles:\n    - {kernel: gemv, max_m: 1") and len(data["table"]) == snippet.count("    - {")
    assert "or rerun with --write-spec: " + str(swept.spec) in " ".join(result.output.split())  # the spec it read
    assert all(c["wrong"] is None for r in data["results"] for c in r["candidates"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels on the CPU: set TRITON_INTERPRET=1")
def test_write_spec_puts_the_derived_table_into_the_spec(swept):
    result, path = swept.result, swept.spec
    assert result.exit_code == 0, result.output
    data = json.loads(next(swept.out.glob("tiles-*.json")).read_text())
    (spec,), _ = load_specs([path])
    assert [t.model_dump() for t in spec.config.tiles] == data["table"] and "vibee gen" in " ".join(result.output.split())
    # a spec without the block is left as it was
    bare = re.sub(r"^  tiles:\n(?:    - .*\n)+", "", path.read_text(encoding="utf-8"), flags=re.M)
    path.write_text(bare, encoding="utf-8")
    result = CliRunner().invoke(bench, [a if a != "1,32" else "1" for a in swept.args])
    assert result.exit_code == 2 and "no `tiles:` block" in result.output and path.read_text(encoding="utf-8") == bare
    assert "nothing was timed" in result.output and not list(swept.out.glob("tiles-*.json"))[1:]  # failed first


class _FakeQuant:
    """The generated module's surface sweep() uses, on plain torch: candidates 64 wide fail to
    launch, 128-deep mm tiles give a wrong product."""

    LaunchTile = dict

    @staticmethod
    def quantize_weight(w, dtype):
        return SimpleNamespace(qweight=w.clone(), scales=w[:, :1].clone(), zeros=None)

    @staticmethod
    def dequantize(qw):
        return qw.qweight

    @staticmethod
    def pick_launch(tiles, m, n, k, device):
        return tiles[0]

    @staticmethod
    def triton_quant_linear(x, qw, config=None):
        import torch.nn.functional as F

        if config is not None and config["block_n"] == 64:
            raise RuntimeError("out of shared memory")
        y = F.linear(x, qw.qweight)
        return y * 2 if config is not None and config["kernel"] == "mm" and config["block_k"] == 128 else y


def _run_all(fns, device):
    for f in fns:
        f()
    return 1e-6


def test_sweep_skips_launches_that_fail_or_compute_wrongly():
    import torch

    from vibee.bench.tile_sweep import sweep

    (r,) = sweep(_FakeQuant, [(32, 64)], [64], device="cpu", dtype=torch.float32, time_call=_run_all)
    tiles = candidates(64)
    assert r.tiles == tiles
    for i, tile in enumerate(tiles):
        failed, wrong = tile.block_n == 64, tile.kernel == "mm" and tile.block_k == 128
        assert (r.times[i] is None) == (failed or wrong), tile
        assert (i in r.errors) == failed and (not failed or "out of shared memory" in r.errors[i])
        assert (i in r.wrong) == (wrong and not failed) and (i not in r.wrong or abs(r.wrong[i] - 1.0) < 1e-6)
    assert tiles[r.best()].kernel in ("mm", "dense") and r.times[r.best()] is not None


def test_sweep_times_every_call_over_distinct_copies_of_the_weight(monkeypatch):
    """As a model's layers: each timing cycles through operand_copies(bytes) weights of its own
    (on a GPU, together twice the L2), the quantized ones and the dense baseline's alike."""
    import torch
    import torch.nn.functional as F

    from vibee.bench import tile_sweep

    read: list[list[int]] = []  # per timing: the weights its calls read
    asked: list[int] = []

    timing = [False]

    def linear(x, w):
        if timing[0]:
            read[-1].append(w.data_ptr())
        return F.linear(x, w)

    monkeypatch.setattr(tile_sweep, "F", SimpleNamespace(linear=linear))

    class Spy(_FakeQuant):
        @staticmethod
        def triton_quant_linear(x, qw, config=None):
            if timing[0]:
                read[-1].append(qw.qweight.data_ptr())
            return _FakeQuant.triton_quant_linear(x, qw, config)

    def time_call(fns, device):
        read.append([])
        timing[0] = True
        for f in fns:
            f()
        timing[0] = False
        return 1e-6

    def copies(nbytes, device):
        asked.append(nbytes)
        return 3

    tile_sweep.sweep(Spy, [(32, 64)], [1], device="cpu", dtype=torch.float32, time_call=time_call,
                     operand_copies=copies)
    assert asked == [32 * 64 * 4 + 32 * 4]  # codes and scales of the one weight
    assert len(read) > 2 and all(len(r) == 3 and len(set(r)) == 3 for r in read), read


def test_a_sweep_of_fewer_row_counts_retunes_only_their_rows():
    gemv = MatmulTile(kernel="gemv", max_m=1, block_n=64, block_k=128)
    current = [gemv, MatmulTile(kernel="slices", max_m=16, block_m=16, block_n=64, block_k=128),
               MatmulTile(kernel="mm", block_m=64, block_n=64, block_k=64)]
    swept = [MatmulTile(kernel="slices", min_n=4096, block_m=16, block_n=128, block_k=128),
             gemv.model_copy(update={"max_m": None, "block_n": 128})]  # derive_table's from --rows 1: the last any
    spliced = splice_table(swept, current, 1)
    assert [t.max_m for t in spliced] == [1, 1, 16, None] and spliced[2:] == current[1:]
    assert [t.block_n for t in spliced[:2]] == [128, 128]
    # a sweep reaching past every bounded row of the table is the whole table
    assert splice_table(swept, current, 16) == swept and splice_table(swept, [current[-1]], 1) == swept


def test_a_sweep_from_more_rows_keeps_the_rows_for_fewer():
    gemv = MatmulTile(kernel="gemv", max_m=1, block_n=64, block_k=128)
    current = [gemv, MatmulTile(kernel="slices", max_m=16, block_m=16, block_n=64, block_k=128),
               MatmulTile(kernel="wgmma", max_m=128, block_m=128, block_n=64, block_k=64),
               MatmulTile(kernel="dense", block_n=64, block_k=128)]
    swept = [MatmulTile(kernel="mm", max_m=16, block_m=16, block_n=128, block_k=64),
             MatmulTile(kernel="wgmma", block_m=64, block_n=128, block_k=64)]  # derive_table's from --rows 16,64
    spliced = splice_table(swept, current, 64, 16)
    assert spliced == [gemv, swept[0], swept[1].model_copy(update={"max_m": 64})] + current[2:]
    # the GEMV's row stays first where the sweep runs to any M
    assert splice_table(swept, current[:2], 64, 16) == [gemv] + swept


def test_gpu_rows_sit_where_their_row_counts_begin_and_leave_the_rest():
    from vibee.kinds.quantization.config import QuantizationConfig

    gemv = MatmulTile(kernel="gemv", max_m=1, block_n=64, block_k=128)
    current = [gemv, MatmulTile(kernel="mm", max_m=16, block_m=16, block_n=64, block_k=64),
               MatmulTile(kernel="wgmma", max_m=128, block_m=128, block_n=64, block_k=64),
               MatmulTile(kernel="dense", block_n=64, block_k=128)]
    swept = [MatmulTile(kernel="wgmma", max_m=64, min_n=4096, block_m=64, block_n=128, block_k=64),
             MatmulTile(kernel="mm", max_m=64, block_m=64, block_n=64, block_k=64),
             MatmulTile(kernel="wgmma", block_m=128, block_n=64, block_k=128, num_stages=3)]  # derive_table's from --rows 64,128
    table = gpu_rows(swept, current, 64, 128, "H200")
    assert table[:2] == current[:2] and table[5:] == current[2:]  # fewer rows' rows ahead, any device's kept
    assert [(t.gpu, t.max_m) for t in table[2:5]] == [("H200", 64), ("H200", 64), ("H200", 128)]
    # a second sweep on that GPU replaces its rows; another GPU's rows go beside them
    again = gpu_rows(swept[1:], table, 64, 128, "H200")
    assert [t.gpu for t in again] == [None, None, "H200", "H200", None, None]
    other = gpu_rows(swept, table, 64, 128, "H100 80GB HBM3")
    assert [t.gpu for t in other].count("H100 80GB HBM3") == 3 and [t.gpu for t in other].count("H200") == 3
    assert QuantizationConfig(tiles=other).tiles == other  # a valid table: every row reachable, the last any device's
    assert 'gpu: "H100 80GB HBM3"' in "\n".join(spec_lines(other))


def test_gpu_rows_need_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = CliRunner().invoke(bench, ["tiles", "--device", "cpu", "--gpu-rows", "--weights", "64x64", "--rows", "1",
                                        "--result-dir", str(tmp_path)])
    assert result.exit_code != 0 and "--gpu-rows tags the rows with this GPU's name" in result.output


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the command on the CPU: set TRITON_INTERPRET=1")
@pytest.mark.parametrize("quant, spec_name, block", [("int4", "igla_quantization.vibee", "tiles"),
                                                     ("fp8", "igla_quantization.vibee", "fp8_tiles"),
                                                     ("none", "igla_decoder.vibee", "gemv_tiles")])
def test_write_spec_fails_before_timing_where_the_spec_has_no_block_to_replace(tmp_path, quant, spec_name, block):
    specs = tmp_path / "specs"
    shutil.copytree(SPEC.parent, specs)
    path = specs / spec_name
    bare = re.sub(rf"^  {block}:\n(?:    - .*\n)+", "", path.read_text(encoding="utf-8"), flags=re.M)
    assert bare != path.read_text(encoding="utf-8")
    path.write_text(bare, encoding="utf-8")
    result = CliRunner().invoke(bench, ["tiles", "--device", "cpu", "--quant", quant, "--weights", "32x128", "--rows", "1",
                                        "--spec-dir", str(specs), "--result-dir", str(tmp_path / "out"), "--write-spec"])
    assert result.exit_code == 2 and f"no `{block}:` block" in result.output and "nothing was timed" in result.output
    assert not (tmp_path / "out").exists() and path.read_text(encoding="utf-8") == bare
