"""What the card reports, measured on held-out files with the saved weights: perplexity, draft agreement, samples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .models import logits_of
from .token_stream import windows

EVAL_LEN = 512  # window of the reported perplexity


@torch.no_grad()
def evaluate(target, draft, stream: torch.Tensor, seq_len: int, device: str) -> dict:
    """Held-out perplexity of each model (token-weighted over non-overlapping windows, fp32) and the
    share of positions where the draft's greedy next token equals the target's."""
    wins = windows(stream, seq_len)
    nll = {"target": 0.0, "draft": 0.0}
    agree = count = 0
    for i in range(0, len(wins), 8):
        chunk = wins[i: i + 8].to(device)
        inputs, targets = chunk[:, :-1], chunk[:, 1:]
        mask = targets >= 0
        lt, ld = logits_of(target, inputs), logits_of(draft, inputs)
        nll["target"] += F.cross_entropy(lt.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum").item()
        nll["draft"] += F.cross_entropy(ld.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum").item()
        agree += int(((lt.argmax(-1) == ld.argmax(-1)) & mask).sum())
        count += int(mask.sum())
    return {
        "tokens": count,
        "target_perplexity": round(math.exp(nll["target"] / count), 3),
        "draft_perplexity": round(math.exp(nll["draft"] / count), 3),
        "target_nll": round(nll["target"] / count, 4),
        "draft_nll": round(nll["draft"] / count, 4),
        "greedy_agreement": round(agree / count, 4),
    }


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str, n: int, device: str) -> str:
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    for _ in range(n):
        nxt = logits_of(model, ids)[0, -1].argmax()
        if int(nxt) == 0:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
