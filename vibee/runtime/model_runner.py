"""The model runner: one forward of a scheduled step over the paged KV cache, as a CUDA graph
replay when the step is a decode (one row per token sampled) or one whole fresh prompt
(prefill_graphs.py), and eagerly otherwise.

It keeps the final hidden states of the rows it computed logits for (`last_hidden`, on the
device, until the next step runs), and where each sampling sequence's rows are among them
(`last_rows`): Medusa heads draft from them.

It keeps `sampled`, the device buffer of the last step's sampled tokens: a sequence whose last
output token is still a placeholder (its step was launched before the host read it) takes its
input token from there, so the engine can launch a step while the previous one runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.block_table_rows import BlockTableRows
from vibee.runtime.cuda_graphs import capture_decode_graphs
from vibee.runtime.host_copy import to_device
from vibee.runtime.prefill_graphs import capture_prefill_graphs
from vibee.runtime.prompt_logprobs import prompt_logits, score_prompt
from vibee.runtime.requests import token_slice
from vibee.runtime.warmup import warm_prefill

MAX_VERIFY_ROWS = 256  # the most rows a speculative step's decode graph takes (see decode_graph_rows)


def forward_rows(model, kv_cache, ids: torch.Tensor, batch, logit_rows: list[int], device: str):
    """One eager forward: (hidden states of logit_rows, their logits), or (None, an empty
    tensor) when no row samples. Tensor-parallel workers run the same (rank_worker.py)."""
    keep = to_device(logit_rows, device) if 0 < len(logit_rows) < len(ids) else None  # None: every row
    with torch.inference_mode():
        hidden = model(ids, batch.positions(), batch, kv_cache)
        if not logit_rows:
            return None, hidden.new_empty(0)
        kept = hidden if keep is None else hidden[keep]
        return kept, model.compute_logits(kept)


def decode_graph_rows(max_num_seqs: int, speculative_config=None) -> int:
    """Rows of the largest decode graph: a row per sequence, or when speculating (the
    speculative_decode config given) k + 1 per sequence that may draft, at most MAX_VERIFY_ROWS:
    the graphs' memory pool must stay within what the KV sizing reserves for it."""
    if speculative_config is None:
        return max_num_seqs
    drafting = min(max_num_seqs, speculative_config.disable_by_batch_size or max_num_seqs)
    return max(max_num_seqs, min(drafting * (speculative_config.num_speculative_tokens + 1), MAX_VERIFY_ROWS))


