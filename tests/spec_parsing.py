"""Helpers shared by the spec parser tests: parse text under a fixed path, collect the errors,
and read spans as (line, col, end_line, end_col)."""

from __future__ import annotations

import pytest

from vibee.frontend.document import Mapping, Span
from vibee.frontend.errors import SpecError
from vibee.frontend.parser import parse_document

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
