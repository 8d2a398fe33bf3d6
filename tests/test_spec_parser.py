"""The surface parser of .vibee specs: every syntax feature with exact values and spans, the
older descriptive style, and the errors users meet (message, position, rendering)."""

from __future__ import annotations

import math

import pytest

from vibee.frontend import builder
from vibee.frontend.document import Mapping, Sequence, Span
from vibee.frontend.errors import SpecError
from vibee.frontend.parser import parse_document, parse_file

PATH = "t.vibee"


def parse(text: str) -> Mapping:
    return parse_document(text, PATH)


def data(text: str):
    return parse(text).to_python()


def errors(text: str) -> list:
    with pytest.raises(SpecError) as info:
        parse(text)
    assert info.value.diagnostics, "a SpecError must carry diagnostics"
    return info.value.diagnostics


def only_error(text: str):
    found = errors(text)
    assert len(found) == 1, [d.render() for d in found]
    return found[0]


def where(node_or_span) -> tuple[int, int, int, int]:
    span = node_or_span if isinstance(node_or_span, Span) else node_or_span.span
    return span.line, span.col, span.end_line, span.end_col


def key_span(mapping: Mapping, key: str) -> tuple[int, int, int, int]:
    return where(mapping.key_node(key))


# ---------------------------------------------------------------------------------------------
# Block mappings


def test_block_mapping_values_and_spans_of_keys_and_values():
    doc = parse("name: igla_kv_cache\nblock_size: 16\n")
    assert doc.to_python() == {"name": "igla_kv_cache", "block_size": 16}
    assert key_span(doc, "name") == (1, 1, 1, 5)
    assert where(doc.get("name")) == (1, 7, 1, 20)
    assert key_span(doc, "block_size") == (2, 1, 2, 11)
    assert where(doc.get("block_size")) == (2, 13, 2, 15)
    assert where(doc) == (1, 1, 2, 15)
    assert all(k.span.path == PATH for k, _ in doc)


def test_nested_block_mapping_and_its_span():
    doc = parse("config:\n  prefill:\n    block_m: 128\n  dtype: bf16\nnext: 1\n")
    assert doc.to_python() == {"config": {"prefill": {"block_m": 128}, "dtype": "bf16"}, "next": 1}
    config = doc.get("config")
    assert isinstance(config, Mapping)
    assert where(config) == (2, 3, 4, 14)
    assert key_span(config.get("prefill"), "block_m") == (3, 5, 3, 12)
    assert where(config.get("prefill").get("block_m")) == (3, 14, 3, 17)


def test_empty_value_is_null_positioned_after_the_colon():
    doc = parse("a:\nb: 1\nc:")
    assert doc.to_python() == {"a": None, "b": 1, "c": None}
    assert where(doc.get("a")) == (1, 3, 1, 3)
    assert where(doc.get("c")) == (3, 3, 3, 3)


def test_keys_identifiers_quoted_and_space_before_colon():
    doc = parse("block_size: 1\nLayer-1: 2\nhead_dims: 3\nv1.2: 4\n'my key': 5\n\"tab\\tkey\": 6\nspaced : 7\n")
    assert doc.keys() == ["block_size", "Layer-1", "head_dims", "v1.2", "my key", "tab\tkey", "spaced"]
    assert doc.key_node("my key").quoted and not doc.key_node("Layer-1").quoted
    assert key_span(doc, "my key") == (5, 1, 5, 9)
    assert where(doc.get("spaced")) == (7, 10, 7, 11)


def test_keys_stay_strings_even_when_they_look_like_numbers_or_booleans():
    doc = parse("1: a\ntrue: b\n")
    assert [k.value for k, _ in doc] == ["1", "true"]


def test_document_may_be_indented_as_a_whole():
    assert data("   a: 1\n   b:\n     c: 2\n") == {"a": 1, "b": {"c": 2}}


def test_empty_and_comment_only_documents_are_empty_mappings():
    assert data("") == {}
    assert data("# nothing here\n\n   # still nothing\n") == {}


# ---------------------------------------------------------------------------------------------
# Block sequences


