"""Documents as one packed stream of token ids, and that stream cut into windows of a fixed length."""

from __future__ import annotations

import math

import torch


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents packed into one stream, each preceded by <|endoftext|> (id 0)."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(0)
        ids.extend(encoding.ids)
    ids.append(0)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping [n, seq_len + 1] windows (inputs and shifted targets) covering the stream;
    the last, shorter window is padded with -1 targets that the loss ignores."""
    n = math.ceil((len(stream) - 1) / seq_len)
    out = torch.full((n, seq_len + 1), -1, dtype=torch.long)
    for i in range(n):
        piece = stream[i * seq_len: i * seq_len + seq_len + 1]
        out[i, : len(piece)] = piece
    return out
