"""One model's training run: AdamW on random windows of the packed stream, optionally distilled from a teacher."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import logits_of
from .progress import ProgressBar
from .token_stream import windows


@torch.no_grad()
def mean_nll(model, wins: torch.Tensor, device: str, batch: int, amp: bool) -> float:
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        chunk = wins[i: i + batch].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = logits_of(model, chunk[:, :-1])
        targets = chunk[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum").item()
        count += int((targets >= 0).sum())
    return total / count


@dataclass
class TrainSettings:
    steps: int | None  # None: from epochs, capped by the time budget
    epochs: float
    time_budget: float | None
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    distill_weight: float = 0.0  # share of the loss that is cross-entropy against the teacher's distribution


def train(title: str, model, stream: torch.Tensor, valid: torch.Tensor, s: TrainSettings, device: str,
          seed: int, teacher=None) -> dict:
    """AdamW, linear warmup then cosine decay; random windows of the packed stream. Keeps the
    weights with the lowest validation loss. Returns what happened, for the stats file."""
    amp = device.startswith("cuda")
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8, fused=amp,
    )
    tokens_per_step = s.batch_size * s.seq_len
    epoch_steps = max(1, round(s.epochs * len(stream) / tokens_per_step))
    total = s.steps if s.steps is not None else epoch_steps
    # The time budget is checked by timing steps inside the warmup, whose learning rates don't
    # depend on the total: capping the total there gives the same run as `--steps` would.
    calibrate = (min(10, s.warmup // 3), min(40, s.warmup)) if s.time_budget and s.steps is None else None
    valid_wins = windows(valid, s.seq_len)[:64]
    offsets = torch.arange(s.seq_len + 1)
    stream_dev = stream.to(device)

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        progress = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    bar = ProgressBar(title, total)
    curve, best = [], (float("inf"), None, -1)
    eval_every = max(1, total // 12)
    started = time.perf_counter()
    t_cal = None
    eval_seconds = 0.0  # kept out of the calibration's step time
    step = 0
    loss_value = None
    model.train()
    while step < total:
        if calibrate and step == calibrate[0]:
            if amp:
                torch.cuda.synchronize()
            t_cal = time.perf_counter() - eval_seconds
        if calibrate and step == calibrate[1]:
            if amp:
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - eval_seconds - t_cal) / (calibrate[1] - calibrate[0])
            # Evaluations and the slower first steps take a share of the budget too.
            fit = int(s.time_budget * 0.9 / per_step)
            if fit < total:
                bar.log(f"{per_step * 1000:.1f} ms/step: {total} steps would not fit in {s.time_budget:.0f}s, "
                        f"training {fit} ({fit * tokens_per_step / len(stream):.1f} epochs)")
                total = max(fit, s.warmup + 1)
                eval_every = max(1, total // 12)
                bar.set_total(total)
            else:
                bar.log(f"{per_step * 1000:.1f} ms/step; {total} steps take about {per_step * total:.0f}s")
            calibrate = None
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(stream) - s.seq_len - 1, (s.batch_size,), generator=gen)
        batch = stream_dev[(starts[:, None] + offsets).to(device)]
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = logits_of(model, inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
            if teacher is not None and s.distill_weight > 0:
                with torch.no_grad():
                    soft = torch.softmax(logits_of(teacher, inputs), dim=-1)
                kd = -(soft * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
                loss = (1 - s.distill_weight) * loss + s.distill_weight * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == total:
            loss_value = loss.item()
            bar.update(step, loss_value)
        if step % eval_every == 0 or step == total:
            t_eval = time.perf_counter()
            model.eval()
            val = mean_nll(model, valid_wins, device, 16, amp)
            model.train()
            curve.append({"step": step, "train_loss": round(loss.item(), 4), "valid_loss": round(val, 4)})
            bar.log(f"step {step}/{total} train loss {loss.item():.3f} valid loss {val:.3f} "
                    f"(ppl {math.exp(val):.2f}) lr {lr_at(step - 1):.2e}")
            if val < best[0]:
                best = (val, copy.deepcopy(model.state_dict()), step)
            eval_seconds += time.perf_counter() - t_eval
    bar.close()
    seconds = time.perf_counter() - started
    model.load_state_dict(best[1])
    model.eval()
    return {
        "steps": total, "best_step": best[2], "best_valid_loss": round(best[0], 4),
        "epochs": round(total * tokens_per_step / len(stream), 2), "seconds": round(seconds, 1),
        "tokens_seen": total * tokens_per_step, "batch_size": s.batch_size, "seq_len": s.seq_len,
        "lr": s.lr, "warmup": s.warmup, "weight_decay": s.weight_decay, "min_lr_ratio": s.min_lr_ratio,
        "distill_weight": s.distill_weight, "curve": curve,
    }