def test_indented_block_sequence_with_spans():
    doc = parse("head_dims:\n  - 64\n  - 128\n")
    seq = doc.get("head_dims")
    assert isinstance(seq, Sequence)
    assert seq.to_python() == [64, 128]
    assert where(seq) == (2, 3, 3, 8)
    assert where(seq.items[1]) == (3, 5, 3, 8)


def test_sequence_at_the_same_indentation_as_its_key():
    doc = parse("a:\n- x\n- y\nb: 2\nc:\n  d:\n  - 1\n  e: 3\n")
    assert doc.to_python() == {"a": ["x", "y"], "b": 2, "c": {"d": [1], "e": 3}}
    assert where(doc.get("a")) == (2, 1, 3, 4)


def test_mapping_items_with_keys_aligned_under_the_first_key():
    text = (
        "behaviors:\n"
        "  - name: alloc\n"
        "    params:\n"
        "      size: 4\n"
        "    then: ok\n"
        "  - name: free\n"
    )
    doc = parse(text)
    assert doc.to_python() == {"behaviors": [{"name": "alloc", "params": {"size": 4}, "then": "ok"}, {"name": "free"}]}
    first = doc.get("behaviors").items[0]
    assert where(first) == (2, 5, 5, 13)
    assert key_span(first, "then") == (5, 5, 5, 9)
    assert where(doc.get("behaviors")) == (2, 3, 6, 15)


def test_nested_and_empty_sequence_items():
    text = "a:\n  - - 1\n    - 2\n  -\n  - \n    - 3\n  - []\n  -\n    k: v\n"
    assert data(text) == {"a": [[1, 2], None, [3], [], {"k": "v"}]}
    items = parse(text).get("a").items
    assert where(items[1]) == (4, 4, 4, 4)


def test_compact_mapping_whose_key_holds_a_sequence_at_the_same_indentation():
    assert data("k:\n- a:\n  - x\n  b: 1\n- c\n") == {"k": [{"a": ["x"], "b": 1}, "c"]}


def test_blank_lines_inside_blocks_and_between_items():
    text = "a:\n\n  b: 1\n   \n\n  c:\n\n    - 1\n\n    - 2\n\n\nd: 4\n\n"
    assert data(text) == {"a": {"b": 1, "c": [1, 2]}, "d": 4}


# ---------------------------------------------------------------------------------------------
# Flow collections


def test_flow_mapping_and_sequence_values_and_spans():
    doc = parse('input: { layers: 32, ratio: 2.0, name: "x", dims: [1, 2.0, "x"] }\n')
    flow = doc.get("input")
    assert flow.to_python() == {"layers": 32, "ratio": 2.0, "name": "x", "dims": [1, 2.0, "x"]}
    assert where(flow) == (1, 8, 1, 66)
    assert key_span(flow, "ratio") == (1, 22, 1, 27)
    dims = flow.get("dims")
    assert where(dims) == (1, 51, 1, 64)
    assert where(dims.items[2]) == (1, 60, 1, 63)
    assert dims.items[2].quoted


def test_flow_nesting_trailing_commas_and_empties():
    assert data("a: {b: [1, {c: [], d: {}}, [2, [3]]], e: {f: {g: h}},}\n") == {
        "a": {"b": [1, {"c": [], "d": {}}, [2, [3]]], "e": {"f": {"g": "h"}}}
    }
    assert data("a: [1, 2,]\nb: []\nc: {}\n") == {"a": [1, 2], "b": [], "c": {}}


def test_flow_collections_may_span_lines_with_comments():
    text = "autotune:\n  - { block_m: 128,   # big\n      block_n: 64 }\n  - [1,\n# odd\n 2\n   ]\nnext: 1\n"
    assert data(text) == {"autotune": [{"block_m": 128, "block_n": 64}, [1, 2]], "next": 1}


def test_flow_plain_scalars_stop_at_flow_indicators_but_keep_spaces_and_inner_colons():
    assert data("x: [a b, c:d, http://x.y/z, (1 + 2) * 3]\ny: {k: v w, t: 12:30, e: }\n") == {
        "x": ["a b", "c:d", "http://x.y/z", "(1 + 2) * 3"],
        "y": {"k": "v w", "t": "12:30", "e": None},
    }


