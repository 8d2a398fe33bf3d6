"""Lark's own Earley parser as the oracle of the tests of Lark grammars on the device
(test_lark_regex.py, test_lark_nesting.py): every short string over a grammar's characters."""

from __future__ import annotations

import itertools
from collections.abc import Iterator


def strings(alphabet: str, longest: int) -> Iterator[str]:
    """Every string of up to `longest` characters of alphabet, shortest first."""
    for n in range(longest + 1):
        for chars in itertools.product(sorted(set(alphabet)), repeat=n):
            yield "".join(chars)


def parses(parser, text: str):
    """parser.parse(text), or None where Lark refuses the text."""
    import lark

    try:
        return parser.parse(text)
    except lark.exceptions.LarkError:
        return None
