"""`vibee bench perplexity`: what --quant costs the built-in model in held-out perplexity."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vibee.bench.cli import bench
from vibee.runtime.config import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="no default model")


def test_quantized_perplexity_stays_close(tmp_path):
    result = CliRunner().invoke(bench, ["perplexity", "--device", "cpu", "--max-tokens", "3000",
                                        "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    figures = json.loads(next(tmp_path.glob("perplexity-*.json")).read_text())["results"]
    none, int8, int4 = (figures[q]["perplexity"] for q in ("none", "int8", "int4"))
    assert figures["none"]["tokens"] == 3000
    assert none < 40  # far below the 4,096 of a uniform guess: the model and the runtime work
    # The bar: int8 within 5% and int4 within 15% of the unquantized model. The weights
    # really are quantized: the figures move.
    assert int8 != none and int4 != none
    assert abs(int8 / none - 1) < 0.05
    assert abs(int4 / none - 1) < 0.15
    assert figures["int4"]["quantization"]["bits"] == 4 and figures["int8"]["quantization"]["bits"] == 8


def test_bad_quant_list_is_refused(tmp_path):
    result = CliRunner().invoke(bench, ["perplexity", "--quant", "none,int3", "--result-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--quant takes" in result.output


def test_group_size_reaches_the_quantized_rows(tmp_path):
    result = CliRunner().invoke(bench, ["perplexity", "--device", "cpu", "--max-tokens", "500", "--quant", "int4",
                                        "--group-size", "32", "--result-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    figures = json.loads(next(tmp_path.glob("perplexity-*.json")).read_text())["results"]
    assert figures["int4"]["quantization"] == {"bits": 4, "group_size": 32, "method": "rtn"}


def test_a_precision_that_fails_keeps_the_finished_rows(tmp_path):
    # group 48 is no power of two: both quantized rows fail, the unquantized one is still scored and saved
    result = CliRunner().invoke(bench, ["perplexity", "--device", "cpu", "--max-tokens", "200", "--quant", "none,int4,int8",
                                        "--group-size", "48", "--result-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    figures = json.loads(next(tmp_path.glob("perplexity-*.json")).read_text())["results"]
    assert figures["none"]["tokens"] == 200 and figures["none"]["perplexity"] > 1
    for quant in ("int4", "int8"):
        assert "power of two" in figures[quant]["error"]
    assert "failed" in result.output and "Traceback" not in result.output
