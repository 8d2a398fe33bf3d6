"""The surface parser on whole documents: older, descriptive specs, and spec files read from disk
(encodings, line endings, unreadable files)."""

from __future__ import annotations

import pytest

from spec_parsing import data, key_span, parse, where
from vibee.frontend.errors import SpecError
from vibee.frontend.parser import parse_file


# ---------------------------------------------------------------------------------------------
# Older, descriptive specs


KV_CACHE_OLD_STYLE = """\
name: igla_kv_cache
version: "1.0.0"
language: zig
module: igla_kv_cache

types:
  KVCache:
    fields:
      keys: List<Float>
      max_seq_len: Int

behaviors:
  - name: cache_lookup
    given: Layer, position, and KV
    when: Attention computed
    then: Return cached KV or compute new

test_cases:
  - name: test_kv_memory
    input: { layers: 32, heads: 32, dim: 128 }
    expected: { memory_gb: 2.0 }
  - name: speedup
    input: { seq_len: 2048 }
    expected: { speedup_range: [2.0, 4.0] }

creation_pattern:
  source: AttentionLayer
  transformer: KVCacheWrapper
"""


def test_older_style_kv_cache_spec():
    doc = parse(KV_CACHE_OLD_STYLE)
    assert doc.to_python() == {
        "name": "igla_kv_cache",
        "version": "1.0.0",
        "language": "zig",
        "module": "igla_kv_cache",
        "types": {"KVCache": {"fields": {"keys": "List<Float>", "max_seq_len": "Int"}}},
        "behaviors": [{"name": "cache_lookup", "given": "Layer, position, and KV", "when": "Attention computed",
                       "then": "Return cached KV or compute new"}],
        "test_cases": [
            {"name": "test_kv_memory", "input": {"layers": 32, "heads": 32, "dim": 128}, "expected": {"memory_gb": 2.0}},
            {"name": "speedup", "input": {"seq_len": 2048}, "expected": {"speedup_range": [2.0, 4.0]}},
        ],
        "creation_pattern": {"source": "AttentionLayer", "transformer": "KVCacheWrapper"},
    }
    assert doc.get("version").quoted
    behavior = doc.get("behaviors").items[0]
    assert key_span(behavior, "given") == (14, 5, 14, 10)
    assert where(behavior.get("given")) == (14, 12, 14, 35)


QUANT_OLD_STYLE = """\
# Weight-only quantization, described the old way.
name: igla_quantization
version: "0.3.1"
language: zig
module: igla_quantization
description: >
  Groups of weights share one scale,
  stored next to the packed values.

types:
  QuantStats:
    description: What a quantized layer reports
    fields:
      bits: Int
      group_size: Int
      max_error: Float
      per_channel: Bool
      scales: Option<List<Float>>
      layout: Map<String, Int>

behaviors:
  - name: quantize
    given: A weight matrix W (out x in) and bits = 4
    when: quantize(W, group_size=128) is called
    then: |
      Every group of 128 values shares a scale s = max|w| / (2^(bits-1) - 1);
      values are rounded to the nearest step.
  - name: dequantize
    given: Packed weights and their scales
    when: dequantize runs
    then: W' = q * s, with |W - W'| <= s / 2

test_cases:
  - name: int4_roundtrip
    input: { bits: 4, group_size: 128, shape: [256, 512] }
    expected: { max_abs_err: 0.07, dtype: "int8" }
  - name: int8_exact_zero
    input: { bits: 8, values: [0.0, -0.0, 1e-3] }
    expected: { zeros_preserved: true }
"""


def test_older_style_quantization_spec_with_comments_and_block_scalars():
    doc = data(QUANT_OLD_STYLE)
    assert doc["description"] == "Groups of weights share one scale, stored next to the packed values.\n"
    assert doc["types"]["QuantStats"]["fields"] == {
        "bits": "Int", "group_size": "Int", "max_error": "Float", "per_channel": "Bool",
        "scales": "Option<List<Float>>", "layout": "Map<String, Int>",
    }
    assert doc["behaviors"][0]["then"] == (
        "Every group of 128 values shares a scale s = max|w| / (2^(bits-1) - 1);\nvalues are rounded to the nearest step.\n"
    )
    assert doc["behaviors"][1] == {"name": "dequantize", "given": "Packed weights and their scales",
                                   "when": "dequantize runs", "then": "W' = q * s, with |W - W'| <= s / 2"}
    assert doc["test_cases"][1]["input"] == {"bits": 8, "values": [0.0, -0.0, 1e-3]}
    assert doc["test_cases"][0]["expected"] == {"max_abs_err": 0.07, "dtype": "int8"}


SCHEDULER_OLD_STYLE = """\
name: igla_continuous_batch
version: 1.0.0
language: zig
module: igla_continuous_batch
types:
  Request:
    fields:
      id: Int
      prompt_len: Int
  Batch:
    fields:
      requests: List<Request>
behaviors:
- name: admit
  given: A queue of requests, and free KV blocks
  when: The scheduler ticks
  then: Admit requests (FIFO) while blocks remain
- name: preempt
  given: No free blocks
  when: A running sequence needs one more block
  then: Preempt the newest sequence; re-queue it at the front
test_cases:
- name: fifo
  input:
    arrivals: [0, 1, 2]
    blocks: 8
  expected:
    order: [0, 1, 2]
"""


def test_older_style_spec_with_sequences_at_key_indentation():
    doc = data(SCHEDULER_OLD_STYLE)
    assert doc["version"] == "1.0.0"
    assert [b["name"] for b in doc["behaviors"]] == ["admit", "preempt"]
    assert doc["behaviors"][1]["then"] == "Preempt the newest sequence; re-queue it at the front"
    assert doc["test_cases"] == [{"name": "fifo", "input": {"arrivals": [0, 1, 2], "blocks": 8},
                                  "expected": {"order": [0, 1, 2]}}]
    assert doc["types"]["Batch"] == {"fields": {"requests": "List<Request>"}}


# ---------------------------------------------------------------------------------------------
# Files


def test_parse_file_reads_utf8_with_bom_and_crlf(tmp_path):
    path = tmp_path / "s.vibee"
    path.write_bytes("\ufeffname: caf\u00e9\r\nlist:\r\n  - 1\r\n".encode("utf-8"))
    doc = parse_file(path)
    assert doc.to_python() == {"name": "caf\u00e9", "list": [1]}
    assert doc.key_node("name").span.path == str(path)


def test_parse_file_reports_invalid_utf8_at_the_first_bad_byte(tmp_path):
    path = tmp_path / "bad.vibee"
    path.write_bytes("name: ok\r\nvalue: caf\u00e9 ".encode("utf-8") + b"\xff\xfe\n")
    with pytest.raises(SpecError) as info:
        parse_file(path)
    (diag,) = info.value.diagnostics
    assert (diag.span.line, diag.span.col) == (2, 13)  # columns count characters, not bytes
    assert diag.message == "file is not valid UTF-8: byte 0xff (invalid start byte)"
    lines = info.value.render().splitlines()
    assert lines[0].startswith(f"{path}:2:13: error:")
    assert lines[2].index("^") - lines[1].index("v") == 12


def test_parse_file_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        parse_file(tmp_path / "absent.vibee")
