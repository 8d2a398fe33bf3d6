"""Medusa heads for a frozen target: its final hidden states, cached once, then k heads trained on them.

The target never changes, so its forward runs once over the training tokens (bf16 autocast, kept
as bf16 hidden states); training the heads then costs only the heads' matmuls and the tied
lm_head's. Head i at stream position p learns the data token at p + 1 + i (the target's own
lm_head predicts p + 1). The heads' module is the generated one (vibee_gen's MedusaHeads), so
what is trained here is what the engine runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .progress import ProgressBar
from .token_stream import windows

HEAD_DECAY = 0.8  # head i's loss weight is HEAD_DECAY**(i - 1): later heads are harder and worth less


@torch.no_grad()
def cache_hidden(target, stream: torch.Tensor, seq_len: int, batch: int, title: str,
                 max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's final hidden state (after its final norm) at stream positions, computed over
    non-overlapping windows of seq_len tokens: ([n, H] bf16, [n] their stream positions). With
    max_tokens, only that many tokens' windows, spread evenly over the stream (it is sorted by path)."""
    wins = windows(stream, seq_len)
    chosen = torch.arange(len(wins))
    if max_tokens is not None and max_tokens < len(wins) * seq_len:
        chosen = torch.linspace(0, len(wins) - 1, max(1, max_tokens // seq_len)).round().long().unique()
    hidden = torch.empty(len(chosen), seq_len, target.config.hidden_size, dtype=torch.bfloat16)
    bar = ProgressBar(title, len(chosen))
    for i in range(0, len(chosen), batch):
        inputs = wins[chosen[i: i + batch], :-1].clamp(min=0)  # the padded tail's ids; its states are dropped
        out = target.model(input_ids=inputs, use_cache=False).last_hidden_state
        hidden[i: i + len(inputs)] = out.to(torch.bfloat16)
        bar.update(min(i + batch, len(chosen)), None)
    bar.close()
    positions = (chosen[:, None] * seq_len + torch.arange(seq_len)).flatten()
    keep = positions < len(stream) - 1  # a position with a next token
    return hidden.flatten(0, 1)[keep], positions[keep]


def head_targets(stream: torch.Tensor, positions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[n, k] long: the data token head i (column i - 1) should guess at each position; -1 past the end."""
    offsets = positions[:, None] + 2 + torch.arange(num_heads)
    return torch.where(offsets < len(stream), stream[offsets.clamp(max=len(stream) - 1)], torch.full_like(offsets, -1))


@dataclass
class HeadSettings:
    num_heads: int
    steps: int | None  # None: from epochs, capped by the time budget
    epochs: float
    batch_size: int  # positions per step
    lr: float
    warmup: int
    time_budget: float | None  # seconds; caps the steps


def train_heads(heads, lm_head_weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                s: HeadSettings, seed: int) -> dict:
    """AdamW on random positions (hidden [N, H] with their head targets [N, k]), warmup then cosine
    decay, loss weighted per head; the target's lm_head stays frozen. Returns what happened, for
    the stats file."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(heads.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    weights = torch.tensor([HEAD_DECAY**i for i in range(s.num_heads)])
    total = s.steps or max(1, round(s.epochs * len(hidden) / s.batch_size))
    bar = ProgressBar("medusa heads", total)
    lm_head = lm_head_weight.to(torch.bfloat16)
    started, step, curve = time.perf_counter(), 0, []
    while step < total:
        progress = (step - s.warmup) / max(1, total - s.warmup)
        lr = s.lr * (step + 1) / s.warmup if step < s.warmup else s.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = torch.randint(0, len(hidden), (s.batch_size,), generator=gen)
        batch_targets = targets[rows]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(heads(hidden[rows].float()), lm_head)
        losses = F.cross_entropy(logits.float().flatten(0, 1), batch_targets.flatten(), ignore_index=-1,
                                 reduction="none").view(-1, s.num_heads)
        valid = batch_targets >= 0
        per_head = (losses * valid).sum(0) / valid.sum(0).clamp(min=1)
        loss = (per_head * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0 or step == total:
            bar.update(step, loss.item())
        if step % max(1, total // 10) == 0 or step == total:
            curve.append({"step": step, "loss": round(loss.item(), 4),
                          "per_head_loss": [round(v, 4) for v in per_head.tolist()]})
            bar.log(f"step {step}/{total} loss {loss.item():.3f} per head "
                    + " ".join(f"{v:.2f}" for v in per_head.tolist()))
        # After 20 steps (inside the warmup, whose learning rates don't depend on the total): do
        # the rest fit the budget? Capping there gives the same run as --steps would.
        if step == 20 and s.time_budget and s.steps is None:
            per_step = (time.perf_counter() - started) / step
            fit = int(s.time_budget * 0.95 / per_step)
            if fit < total:
                bar.log(f"{per_step * 1000:.0f} ms/step: training {fit} of {total} steps to fit {s.time_budget:.0f}s")
                total = max(fit, s.warmup + 1)
                bar.set_total(total)
    bar.close()
    return {"steps": total, "epochs": round(total * s.batch_size / len(hidden), 2), "batch_size": s.batch_size,
            "lr": s.lr, "warmup": s.warmup, "head_loss_weights": [round(w, 4) for w in weights.tolist()],
            "seconds": round(time.perf_counter() - started, 1), "curve": curve}


@torch.no_grad()
def head_accuracy(heads, lm_head_weight: torch.Tensor, hidden: torch.Tensor, stream: torch.Tensor) -> dict:
    """Held-out top-1 accuracy, fp32, per head against the data token it guesses, and against the
    target's own greedy token at that position (teacher-forced: what verification compares with
    when the earlier tokens match the text); the target's own next-token accuracy for scale."""
    hidden = hidden.float()  # every position of the stream but the last, in order
    assert len(hidden) == len(stream) - 1
    target_logits = F.linear(hidden, lm_head_weight)
    target_next = target_logits.argmax(-1)  # the target's guess of the token at p + 1
    num_heads = heads.num_heads
    positions = torch.arange(len(hidden))
    targets = head_targets(stream, positions, num_heads)
    readout = lambda x: F.linear(x, lm_head_weight)  # noqa: E731 - the tied lm_head
    guesses = torch.cat([heads.propose(hidden[i: i + 4096], readout, num_heads)
                         for i in range(0, len(hidden), 4096)])
    data, versus_target = [], []
    for i in range(num_heads):
        valid = targets[:, i] >= 0
        data.append(round(float((guesses[:, i] == targets[:, i])[valid].float().mean()), 4))
        shifted = positions + 1 + i  # the target's greedy token at p + 2 + i comes from position p + 1 + i
        ok = shifted < len(hidden)
        versus_target.append(round(float((guesses[ok, i] == target_next[shifted[ok]]).float().mean()), 4))
    # The unigram baseline: always guess the most frequent token of the text.
    unigram = float(torch.bincount(stream).max()) / len(stream)
    return {"positions": len(hidden), "target_next_token_top1": round(float((target_next == stream[1:]).float().mean()), 4),
            "head_top1": data, "head_top1_vs_target_greedy": versus_target, "unigram_top1": round(unigram, 4)}
