"""The surface parser of .vibee specs: every syntax feature (block and flow collections,
scalars, block scalars, comments, line endings) with exact values and spans."""

from __future__ import annotations

import math

import pytest

from spec_parsing import PATH, data, key_span, parse, where
from vibee.frontend.document import Mapping, Sequence


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