def test_sequence_of_flow_mappings_from_the_example_spec():
    text = (
        "autotune:\n"
        "  - { block_m: 128, block_n: 64, num_warps: 8, num_stages: 3 }\n"
        "  - { block_m: 64, block_n: 64, num_warps: 4, num_stages: 4 }\n"
    )
    assert data(text)["autotune"][1] == {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 4}


# ---------------------------------------------------------------------------------------------
# Scalars


def test_plain_scalars_keep_spaces_commas_colons_parentheses_and_operators():
    text = (
        "given: Layer, position, and KV\n"
        "then: output equals softmax(QK^T * scale + mask) V for every sequence\n"
        "url: http://example.com/a:b\n"
        "ratio: 3/4 of C#\n"
        "note: a: b\n"  # a colon-space inside a value is kept: nothing else can follow 'key: '
        "path: x [y] {z}\n"
        "neg: - not an item\n"
    )
    doc = parse(text)
    assert doc.to_python() == {
        "given": "Layer, position, and KV",
        "then": "output equals softmax(QK^T * scale + mask) V for every sequence",
        "url": "http://example.com/a:b",
        "ratio": "3/4 of C#",
        "note": "a: b",
        "path": "x [y] {z}",
        "neg": "- not an item",
    }
    assert where(doc.get("then")) == (2, 7, 2, 70)
    assert where(doc.get("given")) == (1, 8, 1, 31)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("42", 42), ("-7", -7), ("+3", 3), ("0x1F", 31), ("0o17", 15),
        ("2.0", 2.0), ("-0.5", -0.5), (".5", 0.5), ("1e-3", 1e-3), ("2e-3", 0.002), ("1.5E+2", 150.0), ("3.", 3.0),
        ("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False),
        ("null", None), ("Null", None), ("~", None),
        ("1.0.0", "1.0.0"), ("bf16", "bf16"), ("1_000", "1_000"), ("yes", "yes"), ("-x", "-x"), ("1e", "1e"),
    ],
)
def test_plain_scalar_resolution(text, value):
    scalar = parse(f"v: {text}\n").get("v")
    assert scalar.value == value and type(scalar.value) is type(value)
    assert scalar.quoted is False


def test_infinities_and_nan():
    doc = data("a: .inf\nb: -.inf\nc: .nan\n")
    assert doc["a"] == math.inf and doc["b"] == -math.inf and math.isnan(doc["c"])


def test_quoted_scalars_stay_strings_and_unescape():
    doc = parse("a: \"1\"\nb: 'true'\nc: 'it''s'\nd: \"q\\\"b\\\\s\\nn\\tt\\u00e9\"\ne: ''\nf: \"# not a comment\"\n")
    assert doc.to_python() == {"a": "1", "b": "true", "c": "it's", "d": 'q"b\\s\nn\tt\u00e9', "e": "", "f": "# not a comment"}
    assert all(v.quoted for _, v in doc)
    assert where(doc.get("c")) == (3, 4, 3, 11)


# ---------------------------------------------------------------------------------------------
# Block scalars


def test_literal_block_scalar_keeps_line_breaks_and_inner_indentation():
    text = "description: |\n  Fused attention.\n    indented line\n\n  # not a comment\nnext: 1\n"
    doc = parse(text)
    value = doc.get("description")
    assert value.value == "Fused attention.\n  indented line\n\n# not a comment\n"
    assert value.quoted is True
    assert where(value) == (1, 14, 5, 18)
    assert doc.get("next").value == 1


def test_folded_block_scalar_joins_lines():
    text = "d: >\n  one\n  two\n\n  three\n    kept\n  four\n"
    assert data(text) == {"d": "one two\nthree\n  kept\nfour\n"}


@pytest.mark.parametrize(
    ("header", "value"),
    [("|", "a\n b\n"), ("|-", "a\n b"), ("|+", "a\n b\n\n\n"), (">", "a\n b\n"), (">-", "a\n b"), (">+", "a\n b\n\n\n")],
)
def test_block_scalar_chomping(header, value):
    assert data(f"t: {header}\n  a\n   b\n\n\nnext: 0\n")["t"] == value


