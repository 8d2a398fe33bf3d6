"""Token-by-token text for streaming, using only ``tokenizer.decode``.

Decoding each new token alone is wrong for two reasons: byte-level tokens can hold part of a
UTF-8 character (decode gives U+FFFD until the rest arrives), and many decoders depend on the
neighbouring tokens (SentencePiece drops the leading space of the *first* token it decodes, so
decode(a + b) != decode(a) + decode(b)). So, as vLLM does, we decode a short window that starts
a few tokens before the new ones and emit only what the window gained over the text already
accounted for:

- ``_start``: first token of the window (some context: the end of the prompt, then the previous
  emitted chunk);
- ``_seen``: the part of decode(window) already accounted for (context text + emitted text);
- ``_clean``: end of the last chunk whose decode did not end mid-character.

When decode(window) ends with U+FFFD the trailing replacement characters are held back (they may
be a character still arriving) and only the text before them is emitted; characters before a
partial one never change when more bytes arrive. When the window decodes cleanly, everything is
emitted and the window moves up to start at the chunk just emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Tokens of prompt context kept before the first output token (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5
# A window that has not decoded cleanly for this many tokens is not a character still arriving
# (those span at most 4 bytes); give up on context so a garbage stream doesn't cost O(n^2) decodes.
MAX_HELD_TOKENS = 128
REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class IncrementalDetokenizer:
    def __init__(self, tokenizer: _Decoder, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        self._start = max(0, self._num_prompt - PROMPT_CONTEXT_TOKENS)
        self._clean = self._num_prompt
        self._seen = self._decode(self._start, self._clean)
        self._text_parts: list[str] = []

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    @property
    def token_ids(self) -> list[int]:
        """The output token ids added so far."""
        return self._ids[self._num_prompt :]

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it completes (may be "")."""
        self._ids.append(token_id)
        window = self._decode(self._start)
        if window.startswith(self._seen):
            base = len(self._seen)
        else:
            # The decoder rewrote text already emitted (e.g. a clean-up rule); emitted text can't be
            # taken back, so emit from where the two first differ.
            base = _common_prefix_len(window, self._seen)

        held = len(self._ids) - self._clean
        if window.endswith(REPLACEMENT) and held < MAX_HELD_TOKENS:
            stable = window.rstrip(REPLACEMENT)
            delta = stable[base:] if len(stable) > base else ""
            self._seen = window[: base + len(delta)]
        else:
            delta = window[base:]
            if held >= MAX_HELD_TOKENS:
                # Restart without context after a long garbage run.
                self._start = self._clean = len(self._ids)
                self._seen = ""
            else:
                # Move the window: the chunk just finished becomes the context for the next one.
                self._start, self._clean = self._clean, len(self._ids)
                self._seen = self._decode(self._start)
        if delta:
            self._text_parts.append(delta)
        return delta

    def flush(self) -> str:
        """At the end of generation: the held-back tail (replacement characters of an unfinished
        character), so that text == the decode of every output byte. Optional to call."""
        window = self._decode(self._start)
        base = len(self._seen) if window.startswith(self._seen) else _common_prefix_len(window, self._seen)
        delta = window[base:]
        self._seen = window
        if delta:
            self._text_parts.append(delta)
        return delta
