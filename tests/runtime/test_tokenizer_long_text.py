"""The tokenizer's long-text path: the same ids, tokenized without holding the GIL."""

from __future__ import annotations

from vibee.runtime.config import DEFAULT_MODEL_DIR
from vibee.runtime.tokenizer import Tokenizer


def test_long_text_is_encoded_as_short_text_is():
    """Texts past LONG_TEXT go through encode_batch (which lets other threads run): same ids."""
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    text = "def parse(line):\n    return line.split(',')\n" * (tok.LONG_TEXT // 20)
    assert len(text) > tok.LONG_TEXT
    expected = tok._tok.encode(text, add_special_tokens=True).ids
    if tok._prepend_bos:
        expected = [tok.bos_token_id, *expected]
    assert tok.encode(text) == expected
