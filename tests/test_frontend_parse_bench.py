"""`vibee bench parse` reports, per corpus, the bytes parsed, MB/s and the share of files that
parse, as JSON + markdown; a directory with a broken spec shows up in the rate and the failures."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vibee.bench.cli import bench
from vibee.kinds.registry import KIND_NAMES


def test_bench_parse_writes_speed_and_parse_rate_per_corpus(tmp_path):
    corpus = tmp_path / "older"
    corpus.mkdir()
    (corpus / "good.vibee").write_text("name: a\nbehaviors:\n  - name: b\n    given: x\n", encoding="utf-8")
    (corpus / "bad.vibee").write_text("name: a\n  - stray\n", encoding="utf-8")
    result = CliRunner().invoke(bench, ["parse", "--generated", "4", "--repeats", "1", "--corpus", str(corpus),
                                        "--result-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (json_path,) = (tmp_path / "out").glob("parse-*.json")
    results = json.loads(json_path.read_text())["results"]
    shipped, generated, older = results["shipped specs"], results["4 generated descriptive specs"], results[str(corpus)]
    assert shipped["files"] == len(KIND_NAMES) and shipped["parse_rate"] == 1.0 and shipped["mb_per_s_best"] > 0
    assert generated["files"] == 4 and generated["parse_rate"] == 1.0
    assert older["parsed"] == 1 and older["parse_rate"] == 0.5
    assert older["failures"][0].startswith(f"{corpus / 'bad.vibee'}:2:3: error:")
    assert (tmp_path / "out" / json_path.with_suffix(".md").name).exists()
