"""The logprobs of a prompt's own tokens (vLLM's prompt_logprobs; OpenAI completions' `echo` with
`logprobs`, which lm-evaluation-harness scores continuations with).

One forward over the whole prompt without the paged KV cache, when the request is added: the
request then runs as any other (its prefix-cache hits, chunked prefill and graphs untouched), at
the cost of computing its prompt twice. The logprobs are the model's raw ones (log-softmax of the
logits, no penalties or temperature), as vLLM reports for prompts.
"""

from __future__ import annotations

from typing import Iterator

import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.outputs import TokenLogprob

SCORE_ROWS = 256  # logits rows at a time: a long prompt's whole [tokens, vocab] logits never exist at once


def prompt_logits(model, ids: torch.Tensor, *, block_size: int, device: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, logits) of positions 0 .. len - 2 of one prompt, in chunks: position i's
    logits predict token i + 1. Every tensor-parallel rank runs this alike (compute_logits gathers)."""
    n = len(ids)
    batch = make_attention_batch([n], [n], None, block_size, device)
    with torch.inference_mode():
        hidden = model(ids, batch.positions(), batch, None)
        for start in range(0, n - 1, SCORE_ROWS):
            yield start, model.compute_logits(hidden[start: min(n - 1, start + SCORE_ROWS)])


def score_prompt(chunks: Iterator[tuple[int, torch.Tensor]], ids: torch.Tensor, top: int) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it (None for the first), with the
    `top` likeliest tokens at its position."""
    out: list[TokenLogprob | None] = [None]
    for start, logits in chunks:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = ids[start + 1: start + 1 + len(logits)]
        chosen_t = logprobs.gather(1, targets.unsqueeze(1))
        ranks = ((logprobs > chosen_t).sum(dim=-1) + 1).tolist()
        chosen = chosen_t.squeeze(1).tolist()
        if top:
            values, indices = logprobs.topk(top, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            tops = [[] for _ in chosen]
        out += [TokenLogprob(t, lp, alt, rank) for t, lp, alt, rank in zip(targets.tolist(), chosen, tops, ranks)]
    return out
