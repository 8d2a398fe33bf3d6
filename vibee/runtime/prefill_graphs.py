"""CUDA graphs of a whole fresh prompt's prefill, one per length bucket.

A step that prefills one new prompt (the usual step of a new request at batch 1) runs the model
eagerly: on the H200 the built-in model's prefill took 7-25 ms of host time (kernel launches)
against ~0.7 ms of GPU time. Captured, it is one replay.

A prompt of L tokens runs in the graph of the smallest bucket T >= L as one causal sequence of
T tokens: rows L .. T-1 are padding (token 0, their K/V written to the slot no sequence owns).
Under the causal mask a real row sees only rows before it, so padding changes none of the real
rows. The attention's lengths are static ([0, T]), passed from the host, so nothing in the step
reads the device; the logits row is the last real one, picked by an index on the device.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vibee.runtime.attention import AttentionBatch
from vibee.runtime.host_copy import to_device
from vibee.runtime.sampling_kernel import argmax_rows
from vibee.runtime.warmup import FIRST_BUCKET

MAX_PREFILL_GRAPH_TOKENS = 1024  # longer prompts are compute-bound: launches no longer matter


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """Buckets 16, 32, ... up to the first at or above min(max_tokens, MAX_PREFILL_GRAPH_TOKENS)."""
    limit, sizes, n = min(max_tokens, MAX_PREFILL_GRAPH_TOKENS), [], FIRST_BUCKET
    while True:
        sizes.append(n)
        if n >= limit:
            return sizes
        n *= 2


class PrefillGraphs:
    def __init__(self, model, kv_cache, *, max_tokens: int, block_size: int, padding_slot: int,
                 sampled: torch.Tensor):
        """max_tokens: the longest prompt a step prefills whole; sampled: the runner's buffer of
        sampled tokens (the graph writes the argmax of its logits row into sampled[0])."""
        self.model, self.kv_cache = model, kv_cache
        self.sizes = prefill_graph_sizes(max_tokens)
        self.block_size, self.padding_slot = block_size, padding_slot
        self.sampled = sampled
        device = model.device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.arange(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), padding_slot, dtype=torch.long, device=device)
        self.last_index = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self._batches = {t: AttentionBatch(
            cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([t], dtype=torch.int32, device=device),
            block_tables=torch.zeros(1, 1, dtype=torch.int32, device=device),  # unread: a fresh prompt attends to its own K/V
            slot_mapping=self.slot_mapping[:t], is_decode=False, fresh=True,
            cu_seqlens_q_host=[0, t], seq_lens_host=[t], positions_tensor=self.positions[:t]) for t in self.sizes}

    def step(self, t: int) -> None:
        """What the graph of bucket t holds: the forward over the buffers, the last real row's
        logits and their argmax into sampled[0]."""
        hidden = self.model(self.input_ids[:t], self.positions[:t], self._batches[t], self.kv_cache)
        self.hidden[t] = hidden.index_select(0, self.last_index)
        self.logits[t] = self.model.compute_logits(self.hidden[t])
        argmax_rows(self.logits[t], out=self.sampled[:1])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool)."""
        pool = None
        for t in reversed(self.sizes):
            for _ in range(2):  # autotuning and lazy initialisation happen outside the capture
                self.step(t)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.step(t)
            pool = graph.pool() if pool is None else pool
            self.graphs[t] = graph
        torch.cuda.synchronize()

    def fits(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.sizes[-1]

    def run(self, token_ids: list[int], block_table: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [1, vocab], final hidden state [1, hidden]) of the last of token_ids, a whole
        fresh prompt whose K/V go to the slots of block_table; the argmax is in sampled[0]."""
        length = len(token_ids)
        t = next(size for size in self.sizes if size >= length)
        bs = self.block_size
        positions = np.arange(length)
        slots = np.asarray(block_table, dtype=np.int64)[positions // bs] * bs + positions % bs
        packed = to_device(np.concatenate([np.asarray(token_ids, dtype=np.int64), slots, [length - 1]]), self.input_ids.device)
        self.input_ids[:length] = packed[:length]
        self.input_ids[length:t] = 0
        self.slot_mapping[:length] = packed[length: 2 * length]
        self.slot_mapping[length:t] = self.padding_slot
        self.last_index.copy_(packed[2 * length:])
        with torch.inference_mode():
            self.graphs[t].replay()
        return self.logits[t], self.hidden[t]


def capture_prefill_graphs(model, kv_cache, **kwargs) -> PrefillGraphs | None:
    """Captured prefill graphs, or None when the forward can't be captured (prefills then run eagerly)."""
    graphs = PrefillGraphs(model, kv_cache, **kwargs)
    try:
        graphs.capture()
    except Exception as exc:  # noqa: BLE001 - a forward that syncs with the host can't be captured
        logging.getLogger("vibee.engine").warning("prefills run eagerly: CUDA graph capture failed: %s", exc)
        return None
    return graphs