class ModelRunner:
    def __init__(self, model, kv_cache, block_manager, *, device: str, block_size: int, num_blocks: int,
                 graph_rows: int, max_model_len: int, max_num_batched_tokens: int, use_graphs: bool,
                 num_splits: int, host_swap=None, ranks=None):
        """graph_rows: rows of the largest decode graph (and of `sampled`); use_graphs: capture
        decode graphs (their padding rows write to block num_blocks, past the sequences' blocks);
        ranks: the tensor-parallel group whose workers mirror each forward and swap (or None)."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = block_size
        self.block_rows = BlockTableRows(block_manager.block_tables)
        self.host_swap = host_swap  # host slots for swapped-out KV (preemption_mode swap), else None
        self.ranks = ranks
        self.sampled = torch.zeros(graph_rows, dtype=torch.long, device=device)
        # The last step's hidden states of its logits rows (a view of a graph's output, or the
        # eager forward's own tensor: keeping it costs no work), and seq_id -> (first row there,
        # drafts verified, the sequence's num_tokens when the step ran).
        self.last_hidden: torch.Tensor | None = None
        self.last_rows: dict[int, tuple[int, int, int]] = {}
        self.graphs = self.graph_error = None
        self.prefill_graphs = None
        if use_graphs:
            self.graphs, self.graph_error = capture_decode_graphs(
                model, kv_cache, max_batch=graph_rows, max_model_len=max_model_len, block_size=block_size,
                padding_slot=num_blocks * block_size, num_splits=num_splits, sampled=self.sampled)
        if self.graphs is not None and device.startswith("cuda"):  # every shape the prefill autotunes on
            warm_prefill(model, kv_cache, max_tokens=min(max_num_batched_tokens, max_model_len),
                         block_size=block_size, scratch_block=num_blocks)
        # int8 KV pages are read back even by a fresh prompt (attention.py): those prefill eagerly.
        if self.graphs is not None and getattr(kv_cache.k_pages[0], "scale", None) is None:
            self.prefill_graphs = capture_prefill_graphs(
                model, kv_cache, max_tokens=min(max_num_batched_tokens, max_model_len), block_size=block_size,
                padding_slot=num_blocks * block_size, sampled=self.sampled)

    def release(self, seq_id: int) -> None:
        self.block_rows.release(seq_id)

    def score_prompt(self, prompt_token_ids: list[int], top: int) -> list[Any]:
        """The prompt's own tokens' logprobs (prompt_logprobs.py), computed now, on every rank."""
        ids = to_device(prompt_token_ids, self.device)
        if self.ranks is not None:
            self.ranks.send(("score", len(prompt_token_ids)))
            self.ranks.share_ids(ids)
        return score_prompt(prompt_logits(self.model, ids, block_size=self.block_size, device=self.device), ids, top)

    def run(self, sched, placeholders: dict[int, int]) -> tuple[list[tuple[Any, int, tuple[int, ...]]], torch.Tensor, bool]:
        """One forward over the step's tokens. Returns what to sample, as (sequence, first logits
        row, drafts), the logits (one row per plain sequence, k + 1 for one verifying k drafts)
        and whether sampled[:rows] holds each logits row's argmax (a CUDA graph ran).
        placeholders: seq_id -> the row of `sampled` holding the token its placeholder stands for."""
        if sched.swap_out or sched.swap_in:  # first: this step's forward may write into blocks just swapped out
            if self.ranks is not None:
                self.ranks.send(("swap", sched.swap_out, sched.swap_in))
            self.host_swap.swap_out(sched.swap_out)
            self.host_swap.swap_in(sched.swap_in)
            if not sched.scheduled:
                return [], torch.empty(0, device=self.device), False
        use_kv_cache = self.kv_cache is not None
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        rows: list[int] = []  # each sequence's row in self.block_rows
        logit_rows: list[int] = []
        sources: list[tuple[int, int]] = []  # (token index in input_ids, row of sampled) of each placeholder
        plan = []
        self.last_rows, self.last_hidden = {}, None
        for item in sched.scheduled:
            seq = item.seq
            drafts = item.draft_token_ids
            end = seq.num_computed_tokens + item.num_new_tokens  # drafts included
            # Without a KV cache every step recomputes the sequence from its first token.
            start = seq.num_computed_tokens if use_kv_cache else 0
            input_ids.extend(token_slice(seq, start, end - len(drafts)))
            samples = end - len(drafts) == seq.num_tokens  # its last known token is computed: sample after it
            if samples and seq.seq_id in placeholders:  # that token is one
                sources.append((len(input_ids) - 1, placeholders[seq.seq_id]))
            input_ids.extend(drafts)
            query_lens.append(end - start)
            seq_lens.append(end)
            if use_kv_cache:
                rows.append(self.block_rows.row(seq.seq_id))
            if samples:
                self.last_rows[seq.seq_id] = (len(logit_rows), len(drafts), seq.num_tokens)
                plan.append((seq, len(logit_rows), drafts))
                logit_rows.extend(range(len(input_ids) - len(drafts) - 1, len(input_ids)))
        tables = self.block_rows.gather(rows) if use_kv_cache else None
        if self.prefill_graphs is not None and len(plan) == 1 == len(query_lens) and not sources \
                and query_lens[0] == seq_lens[0] == len(input_ids) and not plan[0][2] \
                and self.prefill_graphs.fits(len(input_ids)):
            # One whole fresh prompt: its bucket's graph (its argmax lands in sampled[0]).
            logits, self.last_hidden = self.prefill_graphs.run(input_ids, tables[0])
            return plan, logits, True
        if self.graphs is not None and len(logit_rows) == len(input_ids) and len(plan) == len(query_lens) \
                and self.graphs.fits(len(input_ids)):
            logits = self._replay(input_ids, query_lens, seq_lens, tables, sources)
            self.last_hidden = self.graphs.last_hidden(len(input_ids))
            return plan, logits, True
        batch = make_attention_batch(query_lens, seq_lens, tables, self.block_size, self.device)
        ids = to_device(input_ids, self.device)
        if sources:  # placeholders: the tokens the last step left on the device
            at, row = zip(*sources)
            ids[to_device(at, self.device)] = self.sampled[to_device(row, self.device)]
        if self.ranks is not None:  # the workers run the same forward over their shards
            self.ranks.send(("step", len(input_ids), query_lens, seq_lens, tables, logit_rows))
            self.ranks.share_ids(ids)
        self.last_hidden, logits = forward_rows(self.model, self.kv_cache, ids, batch, logit_rows, self.device)
        return plan, logits, False

    def _replay(self, input_ids, query_lens, seq_lens, tables: np.ndarray, sources) -> torch.Tensor:
        """A decode step as graph rows: each sequence computes its last token and its drafts (if
        any), all sampled; a sequence's k + 1 tokens are k + 1 one-token rows."""
        if len(input_ids) > len(query_lens):  # drafts: row r is token r of its sequence's k + 1
            q = np.asarray(query_lens)
            first = np.repeat(np.cumsum(q) - q, q)  # each row's sequence's first row
            lens = np.repeat(np.asarray(seq_lens) - q, q) + np.arange(len(input_ids)) - first + 1
            tables = tables[np.repeat(np.arange(len(q)), q)]
        else:
            lens = seq_lens
        token_sources = None
        if sources:
            token_sources = [-1] * len(input_ids)
            for index, row in sources:
                token_sources[index] = row
        with torch.inference_mode():
            return self.graphs.run(input_ids, lens, tables, token_sources)
