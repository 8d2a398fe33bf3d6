"""Specs in the older, descriptive style, as the seeded generator in
vibee/frontend/descriptive_corpus.py writes them (banners, header, types as mappings or lists,
given/when/then in every quoting style, flow test cases, '|' / '>' / '\"\"\"' text, keys like
'D&C', '[]u32' types, CRLF files), parse to the values they were written from."""

from __future__ import annotations

import random
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibee.frontend.descriptive_corpus import descriptive_corpus, descriptive_spec
from vibee.frontend.parser import parse_document


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_generated_descriptive_specs_parse_to_what_they_were_written_from(seed):
    text, expected = descriptive_spec(random.Random(seed))
    assert parse_document(text, "descriptive.vibee").to_python() == expected, text


def test_the_generator_covers_the_constructs_of_hand_written_specs():
    texts = "\n".join(text for text, _ in descriptive_corpus(60, seed=3))
    for construct in ("═══", "types:\n  - name:", "    fields:\n      - name:", "{ fields: {", "Given:",
                      "then: '", 'when: "', "description: |", "description: >", "D&C:", ": []u32",
                      'ⲍⲓⲅ_ⲟⲩⲧⲡⲩⲧ: """', "\r\n", "input: {", "  # "):
        assert construct in texts, construct
    assert re.search(r"^description: \w[^\n]*\n  [^\s#-][^:\n]*$", texts, re.M), "a description wrapped over lines"