def test_block_scalar_ends_at_a_less_indented_line_or_comment():
    text = "a:\n  b: |  # header comment\n    text\n  # comment closes it\n\n  c: 1\nd: >-\n  x\n  y"
    assert data(text) == {"a": {"b": "text\n", "c": 1}, "d": "x y"}


def test_block_scalars_in_sequences_and_compact_mappings():
    text = "items:\n  - |\n    raw\n  - name: a\n    text: >\n      hello\n      world\n    after: 1\n"
    doc = parse(text)
    assert doc.to_python() == {"items": ["raw\n", {"name": "a", "text": "hello world\n", "after": 1}]}
    assert where(doc.get("items").items[1].get("text")) == (5, 11, 7, 12)


def test_empty_block_scalar():
    assert data("a: |\nb: |-\n") == {"a": "", "b": ""}


# ---------------------------------------------------------------------------------------------
# Comments, line endings


def test_comments_everywhere():
    text = (
        "# leading comment\n"
        "name: x  # trailing\n"
        "   # comment at an odd indentation\n"
        "config:   # after a key\n"
        "  # before the first nested key\n"
        "  a: 1\n"
        "# at column one inside a block\n"
        "  b: [1, 2]  # after flow\n"
        "list:\n"
        "  - # after a dash\n"
        "    k: v\n"
        "  - c#not-a-comment\n"
        "# final comment without newline"
    )
    assert data(text) == {"name": "x", "config": {"a": 1, "b": [1, 2]}, "list": [{"k": "v"}, "c#not-a-comment"]}


def test_crlf_line_endings_keep_positions():
    doc = parse("a: 1\r\nb:\r\n  c: two words\r\n  d: |\r\n    x\r\n    y\r\n")
    assert doc.to_python() == {"a": 1, "b": {"c": "two words", "d": "x\ny\n"}}
    assert where(doc.get("b").get("c")) == (3, 6, 3, 15)


def test_missing_final_newline():
    assert data("a: 1\nb:\n  - x") == {"a": 1, "b": ["x"]}
    assert data("a: 'q'") == {"a": "q"}


def test_tabs_as_separators_are_fine():
    assert data("a:\t1\nb: [1,\t2]\n") == {"a": 1, "b": [1, 2]}


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


# ---------------------------------------------------------------------------------------------
# Errors


def test_unexpected_token_names_what_was_found_and_what_was_expected():
    diag = only_error("a: {b: 1} x\n")
    assert diag.message == "unexpected value 'x'; expected end of line"
    assert where(diag.span) == (1, 11, 1, 12)


def test_wrong_closing_bracket_lists_human_names():
    diag = only_error("a: {x: 1, y: 2]\n")
    assert diag.message == "unexpected ']'; expected one of ',' or '}'"
    assert (diag.span.line, diag.span.col) == (1, 15)


def test_unterminated_double_quote_is_reported_at_the_quote():
    diag = only_error('name: x\nversion: "1.0\nlanguage: torch\n')
    assert diag.message == "unterminated double-quoted string"
    assert (diag.span.line, diag.span.col) == (2, 10)


def test_unterminated_quote_where_a_key_is_expected():
    diag = only_error("name: x\n'my key: 1\nnext: 2\n")
    assert diag.message == "unterminated single-quoted string"
    assert (diag.span.line, diag.span.col) == (2, 1)


def test_unterminated_single_quote_in_a_flow_sequence():
    diag = only_error("a: ['x, y]\nb: 1\n")
    assert diag.message == "unterminated single-quoted string"
    assert (diag.span.line, diag.span.col) == (1, 5)


def test_unterminated_flow_mapping_is_reported_at_the_opening_brace():
    diag = only_error("a: 1\ninput: { layers: 32, heads: 32\nexpected: 1\n")
    assert diag.message == "unterminated flow mapping: this '{' is never closed"
    assert (diag.span.line, diag.span.col) == (2, 8)
    assert diag.hint == "expected ',' or '}' before key 'expected' at line 3"


