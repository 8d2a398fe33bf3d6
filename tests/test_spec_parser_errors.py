"""The errors users meet in the surface parser: message, position, hint, rendering, and recovery
that reports every independent error in one pass."""

from __future__ import annotations

import pytest

from spec_parsing import data, errors, only_error, parse, where
from vibee.frontend import builder
from vibee.frontend.errors import SpecError


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
