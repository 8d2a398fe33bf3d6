"""What the sliding-window runtime tests share: tiny Mistral and Qwen2 checkpoints whose windows
are shorter than the prompts, a paged runner on any device, dtype and block size, and a spy on
the generated attention that records each call's window."""

from __future__ import annotations

import torch

from .hf_models import generated
from vibee.runtime.attention import make_attention_batch
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model

WINDOW = 8
WINDOW_MODELS = {
    # every layer slides (Mistral's sliding_window)
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    # Qwen2: use_sliding_window, and only the layers from max_window_layers on slide
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1, "layers": 3}),
}
# The layers that slide, per model (the others attend to the whole sequence).
SLIDING_LAYERS = {"mistral": (0, 1), "qwen2": (1, 2)}
PROMPT_LENS = [5, 17, 40, 1, 70]  # longer and shorter than the window, across 16-token blocks


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in PROMPT_LENS]


def our_model(model_dir, dtype=torch.float32, device="cpu"):
    loaded = load_model_dir(model_dir, dtype=dtype, device=device, progress=False)
    return build_model(loaded, generated()).eval()


def hf_logits(hf, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


class PagedRunner:
    """Steps the model the way the engine does, over the generated BlockManager and PagedKVCache
    with blocks of block_size tokens: prefill every prompt in one step, then decode together."""

    def __init__(self, model, block_size: int = 16, num_blocks: int = 64):
        kv, cfg = generated().kv_cache, model.config
        self.model = model
        self.blocks = kv.BlockManager(num_blocks, block_size, True)
        self.cache = kv.PagedKVCache(cfg.num_layers, num_blocks, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype,
                                     device=model.device, block_size=block_size)
        self.lengths: dict[int, int] = {}

    def step(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Computes every token of seqs not computed yet; returns their logits per sequence."""
        ids, q_lens, seq_lens, tables = [], [], [], []
        for i, tokens in enumerate(seqs):
            start = self.lengths.get(i, 0)
            self.blocks.allocate(i, tokens)
            self.lengths[i] = len(tokens)
            ids += tokens[start:]
            q_lens.append(len(tokens) - start)
            seq_lens.append(len(tokens))
            tables.append(self.blocks.block_table(i))
        device = self.model.device
        batch = make_attention_batch(q_lens, seq_lens, tables, self.cache.block_size, device)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids, device=device), batch.positions(), batch, self.cache)
            return [rows.float().cpu() for rows in self.model.compute_logits(hidden).split(q_lens)]


def greedy_with_logits(model, block_size: int = 16, steps: int = 6):
    """Greedy continuations of prompts() and the logits of every computed token, per sequence."""
    seqs = prompts()
    runner = PagedRunner(model, block_size)
    logits = [[] for _ in seqs]
    for _ in range(steps):
        for i, rows in enumerate(runner.step(seqs)):
            logits[i].append(rows)
            seqs[i] = seqs[i] + [int(rows[-1].argmax())]
    return seqs, [torch.cat(rows) for rows in logits]


class AttentionSpy:
    """Stands in for the generated attention module: forwards every call and records the
    function, the window and the variants it was given."""

    def __init__(self, fa):
        self.fa = fa
        self.calls: list[tuple[str, int | None, tuple]] = []

    def __getattr__(self, name):
        target = getattr(self.fa, name)
        if name not in ("paged_prefill", "paged_decode", "varlen_attention"):
            return target

        def recorded(*args, **kwargs):
            self.calls.append((name, kwargs.get("window"), tuple(kwargs.get("variants", ()))))
            return target(*args, **kwargs)

        return recorded
