"""A round's drafts from the draft model, on the device (device_rounds.py runs the rounds): k
greedy one-token forwards of the draft over its own paged KV cache, on fixed shapes, so a round
with its drafting is one CUDA graph.

The draft's cache shadows the target's: a sequence's draft K/V sit in the same block ids as its
target K/V (the draft cache has as many blocks, plus the padding block), so the slots the scheduler
holds for a step's rounds hold the draft's writes too. A round of a sequence of length L (tokens
t_0 .. t_{L-1}) needs the draft K/V of positions up to L - 3; its first forward takes two rows,
t_{L-2} and t_{L-1} (re-writing L - 2 costs nothing and covers the round before it accepting every
draft, whose last draft the draft never saw), and the k - 1 further forwards one row each, the
last draft as input. A round leaves positions up to L' - 3 right for the next one (L' = L plus
the round's emitted tokens). Before the first round of a step, a sequence whose draft K/V lag
(new, or decoded without rounds) catches up in an eager forward.

Host drafting (DraftRunner.propose) keeps its own block manager over the same cache: whichever
of the two wrote last, the other forgets what it held (`invalidate`, DraftRunner.reset).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.cuda_graphs import DecodeGraphs, capture_sizes


class DraftModelProposer:
    def __init__(self, runner: Any, target_graphs: Any, *, k: int, max_rows: int, max_model_len: int,
                 block_size: int, padding_slot: int, max_batched_tokens: int):
        """runner: the DraftRunner (its model and cache; the cache's padding slot is padding_slot);
        target_graphs: the engine's DecodeGraphs, whose block-table rows s * (k + 1) the rounds
        fill with each sequence's table."""
        self.runner, self.target, self.k = runner, target_graphs, k
        self.block_size, self.padding_slot = block_size, padding_slot
        self.max_batched_tokens = max_batched_tokens
        model = runner.model
        rows = 2 * max_rows  # the first forward: two rows per sequence
        sampled = torch.zeros(capture_sizes(rows)[-1], dtype=torch.long, device=model.device)
        # Its buffers and forward only: the forwards are captured inside the round's graph.
        self.graphs = DecodeGraphs(model, runner.cache, max_batch=rows, max_model_len=max_model_len,
                                   block_size=block_size, padding_slot=padding_slot,
                                   num_splits=target_graphs.num_splits, sampled=sampled)
        self.valid: dict[int, int] = {}  # seq_id -> leading positions whose draft K/V are right

    def propose(self, work: torch.Tensor, lens: torch.Tensor, limits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts [B, k] and their counts (k, or 0 for a padding or done row) for the B sequences of
        work/lens. A forward writes draft K/V only at positions below limit - 1 (the slots the
        scheduler holds for the step; the verification keeps no draft past them either)."""
        g, k = self.graphs, self.k
        batch = lens.shape[0]
        live = (lens > 0) & (lens < limits)
        tables = self.target.block_tables[: batch * (k + 1): k + 1]
        # Rows s and batch + s: sequence s's tokens at L - 2 and L - 1.
        positions = torch.cat([lens - 2, lens - 1]).clamp(min=0)
        tokens = work.gather(1, positions.view(2, batch).t()).t().reshape(-1).long()
        b = g.size_for(2 * batch)
        self._write(positions, tokens, tables.repeat(2, 1), live.repeat(2), b)
        g.forward(b)
        token = g.sampled[batch: 2 * batch].clone()
        drafts = [token]
        b = g.size_for(batch)
        for j in range(1, k):
            self._write(lens - 1 + j, token, tables, live & (lens + j < limits), b)
            g.forward(b)
            token = g.sampled[:batch].clone()
            drafts.append(token)
        return torch.stack(drafts, dim=1), live.long() * k

    def _write(self, positions, tokens, tables, live, b: int) -> None:
        """Rows [0, n) of the draft's buffers from each row's position, input token, block table
        and liveness; rows [n, b) padding (one token whose K/V go to the padding slot)."""
        g, bs = self.graphs, self.block_size
        n, width = tables.shape
        blocks = tables.gather(1, (positions // bs).clamp(max=width - 1)[:, None]).squeeze(1).long()
        g.input_ids[:n] = tokens
        g.positions[:n] = torch.where(live, positions, 0)
        g.slot_mapping[:n] = torch.where(live, blocks * bs + positions % bs, self.padding_slot)
        g.seq_lens[:n] = torch.where(live, positions + 1, 1)
        g.block_tables[:n, :width] = tables
        g.input_ids[n:b] = 0
        g.positions[n:b] = 0
        g.slot_mapping[n:b] = self.padding_slot
        g.seq_lens[n:b] = 1
        g.block_tables[n:b] = 0

    @torch.inference_mode()
    def before(self, seqs: list[Any], tables: np.ndarray) -> int:
        """Catch up, in eager forwards, the draft K/V of each sequence up to position L - 3.
        Returns the tokens computed (a new sequence's whole prompt: a prefill of the draft's)."""
        self.runner.reset()  # its own blocks may be ours now (and ours its, next time it drafts)
        model, device = self.runner.model, self.runner.model.device
        computed = 0
        for seq, table in zip(seqs, tables):
            done, upto = self.valid.get(seq.seq_id, 0), seq.num_tokens - 2
            tokens = None
            while done < upto:
                if tokens is None:
                    tokens = seq.token_prefix(seq.num_tokens)
                end = min(upto, done + self.max_batched_tokens)
                step = make_attention_batch([end - done], [end], table[None], self.block_size, device)
                ids = torch.tensor(list(tokens[done:end]), dtype=torch.long, device=device)
                model(ids, step.positions(), step, self.runner.cache)
                computed += end - done
                done = end
            self.valid[seq.seq_id] = max(done, 0)
        return computed

    def after(self, seqs: list[Any], emitted: list[list[int]]) -> None:
        for seq, tokens in zip(seqs, emitted):
            self.valid[seq.seq_id] = seq.num_tokens + len(tokens) - 2

    def invalidate(self) -> None:
        """Host drafting wrote the draft cache through its own block manager: nothing here holds."""
        self.valid.clear()

    def forget(self, seq_id: int) -> None:
        self.valid.pop(seq_id, None)
