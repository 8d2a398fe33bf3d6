"""The YAML subset the language claims, beyond the shipped specs: plain keys as YAML allows them
(with '&', spaces, brackets), 'key: value' entries of flow sequences, keys without values in flow
mappings; and a round trip of generated documents that mix block and flow styles."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibee.frontend.document import Mapping, Sequence
from vibee.frontend.errors import SpecError
from vibee.frontend.parser import parse_document

PATH = "y.vibee"


def data(text: str):
    return parse_document(text, PATH).to_python()


def test_keys_hold_ampersands_spaces_and_brackets_like_yaml_plain_scalars():
    doc = parse_document("r&d: 1\nPerformance Targets: fast\nlookup (cached), v2: yes\n", PATH)
    assert doc.to_python() == {"r&d": 1, "Performance Targets": "fast", "lookup (cached), v2": "yes"}
    key = doc.key_node("Performance Targets")
    assert (key.span.line, key.span.col, key.span.end_col) == (2, 1, 20)


def test_keys_with_ampersands_inside_sequence_items_and_flow_mappings():
    text = "teams:\n  - r&d: 3\n    q&a team: 2\n  - {r&d: 4, a&b: [x&y]}\n"
    assert data(text) == {"teams": [{"r&d": 3, "q&a team": 2}, {"r&d": 4, "a&b": ["x&y"]}]}


def test_a_key_starting_with_an_anchor_indicator_is_an_error_with_a_hint():
    with pytest.raises(SpecError) as info:
        parse_document("&anchor: 1\n", PATH)
    (diag,) = info.value.diagnostics
    assert (diag.span.line, diag.span.col) == (1, 1)
    assert "quote a key that starts with" in diag.hint


def test_key_value_entries_of_a_flow_sequence_are_single_pair_mappings():
    doc = parse_document("x: [a: 1, b: [2, 3], plain, 'q': , {c: 4}]\n", PATH)
    items = doc.get("x")
    assert items.to_python() == [{"a": 1}, {"b": [2, 3]}, "plain", {"q": None}, {"c": 4}]
    first = items.items[0]
    assert isinstance(first, Mapping) and isinstance(items, Sequence)
    assert (first.span.line, first.span.col, first.span.end_col) == (1, 5, 9)


def test_flow_mapping_keys_without_values_are_null():
    assert data("set: {a, b, c: 1}\n") == {"set": {"a": None, "b": None, "c": 1}}


def test_duplicate_keys_in_single_pair_mappings_are_independent():
    assert data("x: [a: 1, a: 2]\n") == {"x": [{"a": 1}, {"a": 2}]}


def test_plain_text_goes_on_over_lines_indented_deeper_than_its_key():
    text = "description: A long sentence\n  wrapped by hand\nitems:\n  - first item\n    goes on\n  - k: v\n      w\n"
    assert data(text) == {"description": "A long sentence wrapped by hand",
                          "items": ["first item goes on", {"k": "v w"}]}


def test_a_value_may_start_on_the_indented_line_below_its_key():
    text = "a:\n  {x: 1}\nb:\n  [y: 2]\nc:\n  plain text\n  more\nd:\n  'q'\ne:\n  |\n  kept\nf: 1\n"
    assert data(text) == {"a": {"x": 1}, "b": [{"y": 2}], "c": "plain text more", "d": "q", "e": "kept\n", "f": 1}


def test_a_stray_line_at_the_keys_indentation_is_not_taken_as_a_continuation():
    with pytest.raises(SpecError) as info:
        parse_document("config:\n  block_size: 16\n  just some words\n", PATH)
    (diag,) = info.value.diagnostics
    assert (diag.span.line, diag.span.col, diag.span.end_col) == (3, 3, 18)
    assert "indent this line deeper than its key (column 3)" in diag.hint


def test_a_colon_inside_a_block_value_stays_text():
    assert data("then: Return value: the cached KV\n") == {"then": "Return value: the cached KV"}


# ---------------------------------------------------------------------------------------------
# Round trip: generated values written in mixed block and flow styles parse back to themselves.

_KEY_TEXT = st.text(alphabet=st.sampled_from(list("abcxyz_&() .-/$019")), min_size=1, max_size=10)
KEYS = _KEY_TEXT.filter(lambda k: k.strip() == k)
TEXT = st.text(alphabet=st.sampled_from(list("abc xyz&:,#'\"[]{}()-.019\\")), max_size=14)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=3)), max_leaves=12)

# Plain spellings that read back as the same string (everything else is double-quoted).
_BLOCK_KEY = re.compile(r"[A-Za-z_$0-9(][^:#\n]*[^ :#\n]|[A-Za-z_$(]")
_FLOW_PLAIN = re.compile(r"[A-Za-z_(][^:#,\[\]{}\n'\"]*[^ :#,\[\]{}\n'\"]|[A-Za-z_(]")
_RESOLVES = re.compile(r"(?i)(true|false|null|~|[-+.0-9].*)")


def _scalar(value, plain: re.Pattern, rng: random.Random) -> str:
    if isinstance(value, str):
        if plain.fullmatch(value) and not _RESOLVES.fullmatch(value) and rng.random() < 0.7:
            return value
        return json.dumps(value)
    return json.dumps(value)


def flow(value, rng: random.Random, *, in_sequence: bool = False) -> str:
    if isinstance(value, dict):
        if in_sequence and len(value) == 1 and rng.random() < 0.5:
            (key, item), = value.items()
            return f"{_scalar(key, _FLOW_PLAIN, rng)}: {flow(item, rng)}"
        entries = []
        for key, item in value.items():
            spelled = _scalar(key, _FLOW_PLAIN, rng)
            entries.append(spelled if item is None and rng.random() < 0.3 else f"{spelled}: {flow(item, rng)}")
        return "{" + ", ".join(entries) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(item, rng, in_sequence=True) for item in value) + "]"
    return _scalar(value, _FLOW_PLAIN, rng)


def block(mapping: dict, rng: random.Random, indent: int = 0) -> list[str]:
    pad, lines = " " * indent, []
    for key, value in mapping.items():
        head = f"{pad}{_scalar(key, _BLOCK_KEY, rng)}:"
        if isinstance(value, dict) and value and rng.random() < 0.6:
            lines += [head, *block(value, rng, indent + 2)]
        elif isinstance(value, list) and value and rng.random() < 0.6:
            lines.append(head)
            for item in value:
                if isinstance(item, dict) and item:
                    nested = block(item, rng, indent + 4)
                    lines += [f"{pad}  - {nested[0].lstrip()}", *nested[1:]]
                else:
                    lines.append(f"{pad}  - {flow(item, rng)}")
        else:
            lines.append(f"{head} {flow(value, rng)}")
    return lines


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=5), st.integers(0, 2**32 - 1))
def test_mixed_block_and_flow_documents_parse_back_to_their_values(document, seed):
    text = "\n".join(block(document, random.Random(seed))) + "\n"
    assert data(text) == document, text


# ---------------------------------------------------------------------------------------------
# Older specs: values YAML rejects but whose meaning is plain text.


def test_a_quoted_or_bracketed_start_followed_by_text_is_one_plain_value():
    doc = data('name: "ВЕКОВОЙ ДУБ" (OAK)\nslice: []u32\ngrid: [3][3]f64\nheads: [Q, K, V] x 3\n'
               "it: 'it''s' ok\nlist: [1, 2]  # a comment\nquoted: 'a'\n")
    assert doc == {"name": '"ВЕКОВОЙ ДУБ" (OAK)', "slice": "[]u32", "grid": "[3][3]f64",
                   "heads": "[Q, K, V] x 3", "it": "'it''s' ok", "list": [1, 2], "quoted": "a"}


def test_a_quoted_value_followed_by_a_colon_is_still_an_error():
    with pytest.raises(SpecError, match="unexpected ':'; expected end of line"):
        data('a: "x": 1\n')


def test_triple_quoted_text_spans_lines_verbatim():
    text = 'code: """\nconst x = 1;\n  indented: "q"\n"""\nafter: 2\n'
    doc = parse_document(text, PATH)
    assert doc.to_python() == {"code": 'const x = 1;\n  indented: "q"\n', "after": 2}
    span = doc.get("code").span
    assert (span.line, span.col, span.end_line, span.end_col) == (1, 7, 4, 4)
