"""CUDA graphs of the decode step: at small batches a decode step is hundreds of tiny kernel
launches, so the GPU waits on Python. Capturing the whole step (model forward + logits) once per
batch size and replaying it removes that overhead.

A captured graph has fixed shapes and fixed kernel arguments: the step's inputs are copied into
static buffers of the captured batch size, the rows beyond the real batch are padding (a one-token
sequence whose K/V go to a slot no sequence owns), and attention runs with a fixed number of KV
splits that covers max_model_len, so nothing in the step reads a device value on the host.
"""

from __future__ import annotations

import bisect
import math
import torch

from vibee.runtime.attention import AttentionBatch


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_batch (and max_batch itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    """Graphs of `model` decoding b sequences at once, for b in capture_sizes(max_batch)."""

    def __init__(self, model, kv_cache, *, max_batch: int, max_model_len: int, block_size: int, padding_slot: int,
                 num_splits: int):
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = capture_sizes(max_batch)
        self.block_size = block_size
        self.padding_slot = padding_slot
        self.num_splits = num_splits
        device = model.device
        n, width = self.sizes[-1], math.ceil(max_model_len / block_size)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((n,), padding_slot, dtype=torch.long, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _batch(self, b: int) -> AttentionBatch:
        return AttentionBatch(cu_seqlens_q=self.cu_seqlens_q[: b + 1], seq_lens=self.seq_lens[:b],
                              block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
                              is_decode=True, num_splits=self.num_splits)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so the smaller graphs reuse its memory pool."""
        for b in reversed(self.sizes):
            batch = self._batch(b)
            for _ in range(2):  # warm up: autotuning and lazy initialisation happen outside the capture
                self.model.compute_logits(self.model(self.input_ids[:b], self.positions[:b], batch, self.kv_cache))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self.model(self.input_ids[:b], self.positions[:b], batch, self.kv_cache)
                self.logits[b] = self.model.compute_logits(hidden)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def fits(self, n: int) -> bool:
        return 0 < n <= self.sizes[-1]

    def run(self, input_ids: list[int], seq_lens: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [n, vocab] of one decode step of n sequences (token i at position seq_lens[i] - 1)."""
        n = len(input_ids)
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        bs = self.block_size
        positions = [length - 1 for length in seq_lens]
        slots = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)]
        width = self.block_tables.shape[1]
        rows = torch.zeros(b, width, dtype=torch.int32)
        for i, table in enumerate(block_tables):
            rows[i, : len(table)] = torch.tensor(table[:width], dtype=torch.int32)
        pad = b - n
        host = {
            "ids": torch.tensor(input_ids + [0] * pad, dtype=torch.long),
            "pos": torch.tensor(positions + [0] * pad, dtype=torch.long),
            "lens": torch.tensor(seq_lens + [1] * pad, dtype=torch.int32),
            "slots": torch.tensor(slots + [self.padding_slot] * pad, dtype=torch.long),
        }
        self.input_ids[:b].copy_(host["ids"], non_blocking=True)
        self.positions[:b].copy_(host["pos"], non_blocking=True)
        self.seq_lens[:b].copy_(host["lens"], non_blocking=True)
        self.slot_mapping[:b].copy_(host["slots"], non_blocking=True)
        self.block_tables[:b].copy_(rows, non_blocking=True)
        self.graphs[b].replay()
        return self.logits[b][:n]

