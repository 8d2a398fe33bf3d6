"""The draft model of speculative decoding with a paged KV cache of its own (an instance of the
generated kv_cache, with its own BlockManager), so a proposal computes only the tokens the draft
has not seen yet instead of recomputing a window of context for every drafted token.

Per sequence it remembers the tokens whose K/V its cache holds: the sequence's tokens so far plus
the drafts it fed itself. Next time, the longest prefix of those that the sequence really has
(accepted drafts included) stays; the rest is recomputed in one forward, together with every
other proposing sequence's, and the k - 1 further drafts are one-token steps whose inputs stay on
the device until the drafts are read, once, at the end.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.block_table_rows import BlockTableRows
from vibee.runtime.host_copy import to_device
from vibee.runtime.warmup import warm_decode, warm_prefill


class DraftRunner:
    def __init__(self, model, kv_module, *, num_blocks: int, block_size: int, k: int, max_batched_tokens: int):
        cfg = model.config
        self.model, self.k, self.block_size = model, k, block_size
        self.device = model.device
        self.max_batched_tokens = max_batched_tokens
        # One block more than the target's: the padding block, where graph rows of device rounds
        # (draft_rounds.py) that hold no sequence write, as the target's cache has.
        self.cache = kv_module.PagedKVCache(cfg.num_layers, num_blocks + 1, cfg.num_kv_heads, cfg.head_dim,
                                            dtype=model.dtype, device=self.device, block_size=block_size)
        self.blocks = kv_module.BlockManager(num_blocks, block_size, False)
        self.rows = BlockTableRows(self.blocks.block_tables)
        # seq_id -> (n, drafts): the draft cache holds the K/V of the sequence's first n tokens
        # and then of the drafts it fed itself after them.
        self.fed: dict[int, tuple[int, list[int]]] = {}
        self.catch_up_tokens = 0  # tokens the last proposal fed beyond one per sequence
        if str(self.device).startswith("cuda"):
            # Its forwards are eager: every kernel variant they can meet is compiled now, not in
            # the first speculative steps (the speed gate would time a compile and switch off),
            # on the padding block.
            warm_prefill(model, self.cache, max_tokens=max_batched_tokens, block_size=block_size, scratch_block=num_blocks)
            warm_decode(model, self.cache, block_size=block_size, scratch_block=num_blocks)

    @staticmethod
    def bytes_per_token(model) -> int:
        """K and V of one token in every layer of the draft (what its cache costs per token)."""
        cfg = model.config
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize

    def reset(self) -> None:
        """Device rounds wrote the cache through the target's block tables: what each sequence's
        blocks here held may be gone, so its next proposal recomputes it (its blocks stay its)."""
        self.fed.clear()

    def forget(self, seq_id: int) -> None:
        self.fed.pop(seq_id, None)
        self.blocks.free(seq_id)
        self.rows.release(seq_id)

    @torch.inference_mode()
    def propose(self, sequences: Sequence[Sequence[int]], seq_ids: Sequence[int]) -> list[list[int]]:
        """k greedy draft tokens after each sequence's tokens (all of them so far, any sequence
        type: only its length, the tokens past what the draft saw and a slice are read). A
        sequence whose draft blocks are short gets none."""
        batch, catch_up = [], []  # (seq_id, tokens); each one's first token the draft has not seen
        for seq_id, tokens in zip(seq_ids, sequences):
            valid, fed_drafts = self.fed.get(seq_id, (0, []))
            for draft in fed_drafts:  # the drafts it kept (tokens only grow while a sequence runs)
                if valid >= len(tokens) or tokens[valid] != draft:
                    break
                valid += 1
            valid = min(valid, len(tokens) - 1)  # the last token is fed again: it gives the logits
            try:
                self.blocks.allocate(seq_id, tokens, num_lookahead=self.k - 1)
            except MemoryError:
                continue
            batch.append((seq_id, tokens))
            catch_up.append(valid)
        drafts: list[list[int]] = []
        self.catch_up_tokens = sum(len(tokens) - valid - 1 for (_, tokens), valid in zip(batch, catch_up))
        # Catch-up forwards hold at most max_batched_tokens tokens (a sequence's first proposal
        # feeds its whole prompt): the sequences go in groups.
        start = 0
        while start < len(batch):
            end, total = start, 0
            while end < len(batch) and (end == start or total + len(batch[end][1]) - catch_up[end] <= self.max_batched_tokens):
                total += len(batch[end][1]) - catch_up[end]
                end += 1
            drafts += self._propose_group(batch[start:end], catch_up[start:end])
            start = end
        proposals = dict(zip((seq_id for seq_id, _ in batch), drafts))
        return [proposals.get(seq_id, []) for seq_id in seq_ids]

    def _propose_group(self, batch: list[tuple[int, Sequence[int]]], catch_up: list[int]) -> list[list[int]]:
        rows = [self.rows.row(seq_id) for seq_id, _ in batch]
        lens = [len(tokens) for _, tokens in batch]
        tables = self.rows.gather(rows)
        ids = [t for (_, tokens), valid in zip(batch, catch_up) for t in tokens[valid:]]
        query_lens = [n - valid for n, valid in zip(lens, catch_up)]
        step = make_attention_batch(query_lens, lens, tables, self.block_size, self.device)
        hidden = self.model(to_device(ids, self.device), step.positions(), step, self.cache)
        last = to_device(query_lens, self.device).cumsum(0) - 1
        token = self.model.compute_logits(hidden[last]).argmax(dim=-1)
        drafted = [token]
        for j in range(1, self.k):  # one token each, at the position after the last draft
            step = make_attention_batch([1] * len(batch), [n + j for n in lens], tables, self.block_size, self.device)
            hidden = self.model(token, step.positions(), step, self.cache)
            token = self.model.compute_logits(hidden).argmax(dim=-1)
            drafted.append(token)
        drafts = torch.stack(drafted, dim=1).tolist()  # the one wait for the device
        for (seq_id, tokens), row in zip(batch, drafts):
            self.fed[seq_id] = (len(tokens), row[:-1])  # the last draft was never fed
        return drafts
