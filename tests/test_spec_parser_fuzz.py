"""Property tests of the spec parser: any text gives a Mapping or a SpecError (never another
exception), and documents written by a small block-style emitter parse back to what was emitted."""

from __future__ import annotations

import random
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibee.frontend.document import Mapping
from vibee.frontend.errors import SpecError
from vibee.frontend.parser import parse_document

PATH = "fuzz.vibee"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parses_or_reports(text: str) -> None:
    """The property: a Mapping, or a SpecError whose diagnostics point inside the text."""
    try:
        doc = parse_document(text, PATH)
    except SpecError as exc:
        assert exc.diagnostics
        nlines = max(1, text.count("\n") + 1 + text.count("\r"))
        for diag in exc.diagnostics:
            assert not diag.message.startswith("internal parser error"), diag.render()
            assert diag.span is not None and 1 <= diag.span.line <= nlines, diag.render()
            assert diag.span.col >= 1
        exc.render()
        return
    assert isinstance(doc, Mapping)
    doc.to_python()


# ---------------------------------------------------------------------------------------------
# (a) random text over a YAML-ish alphabet

ALPHABET = list(":-{}[],#'\"|>\n \t\\") + list("ab_xz019.") + ["  ", "\n  ", "- ", ": ", "\r\n"]


@FUZZ
@given(st.lists(st.sampled_from(ALPHABET), max_size=80).map("".join))
def test_random_text_gives_a_mapping_or_a_spec_error(text):
    parses_or_reports(text)


# ---------------------------------------------------------------------------------------------
# (b) mutations of a realistic spec

REALISTIC = """\
# A realistic spec to mutate.
name: igla_kv_cache
version: "1.0.0"
language: torch
module: igla_kv_cache
description: |
  Paged KV cache: fixed-size blocks,
  a free list and copy-on-write prefixes.

config:
  block_size: 16          # tokens per block
  num_blocks: 256
  dtypes: [bf16, fp16]
  eviction: lru

types:
  MemoryStats:
    description: 'what the cache reports'
    fields:
      num_blocks: Int
      used: List<Int>

behaviors:
  - name: allocate
    given: A sequence of n tokens, and free blocks
    when: allocate(seq_id, n) is called
    then: ceil(n / block_size) blocks are taken from the free list
    test_cases:
      - name: seventeen_tokens
        input: { tokens: 17, block_size: 16 }
        expected: { blocks: 2 }
  - name: free
    then: >
      blocks go back
      to the free list

test_cases:
- name: many
  input: { tokens: [1, 16, 17,
                    4097] }
  expected: { blocks: [1, 1, 2, 257] }
"""

MUTATION_CHARS = list(":-{}[],#'\"|>\n \t")


@st.composite
def mutated_spec(draw) -> str:
    text = REALISTIC
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        op = draw(st.sampled_from(["delete_char", "insert_char", "duplicate_char", "delete_line",
                                   "duplicate_line", "swap_lines"]))
        if op.endswith("char") and text:
            at = draw(st.integers(0, len(text) - 1))
            if op == "delete_char":
                text = text[:at] + text[at + 1:]
            elif op == "insert_char":
                text = text[:at] + draw(st.sampled_from(MUTATION_CHARS)) + text[at:]
            else:
                text = text[:at] + text[at] + text[at:]
        else:
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            if op == "delete_line":
                del lines[a]
            elif op == "duplicate_line":
                lines.insert(a, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
    return text


def test_the_realistic_spec_itself_parses():
    doc = parse_document(REALISTIC, PATH).to_python()
    assert doc["test_cases"][0]["input"] == {"tokens": [1, 16, 17, 4097]}
    assert doc["behaviors"][1]["then"] == "blocks go back to the free list\n"


@FUZZ
@given(mutated_spec())
def test_mutated_specs_give_a_mapping_or_a_spec_error(text):
    parses_or_reports(text)


# ---------------------------------------------------------------------------------------------
# (c) round trip through a small block-style emitter

KEYS = st.from_regex(r"[a-z_][a-z0-9_-]{0,7}", fullmatch=True)
TEXT = st.text(alphabet=st.sampled_from(list("abcxyz XYZ019_-.,:;#'\"\\()[]{}*/^<>|!?@&%\t\n")), max_size=24)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10**12, 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=20,
)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=6)

