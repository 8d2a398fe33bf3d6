"""vibee/bench/report.py and the SSE parser: percentiles, workload, result files."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime

import numpy as np
import pytest

from vibee.bench.report import (Section, environment, markdown, parse_range, percentile, random_workload,
                                summarize, write_result)
from vibee.bench.serve_load import SSEParser, arrival_gaps


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("p", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(n, p):
    rng = random.Random(n * 1000 + int(p * 10))
    values = [rng.expovariate(1.0) for _ in range(n)]
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)), rel=1e-12, abs=1e-12)


def test_summarize_scales_and_matches_numpy():
    values = [0.010, 0.020, 0.015, 0.500, 0.030]
    s = summarize(values, 1000.0)
    ms = np.array(values) * 1000
    assert s["count"] == 5
    assert s["mean"] == pytest.approx(ms.mean())
    assert s["median"] == pytest.approx(np.median(ms))
    assert s["p90"] == pytest.approx(np.percentile(ms, 90))
    assert s["p99"] == pytest.approx(np.percentile(ms, 99))
    assert s["max"] == pytest.approx(500.0)


def test_summarize_empty_is_none_not_an_error():
    assert summarize([]) == {"count": 0, "mean": None, "median": None, "p90": None, "p99": None, "max": None}


@pytest.mark.parametrize("text,expected", [("128", (128, 128)), ("100:1024", (100, 1024)), (" 8:16 ", (8, 16))])
def test_parse_range(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["", "a", "0", "16:8", "1:2:3", "4:x", "-1:5"])
def test_parse_range_rejects(text):
    with pytest.raises(ValueError):
        parse_range(text)


def test_random_workload_is_seeded_in_range_and_skips_special_ids():
    a = random_workload(50, (5, 9), (3, 4), vocab_size=40, exclude_ids={0, 1, 2, 39}, seed=7)
    b = random_workload(50, (5, 9), (3, 4), vocab_size=40, exclude_ids={0, 1, 2, 39}, seed=7)
    c = random_workload(50, (5, 9), (3, 4), vocab_size=40, exclude_ids={0, 1, 2, 39}, seed=8)
    assert a == b and a != c
    assert all(5 <= n <= 9 for n in a.input_lens) and set(a.input_lens) == set(range(5, 10))
    assert set(a.output_lens) == {3, 4}
    ids = {t for p in a.prompts for t in p}
    assert ids <= set(range(3, 39))
    with pytest.raises(ValueError):
        random_workload(1, (1, 1), (1, 1), vocab_size=2, exclude_ids={0, 1})


def test_arrival_gaps_are_seeded_poisson():
    assert arrival_gaps(5, math.inf, 0) == [0.0] * 5
    gaps = arrival_gaps(4000, 20.0, 3)
    assert gaps[0] == 0.0 and gaps == arrival_gaps(4000, 20.0, 3)
    assert np.mean(gaps[1:]) == pytest.approx(1 / 20.0, rel=0.1)


def test_markdown_table_layout_and_escaping():
    text = markdown("Title", [Section("Results", ["Metric", "Value"], [["a|b", 1.23456], ["none", None],
                                                                          ["flag", True], ["rate", math.inf]])],
                    notes=["a note"])
    lines = text.splitlines()
    assert lines[0] == "# Title" and "a note" in lines
    assert "## Results" in lines
    i = lines.index("| Metric | Value |")
    assert lines[i + 1] == "|---|---|"  # text in the column: left-aligned
    assert lines[i + 2] == "| a\\|b | 1.23 |"
    assert lines[i + 3] == "| none | - |"
    assert lines[i + 4] == "| flag | on |"
    assert lines[i + 5] == "| rate | inf |"


def test_write_result_json_and_md(tmp_path):
    data = {"benchmark": "x", "results": {"rate": math.inf, "v": 1.5, "path": tmp_path}}
    sections = [Section("Results", ["Metric", "Value"], [["v", 1.5]])]
    now = datetime(2025, 1, 2, 3, 4, 5)
    j, m = write_result(tmp_path / "out", "serve", data, "T", sections, now=now)
    assert j.name == "serve-20250102-030405.json" and m.name == "serve-20250102-030405.md"
    loaded = json.loads(j.read_text())
    assert loaded["results"] == {"rate": "inf", "v": 1.5, "path": str(tmp_path)}
    assert "| v | 1.50 |" in m.read_text() and "|---|---:|" in m.read_text()  # numbers: right-aligned
    # A second run in the same second gets its own files.
    j2, m2 = write_result(tmp_path / "out", "serve", data, "T", sections, now=now)
    assert j2 != j and m2 != m and j.exists() and j2.exists()


def test_environment_describes_the_machine():
    env = environment("cpu")
    assert env["cpu_count"] >= 1 and env["torch"] and env["device"] == "cpu" and env["device_name"]
    json.dumps(env)


# --- SSE ----------------------------------------------------------------------------------------

# As a server sends it: a comment, \r\n line ends, an event with two data lines, an id field.
CAPTURED = (b": keep-alive\r\n\r\n"
            b'data: {"choices":[{"text":"Hel"}]}\r\n\r\n'
            b'data: {"choices":[{"text":"lo \xc3\xa9"}]}\n\n'
            b"id: 7\ndata: line one\ndata:line two\n\n"
            b'data: {"choices":[],"usage":{"completion_tokens":3}}\r\r'
            b"data: [DONE]\n\n")
EXPECTED = ['{"choices":[{"text":"Hel"}]}', '{"choices":[{"text":"lo \u00e9"}]}', "line one\nline two",
            '{"choices":[],"usage":{"completion_tokens":3}}', "[DONE]"]


def test_sse_parser_whole_stream():
    p = SSEParser()
    assert p.feed(CAPTURED) + p.close() == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_sse_parser_any_split(size):
    """Reads can split anywhere: inside a \\r\\n, inside a UTF-8 character, inside 'data:'."""
    p = SSEParser()
    events = []
    for i in range(0, len(CAPTURED), size):
        events += p.feed(CAPTURED[i:i + size])
    assert events + p.close() == EXPECTED


def test_sse_parser_last_event_without_blank_line():
    p = SSEParser()
    assert p.feed(b"data: a\n\ndata: [DONE]") == ["a"]
    assert p.close() == ["[DONE]"]


def test_stdlib_workload_cuts_real_source_windows():
    from vibee.bench.report import stdlib_workload

    def tokenize(text):  # one "token" per character: windows are easy to check against the files
        return [ord(c) for c in text]

    a = stdlib_workload(tokenize, 6, (20, 40), (5, 9), seed=3)
    assert a == stdlib_workload(tokenize, 6, (20, 40), (5, 9), seed=3)  # seeded
    assert a != stdlib_workload(tokenize, 6, (20, 40), (5, 9), seed=4)
    assert len(a.prompts) == 6 and all(20 <= len(p) <= 40 for p in a.prompts)
    assert all(5 <= n <= 9 for n in a.output_lens)
    import sysconfig
    from pathlib import Path

    sources = [p.read_text(encoding="utf-8", errors="replace") for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py")]
    for prompt in a.prompts:
        window = "".join(map(chr, prompt))
        assert any(window in text for text in sources)


def test_a_repeated_pass_changes_each_prompt_first_token_only():
    from vibee.bench.report import first_tokens_varied

    workload = random_workload(20, (1, 6), (2, 9), 12, {0, 5}, seed=3)
    assert first_tokens_varied(workload, 0, 12, {0, 5}) is workload
    starts = [[p[0] for p in workload.prompts]]
    for i in (1, 2, 9):
        varied = first_tokens_varied(workload, i, 12, {0, 5})
        assert varied.output_lens == workload.output_lens and varied.input_lens == workload.input_lens
        assert [p[1:] for p in varied.prompts] == [p[1:] for p in workload.prompts]
        assert all(p[0] not in (0, 5) for p in varied.prompts)
        starts.append([p[0] for p in varied.prompts])
    # no prompt starts in one pass as it did in another: the prefix cache can reuse nothing
    assert all(len({s[j] for s in starts}) == len(starts) for j in range(20))
    with pytest.raises(ValueError, match="10 passes"):
        first_tokens_varied(workload, 9, 10, {0, 5})