def test_unterminated_flow_sequence_at_end_of_file():
    diag = only_error("a: [1, 2,\n  3")
    assert diag.message == "unterminated flow sequence: this '[' is never closed"
    assert (diag.span.line, diag.span.col) == (1, 4)
    assert "before the end of the file" in diag.hint


def test_bad_dedent_is_reported_at_its_line():
    diag = only_error("types:\n    Stats:\n      a: Int\n  b: 1\nname: x\n")
    assert diag.message == "bad indentation: column 3 matches no enclosing block (expected column 1, 5 or 7)"
    assert (diag.span.line, diag.span.col) == (4, 3)


def test_tab_in_indentation():
    diag = only_error("config:\n\tblock_size: 16\n")
    assert diag.message == "tab character in indentation"
    assert (diag.span.line, diag.span.col) == (2, 1)
    assert only_error("\tname: x\n").message == "tab character in indentation"


def test_value_where_a_key_was_expected():
    diag = only_error("name: x\nconfig:\n  block_size: 16\n  just some words\n")
    assert diag.message == "found value 'just some words' where a key ('name: value') was expected"
    assert diag.hint == "to go on with the value above, indent this line deeper than its key (column 3)"
    assert where(diag.span) == (4, 3, 4, 18)


def test_key_without_space_after_colon_gets_a_hint():
    diag = only_error("name:x\n")
    assert diag.message.startswith("found value 'name:x' where a key")
    assert "followed by ': '" in diag.hint


def test_sequence_item_after_keys_in_one_block_is_reported_once():
    diag = only_error("config:\n  a: 1\n  - b\n  -\n    c: 1\n  - d\nname: x\n")
    assert diag.message.startswith("a '-' sequence item can't follow keys in the same block")
    assert (diag.span.line, diag.span.col) == (3, 3)


def test_key_after_sequence_items_in_one_block_is_reported_once():
    diag = only_error("config:\n  - a\n  b: 1\n  c:\n    d: 2\n  e: 3\nname: x\n")
    assert diag.message == "key 'b' in a sequence: a block holds keys or '-' items, not both"
    assert (diag.span.line, diag.span.col) == (3, 3)


def test_top_level_must_be_a_mapping():
    diag = only_error("- a\n- b\n")
    assert diag.message.startswith("a spec's top level must be a mapping")
    assert (diag.span.line, diag.span.col) == (1, 1)


def test_a_plain_value_goes_on_over_more_indented_lines():
    doc = parse("then: a long sentence\n  that goes on\n    and on\nnext: 1\n")
    assert doc.to_python() == {"then": "a long sentence that goes on and on", "next": 1}
    assert where(doc.get("then")) == (1, 7, 3, 11)


def test_unexpected_indentation_after_a_value():
    diag = only_error("then: a long sentence\n  key: v\nnext: 1\n")
    assert diag.message == "unexpected indentation; expected one of a key or end of file"
    assert (diag.span.line, diag.span.col) == (2, 3)
    assert "'|' or '>'" in diag.hint


def test_duplicate_keys_block_and_flow():
    diag = only_error("name: a\nversion: 1\nname: b\n")
    assert diag.message == "duplicate key 'name' (first defined at line 1)"
    assert where(diag.span) == (3, 1, 3, 5)
    diag = only_error("input: { a: 1, b: 2, a: 3 }\n")
    assert diag.message == "duplicate key 'a' (first defined at line 1)"
    assert (diag.span.line, diag.span.col) == (1, 22)


def test_same_key_in_different_mappings_is_fine():
    assert data("a:\n  x: 1\nb:\n  x: 2\nc: [{x: 1}, {x: 2}]\n")["b"] == {"x": 2}


def test_unknown_escape_in_double_quoted_string():
    diag = only_error('a: "bad \\q escape"\n')
    assert diag.message == "unknown escape sequence '\\q' in double-quoted string"
    assert where(diag.span) == (1, 9, 1, 11)