_SAFE_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_ ,.()*/^<>+=;-]*")
_RESERVED = {"true", "false", "null"}


class Emitter:
    """Renders nested dicts/lists/scalars as block-style spec text, choosing among the equivalent
    spellings (plain / quoted / block scalar, indented / same-level sequences, compact items)
    with a seeded random generator. Lines inside block scalars are marked so that comments and
    blank lines are only inserted elsewhere."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[tuple[str, bool]] = []  # (text, is_inside_a_block_scalar)

    def scalar(self, value) -> list[str]:
        """The spelling of a scalar: one line, or a block scalar header plus its lines."""
        if value is None:
            return [self.rng.choice(["null", "~", "Null"])]
        if isinstance(value, bool):
            return [self.rng.choice(["true", "True"] if value else ["false", "False"])]
        if isinstance(value, (int, float)):
            return [repr(value)]
        lines = value.split("\n")
        if ("\n" in value and len(lines) > 1 and all(line and line[0] not in " \t" and line.strip(" \t") for line in lines)
                and self.rng.random() < 0.7):
            return ["|-"] + lines
        if (_SAFE_PLAIN.fullmatch(value) and not value.endswith(" ") and value.lower() not in _RESERVED
                and self.rng.random() < 0.7):
            return [value]
        if "\n" not in value and "\t" not in value and self.rng.random() < 0.5:
            return ["'" + value.replace("'", "''") + "'"]
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return ['"' + escaped + '"']

    def emit_value(self, prefix: str, value, indent: int, *, item: bool) -> None:
        """Emit `prefix` (e.g. 'key:' or '-') followed by `value`, nested blocks at `indent`."""
        pad = " " * indent
        if isinstance(value, dict) and value:
            if item and self.rng.random() < 0.7:
                self.emit_mapping(value, indent, first_prefix=prefix + " ")
            else:
                self.lines.append((prefix, False))
                self.emit_mapping(value, indent)
        elif isinstance(value, list) and value:
            if item and self.rng.random() < 0.5:
                self.emit_sequence(value, indent, first_prefix=prefix + " ")
            else:
                self.lines.append((prefix, False))
                same_level = not item and self.rng.random() < 0.4
                self.emit_sequence(value, indent - 2 if same_level else indent)
        elif isinstance(value, (dict, list)):
            self.lines.append((f"{prefix} {'{}' if isinstance(value, dict) else '[]'}", False))
        else:
            spelled = self.scalar(value)
            self.lines.append((f"{prefix} {spelled[0]}", False))
            self.lines.extend((pad + line, True) for line in spelled[1:])

    def emit_mapping(self, mapping: dict, indent: int, first_prefix: str = "") -> None:
        for i, (key, value) in enumerate(mapping.items()):
            lead = first_prefix if i == 0 and first_prefix else " " * indent
            self.emit_value(f"{lead}{key}:", value, indent + 2, item=False)

    def emit_sequence(self, items: list, indent: int, first_prefix: str = "") -> None:
        for i, value in enumerate(items):
            lead = first_prefix if i == 0 and first_prefix else " " * indent
            self.emit_value(f"{lead}-", value, indent + 2, item=True)

    def render(self, document: dict) -> str:
        self.emit_mapping(document, 0)
        out: list[str] = []
        for text, in_block in self.lines:
            indent = " " * (len(text) - len(text.lstrip(" ")))
            if not in_block and self.rng.random() < 0.15:
                out.append(self.rng.choice(["", indent + "# a comment", "# at column one", "   "]))
            if not in_block and self.rng.random() < 0.15:
                text += "   # trailing"
            out.append(text)
        return "\n".join(out) + self.rng.choice(["\n", "", "\n\n# end\n"])


@FUZZ
@given(DOCUMENTS, st.integers(0, 2**32 - 1))
def test_emitted_documents_parse_back_to_their_values(document, seed):
    text = Emitter(random.Random(seed)).render(document)
    parsed = parse_document(text, PATH).to_python()
    assert parsed == document, text


@FUZZ
@given(DOCUMENTS, st.integers(0, 2**32 - 1))
def test_emitted_documents_parse_back_with_crlf_line_endings(document, seed):
    text = Emitter(random.Random(seed)).render(document).replace("\n", "\r\n")
    assert parse_document(text, PATH).to_python() == document, text
