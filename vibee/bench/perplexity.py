"""`vibee bench perplexity`: held-out perplexity of a model as vibee runs it (the generated
attention, optionally quantized weights), to show what `--quant int8|int4` costs in quality.

The text is the built-in model's held-out standard-library files (listed in its
training_stats.json) as found on this machine, packed like training (each file preceded by
<|endoftext|>), scored in non-overlapping windows, token-weighted.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from vibee.runtime.attention import make_attention_batch


def held_out_texts(model_dir: Path) -> list[str]:
    """The held-out files a model card lists, read from this machine's standard library."""
    stats_path = model_dir / "training_stats.json"
    if not stats_path.exists():
        raise ValueError(f"{stats_path}: missing; pass --text-file to score other text")
    files = json.loads(stats_path.read_text(encoding="utf-8"))["data"]["held_out_files"]
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text(encoding="utf-8", errors="replace") for f in files if (root / f).exists()]
    if not texts:
        raise ValueError(f"none of the held-out files of {stats_path} exist under {root}")
    return texts


def token_stream(tokenizer, texts: list[str], separator: int | None) -> list[int]:
    ids: list[int] = []
    for text in texts:
        if separator is not None:
            ids.append(separator)
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return ids


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int, max_tokens: int | None, device: str, batch_windows: int = 8) -> dict:
    """exp(mean NLL) of next-token prediction over non-overlapping windows of `window` tokens."""
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    windows = [ids[i: i + window + 1] for i in range(0, max(1, len(ids) - 1), window)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_windows):
        chunk = windows[i: i + batch_windows]
        lens = [len(w) - 1 for w in chunk]
        batch = make_attention_batch(lens, lens, None, 16, device)
        inputs = torch.tensor([t for w in chunk for t in w[:-1]], device=device)
        targets = torch.tensor([t for w in chunk for t in w[1:]], device=device)
        hidden = model(inputs, batch.positions(), batch, None)
        logits = model.compute_logits(hidden)
        nll += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return {"tokens": count, "nll": nll / count, "perplexity": math.exp(nll / count)}