def test_block_scalar_line_less_indented_than_its_first_line():
    diag = only_error("d: |\n    first\n  second\n")
    assert diag.message.startswith("this line of the block scalar is less indented than its first line")
    assert (diag.span.line, diag.span.col) == (3, 3)


def test_unsupported_block_scalar_header():
    diag = only_error("d: |2\n  text\n")
    assert diag.message == "unsupported block scalar header '|2'"
    assert (diag.span.line, diag.span.col) == (1, 4)


def test_flow_mapping_entry_without_space_after_colon():
    diag = only_error("input: {a:1}\n")
    assert diag.message == "flow mapping entry 'a:1' has no ': '"
    assert (diag.span.line, diag.span.col, diag.span.end_col) == (1, 9, 12)
    assert "space after ':'" in diag.hint


def test_mapping_value_inside_a_flow_value_line():
    diag = only_error('a: "x": 1\n')
    assert diag.message == "unexpected ':'; expected end of line"
    assert (diag.span.line, diag.span.col) == (1, 7)


def test_every_error_in_different_sections_is_reported():
    text = (
        "name: x\n"
        'version: "1.0\n'  # 2: unterminated quote
        "config:\n"
        "  block_size: 16\n"
        "  dtype bf16\n"  # 5: value where a key was expected
        "  policy: lru\n"
        "types:\n"
        "  Stats:\n"
        "    fields:\n"
        "      a: Int\n"
        "     b: Int\n"  # 11: bad dedent
        "behaviors:\n"
        "  - name: alloc\n"
        "    given: [a, b\n"  # 14: unterminated flow sequence
        "  - name: free\n"
        "    then: ok\n"
        "    then: again\n"  # 17: duplicate key
        "test_cases:\n"
        "  - name: t\n"
        "    input: { a: 1, b: }\n"
        "    expected: { c: 1 }}\n"  # 21: stray '}'
        "tail: \"\\z\"\n"  # 22: bad escape after all that
    )
    found = errors(text)
    assert [(d.span.line, d.span.col) for d in found] == [(2, 10), (5, 3), (11, 6), (14, 12), (17, 5), (21, 23), (22, 8)]
    assert "duplicate key 'then'" in found[4].message


def test_recovery_reports_independent_errors_within_one_block():
    text = "config:\n  a: [1 2]]\n  b: 2\n  c: [x}\n  d: 4\n  d: 5\n"
    found = errors(text)
    assert [(d.span.line, d.span.col) for d in found] == [(2, 11), (4, 8), (6, 3)]


def test_rendered_error_shows_the_source_line_and_a_caret():
    with pytest.raises(SpecError) as info:
        parse("name: x\ninput: { a: 1, b: 2 ]\n")
    rendered = info.value.render()
    lines = rendered.splitlines()
    assert lines[0] == "t.vibee:2:21: error: unexpected ']'; expected one of ',' or '}'"
    assert lines[1] == "    2 | input: { a: 1, b: 2 ]"
    assert lines[2].index("^") == lines[1].index("]")
    assert str(info.value) == rendered


def test_rendered_error_with_hint_and_wide_caret():
    with pytest.raises(SpecError) as info:
        parse("a: 1\na: 2\n")
    assert info.value.render().splitlines() == [
        "t.vibee:2:1: error: duplicate key 'a' (first defined at line 1)",
        "    2 | a: 2",
        "      | ^",
        "  help: remove one of them, or rename it",
    ]
    with pytest.raises(SpecError) as info:
        parse("a:\n  x: 1\n  some words here\n")
    assert "      |   ^" in info.value.render()


def test_internal_failures_become_spec_errors(monkeypatch):
    def broken(text):
        raise ValueError("boom")

    monkeypatch.setattr(builder, "resolve_plain", broken)
    with pytest.raises(SpecError) as info:
        parse("a: 1\n")
    assert "internal parser error (ValueError: boom)" in info.value.diagnostics[0].message


def test_a_failed_parse_does_not_leak_into_the_next_one():
    errors("a: [1,\nb: 'x\n")
    assert data("a: 1\nb: [2]\n") == {"a": 1, "b": [2]}
