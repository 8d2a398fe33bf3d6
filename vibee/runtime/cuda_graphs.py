"""CUDA graphs of the decode step: at small batches a decode step is hundreds of tiny kernel
launches, so the GPU waits on Python. Capturing the whole step (model forward + logits) once per
batch size and replaying it removes that overhead.

A captured graph has fixed shapes and fixed kernel arguments: the step's inputs are copied into
static buffers of the captured batch size, the rows beyond the real batch are padding (a one-token
sequence whose K/V go to a slot no sequence owns), and attention runs with a fixed number of KV
splits that covers max_model_len, so nothing in the step reads a device value on the host.

A row is one query token at a position with the KV before it: a sequence verifying k speculative
tokens is k + 1 rows sharing its block table (row j sees the keys up to its own position, the
step's earlier rows included, as causal attention over the k + 1 tokens would). The graph also
takes each row's argmax, so a greedy step reads its tokens without another launch.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import Sequence

import numpy as np
import torch

from vibee.runtime.attention import AttentionBatch
from vibee.runtime.sampling_kernel import argmax_rows

HEAD_ROWS = 5  # the staging buffer's per-row fields: ids, positions, slots, seq_lens, sources


def num_sms(device: torch.device | str) -> int:
    """The streaming multiprocessors of a CUDA device (elsewhere an H100's 132: only split counts
    depend on it)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def splits_for_batch(num_splits: int, batch: int, kv_heads: int, num_sms: int) -> int:
    """The KV split count of a captured batch: num_splits (what max_model_len needs), but no more
    than it takes for batch * kv_heads * splits programs to reach ~2 per SM. A large batch fills
    the GPU without splitting, and then skips the partial outputs and their merge altogether
    (H100, Llama-3.2-1B shape, batch 256: the decode kernel was 2.27 of a 4.46 ms step with 16).
    2, not 4: with 128-token tiles, H100, 8 KV heads, µs a layer: batch 64 at 1024 tokens 1 split
    48.2, 2 splits 52.8; batch 32 at 512 17.3 / 17.6 (2) / 19.4 (4); batch 8 at 512 4 splits 9.5,
    8 splits 11.0."""
    wanted = -(-2 * num_sms // max(batch * kv_heads, 1))
    return max(1, min(num_splits, wanted))


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_batch (and max_batch itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    """Graphs of `model` decoding b rows at once, for b in capture_sizes(max_batch).

    A step's inputs travel in one host->device copy: input ids, positions, slots, sequence
    lengths, token sources and the used columns of the block tables are packed (int64) into one
    staging buffer, pinned on a GPU (two of them, used in turn, so packing a step never waits for
    the last one's copy). The graphs read ids, positions and slots straight from the device copy;
    lengths and tables are cast into their int32 buffers on the device.

    `sampled` is the engine's device buffer of the last step's sampled tokens: a row whose source
    is s >= 0 takes sampled[s] as its input token (the host does not know it yet), and the graph
    writes each row's argmax into sampled[:b] (the tokens of a greedy step, and what the next
    step reads when nothing overwrites them).
    """

    def __init__(self, model, kv_cache, *, max_batch: int, max_model_len: int, block_size: int, padding_slot: int,
                 num_splits: int, sampled: torch.Tensor):
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = capture_sizes(max_batch)
        self.block_size = block_size
        self.padding_slot = padding_slot
        self.num_splits = num_splits  # the most any size uses (see splits_for_batch)
        sms = num_sms(model.device)
        self.splits = {b: splits_for_batch(num_splits, b, model.config.num_kv_heads, sms) for b in self.sizes}
        device = model.device
        n, width = self.sizes[-1], math.ceil(max_model_len / block_size)
        if len(sampled) < n:
            raise ValueError(f"the sampled-token buffer holds {len(sampled)} rows; the largest graph has {n}")
        self.sampled = sampled
        # Staging layout (int64): ids [0, n), positions [n, 2n), slots [2n, 3n), seq_lens [3n, 4n),
        # sources [4n, 5n), then the step's b rows of its w used table columns, row-major.
        total = HEAD_ROWS * n + n * width
        pinned = device.type == "cuda"
        self.hosts = [torch.zeros(total, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.host = self.hosts[0]  # the one the next pack() writes
        self.staging = torch.zeros(total, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, _, self.sources = self.staging[: HEAD_ROWS * n].view(HEAD_ROWS, n)
        self.slot_mapping.fill_(padding_slot)
        self.sources.fill_(-1)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # each size's final hidden states (the logits' input)
        self.pool = None
        # Mark the end of each staging buffer's last copy: a buffer is not rewritten before it.
        self._copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self._turn = 0

    def _batch(self, b: int) -> AttentionBatch:
        return AttentionBatch(cu_seqlens_q=self.cu_seqlens_q[: b + 1], seq_lens=self.seq_lens[:b],
                              block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
                              is_decode=True, num_splits=self.splits[b])

    def step(self, b: int) -> None:
        """What the graph of size b holds: each row's input token (staged, or the last step's
        sampled one), the forward, the logits and each row's argmax into sampled[:b]."""
        self.hidden[b], self.logits[b] = self.forward(b)

    def forward(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of size b on the buffers as they are: (hidden, logits); argmax into sampled[:b].
        Other graphs capture it too (vibee/runtime/device_rounds.py): it keeps no reference."""
        sources = self.sources[:b]
        ids = torch.where(sources >= 0, self.sampled[sources.clamp(min=0)], self.input_ids[:b])
        hidden = self.model(ids, self.positions[:b], self._batch(b), self.kv_cache)
        logits = self.model.compute_logits(hidden)
        argmax_rows(logits, out=self.sampled[:b])
        return hidden, logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so the smaller graphs reuse its memory pool."""
        for b in reversed(self.sizes):
            for _ in range(2):  # warm up: autotuning and lazy initialisation happen outside the capture
                self.step(b)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def fits(self, n: int) -> bool:
        return 0 < n <= self.sizes[-1]

    def pack(self, input_ids: Sequence[int], seq_lens: Sequence[int], block_tables: np.ndarray,
             sources: Sequence[int] | None = None) -> tuple[int, int]:
        """Write a step of n rows into the host staging buffer, padded to the captured size b:
        token i at position seq_lens[i] - 1; block_tables [n, w] (w columns cover every row);
        sources[i] >= 0: row i's token is sampled[sources[i]] instead of input_ids[i].
        Padding rows are one-token sequences in block 0 whose K/V go to the padding slot.
        Returns (b, w)."""
        n, w = block_tables.shape
        b = self.size_for(n)
        n_max = self.sizes[-1]
        host = self.host.numpy()
        ids, positions, slots, lens, src = host[: HEAD_ROWS * n_max].reshape(HEAD_ROWS, n_max)
        tables = host[HEAD_ROWS * n_max: HEAD_ROWS * n_max + b * w].reshape(b, w)
        ids[:n] = input_ids
        ids[n:b] = 0
        src[:b] = -1
        if sources is not None:
            src[:n] = sources
        lens[:n] = seq_lens
        lens[n:b] = 1
        np.subtract(lens[:b], 1, out=positions[:b])
        tables[:n] = block_tables
        tables[n:] = 0
        bs = self.block_size
        slots[:n] = tables[np.arange(n), positions[:n] // bs] * bs + positions[:n] % bs
        slots[n:b] = self.padding_slot
        return b, w

    def run(self, input_ids: Sequence[int], seq_lens: Sequence[int], block_tables: np.ndarray,
            sources: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [n, vocab] of one decode step of n rows (see pack); their argmax is in sampled[:n],
        their final hidden states in last_hidden(n) until the next replay."""
        turn = self._turn
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # the copy from this buffer two steps ago: long done
        self.host = self.hosts[turn]
        b, w = self.pack(input_ids, seq_lens, block_tables, sources)
        n_max = self.sizes[-1]
        used = HEAD_ROWS * n_max + b * w
        self.staging[:used].copy_(self.host[:used], non_blocking=True)
        if copied is not None:
            copied.record()
        self._turn = 1 - turn
        self.seq_lens[:b].copy_(self.staging[3 * n_max: 4 * n_max][:b])
        # Only the used columns: the kernels read a row's entries up to its length, never past it.
        self.block_tables[:b, :w].copy_(self.staging[HEAD_ROWS * n_max: used].view(b, w))
        self.graphs[b].replay()
        self._replayed = b
        return self.logits[b][: len(input_ids)]

    def size_for(self, n: int) -> int:
        """The captured batch size that n rows run in (n must fit)."""
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def last_hidden(self, n: int) -> torch.Tensor:
        """[n, hidden] final hidden states (after the final norm) of the last replay's first n rows:
        a view of the graph's output, valid until the next replay (Medusa heads read it)."""
        return self.hidden[self._replayed][:n]


def capture_decode_graphs(model, kv_cache, *, max_batch: int, max_model_len: int, block_size: int, padding_slot: int,
                          num_splits: int, sampled: torch.Tensor) -> tuple[DecodeGraphs | None, str | None]:
    """(captured graphs, None), or (None, why) when the step can't be captured: it then runs eagerly."""
    graphs = DecodeGraphs(model, kv_cache, max_batch=max_batch, max_model_len=max_model_len, block_size=block_size,
                          padding_slot=padding_slot, num_splits=num_splits, sampled=sampled)
    try:
        graphs.capture()
    except Exception as exc:  # a kernel that syncs with the host can't be captured: run eagerly
        logging.getLogger("vibee.engine").warning("decode steps run eagerly: CUDA graph capture failed: %s", exc)
        return None, str(exc)
    return graphs, None
