"""Speculative rounds on the device: drafting, verification and greedy acceptance for a batch of
decoding sequences, several rounds per engine step and one host sync after the last.

A host-driven speculative step can't overlap anything: the next drafts need this step's accepted
tokens, so the GPU idles while the host reads them, drafts, packs and launches (on the H200 a
verifying step of the built-in model took 0.61 ms, of which the GPU was busy 0.165 ms). Here
each round drafts from the sequences' tokens kept on the device (a proposer: n-gram lookup, the
generated ngram_propose_on_device, or the draft model's forwards, draft_rounds.py), verifies in a
decode-graph replay whose inputs device ops write, and appends the accepted tokens on the device.
On a GPU a whole round is one CUDA graph per batch size (its ~100 small kernels cost ~1.2 ms of
launches a round when queued one by one, on the H200), so the host replays a graph per round and
reads all rounds once.

The scheduler gives each sequence KV slots for every token the rounds could emit (as draft
lookahead: `plan` sets that many placeholder drafts before it schedules), and the engine cuts
what it reads at stops and max_tokens, as it does a verified draft's tokens; what rounds compute
past a stop is wasted, never emitted.

A step's rounds still end in a host sync, so the engine queues the next step's rounds before it
reads the last one's (chained): the next step starts from each sequence's length on the device
(`row_lens`), its slots cover both steps' rounds, and the host reads, records and makes text
while the GPU runs rounds. The host's view of a sequence lags the device's by a step.
"""

from __future__ import annotations

import bisect
import math
import time
from typing import Any

import numpy as np
import torch

from vibee.runtime.round_kernels import finish_round, prepare_round
from vibee.runtime.sampling_kernel import gumbel_sample

MAX_ROUNDS = 8  # rounds per engine step: fewer host syncs, against wasted rounds after a stop and coarser streaming


def _seconds(fn, repeats: int) -> float:
    """Mean seconds of fn(), after a few untimed calls: CUDA events on a GPU, a clock elsewhere."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


class DeviceRounds:
    def __init__(self, proposer: Any, graphs: Any, *, k: int, max_rows: int, max_model_len: int,
                 block_size: int, padding_slot: int, device: str, sample: bool = False, seed: torch.Tensor | None = None,
                 grammar: Any = None):
        """proposer: a round's drafts on fixed shapes (NgramProposer, draft_rounds.DraftModelProposer,
        PlainProposer); graphs: the engine's DecodeGraphs (their buffers are the verification's
        inputs); k: the drafts per round; max_rows: the most sequences one step holds (their k + 1
        rows each fit the largest decode graph). sample: each row's token is drawn at its
        sequence's temperature (sampling_kernel.py; 0: argmax) instead of the graph's argmax, with
        noise from `seed` (int64 [1] on the device, advanced every round); only without drafts.
        grammar: the token-DFA table (grammar_table.GrammarTable): with sample, each row's logits are
        masked by its state's row before the draw, and the state advanced by the token drawn.
        Without drafts nothing reads a sequence's older tokens: its row keeps the last two."""
        if sample and k:
            raise ValueError("rounds that verify drafts do so greedily: sample only without drafts (k = 0)")
        if not 1 <= max_rows * (k + 1) <= graphs.sizes[-1]:
            raise ValueError(f"{max_rows} sequences of {k + 1} rows do not fit a graph of {graphs.sizes[-1]} rows")
        self.proposer, self.graphs = proposer, graphs
        self.k = k
        self.block_size, self.padding_slot, self.device = block_size, padding_slot, device
        self.max_rows = max_rows
        # A round writes up to k + 1 tokens past a length below max_model_len.
        width = max_model_len + k + 1 if k else 2
        # Each sequence's tokens, one row per sequence; a step gathers its sequences' rows into
        # `work`, which the rounds read and append to, and puts them back after the last round.
        # Twice the seats: a sequence that ends (or is preempted) in the step in flight keeps its
        # row until the host reads that step, while the next step may already seat another.
        row_slots = 2 * max_rows
        self.tokens = torch.zeros(row_slots, width, dtype=torch.int32, device=device)
        self.work = torch.zeros(self.max_rows, width, dtype=torch.int32, device=device)
        self.lens = torch.zeros(self.max_rows, dtype=torch.long, device=device)  # 0: a padding row
        self.row_lens = torch.zeros(row_slots, dtype=torch.long, device=device)  # each row's length after its last step
        # A sequence stops growing at its limit: the slots the scheduler gave it for the step.
        self.limits = torch.zeros(self.max_rows, dtype=torch.long, device=device)
        self.sample = sample
        self.seed = seed
        if grammar is not None and not sample:
            raise ValueError("only sampling rounds (k = 0) take a grammar")
        self.grammar = grammar
        self.grammar_states = torch.zeros(self.max_rows, dtype=torch.long, device=device)  # table rows; 0: free
        self.temperatures = torch.zeros(graphs.sizes[-1], dtype=torch.float32, device=device)  # per graph row
        self.allow = torch.zeros(self.max_rows, dtype=torch.long, device=device)
        self.last = torch.zeros(self.max_rows, k + 3, dtype=torch.long, device=device)  # targets, drafted, accepted
        self._rows: dict[int, list[int]] = {}  # seq_id -> [row, how many of its tokens the row holds]
        self._planned: dict[int, int] = {}  # seq_id -> tokens the planned step may emit
        self._emitted = (0.0, 0.0)  # tokens emitted and live rounds run, each step's decayed by 0.9
        self.num_steps = self.num_rounds = 0  # engine steps that ran rounds, and their rounds
        self.catch_up_tokens = 0  # what the proposer computed before the last step's rounds
        self._free = list(range(row_slots - 1, -1, -1))
        self.sizes = [b for b in graphs.sizes if b <= self.max_rows] or [self.max_rows]
        if self.max_rows not in self.sizes:
            self.sizes.append(self.max_rows)
        self.round_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if device.startswith("cuda") and graphs.pool is not None:
            self._capture()

    def _capture(self) -> None:
        """A graph of one round per batch size, in the decode graphs' memory pool; on failure rounds
        run op by op (slower, same tokens)."""
        try:
            with torch.inference_mode():
                for batch in reversed(self.sizes):
                    self.lens.zero_()  # padding rows only: every K/V goes to the padding slot
                    self._pad_rows(0, self.graphs.size_for(batch * (self.k + 1)))
                    for _ in range(2):
                        self._round(batch)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.graphs.pool):
                        self._round(batch)
                    self.round_graphs[batch] = graph
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - any capture failure leaves the eager rounds, which work
            import logging
            logging.getLogger("vibee.engine").warning("speculative rounds run op by op: graph capture failed: %s", exc)
            self.round_graphs = {}

    def plan(self, scheduler: Any, by_seq: dict[int, tuple[Any, Any]], *, max_num_batched_tokens: int,
             greedy_verification: bool, enabled: bool, in_flight: int = 0) -> int:
        """How many rounds the next step runs (0: the host drafts as before). Rounds need every
        running sequence decoding, verified greedily (temperature 0, or the spec's greedy rule)
        with no logprobs or penalties, room for every round's k + 1 tokens in the step's token
        budget, and no sequence that could join the step (a prefill would be the host's to run).
        When > 0, each running sequence holds its rounds' slots in placeholder drafts, which the
        scheduler allocates as lookahead: k + 1 a round, but no more than its max_tokens leaves
        (it stops there on the device). So a sequence near its end finishes in this step's
        rounds, instead of in steps of fewer rounds and then of host drafts, each a host sync.
        Near every sequence's end the step runs the rounds that the tokens emitted per round so
        far say it needs, and one more: a round past a sequence's end is a wasted forward.

        in_flight: rounds of a step whose tokens the host has not read yet (0: none). The next
        step's rounds then queue behind them (`start(chained=True)`), each sequence holding slots
        for both steps' rounds, as long as every sequence's slots fit in the free blocks (no
        preemption while tokens are unread) and the unread rounds likely leave a sequence tokens
        to emit; else 0, and the engine reads them first."""
        running, k = scheduler.running, self.k
        if not enabled or not running or len(running) > self.max_rows or \
                (scheduler.waiting and len(running) < scheduler.max_num_seqs):
            return 0
        rounds = min(MAX_ROUNDS, max_num_batched_tokens // (len(running) * (k + 1)) - in_flight)
        longest = 0  # the most tokens any sequence may still emit: more rounds would emit nothing
        for seq in running:
            params = by_seq[seq.seq_id][0].params
            if not seq.output_token_ids or seq.num_tokens - seq.num_computed_tokens != 1 or params.has_penalties \
                    or params.logprobs is not None or not (params.is_greedy or greedy_verification):
                return 0
            longest = max(longest, seq.max_tokens - len(seq.output_token_ids))
        per_round = self.emitted_per_round()
        left = longest - in_flight * per_round  # what the unread rounds likely left to emit
        if left <= 0:
            return 0
        rounds = min(rounds, 1 + math.ceil(left / per_round))
        if rounds < 1:
            return 0
        planned = {seq.seq_id: min((in_flight + rounds) * (k + 1), seq.max_tokens - len(seq.output_token_ids))
                   for seq in running}
        if in_flight and not self.slots_fit(scheduler.block_space, running, planned):
            return 0
        self._planned = planned
        for seq in running:
            seq.draft_token_ids = [seq.output_token_ids[-1]] * (planned[seq.seq_id] - 1)
        return rounds

    @staticmethod
    def slots_fit(space: Any, running: list[Any], planned: dict[int, int]) -> bool:
        """Whether the free blocks hold every running sequence's planned slots at once: then the
        scheduler gives each all of them and preempts none."""
        needed = sum(space.num_blocks_to_allocate(seq.seq_id, seq.token_prefix(seq.num_tokens), planned[seq.seq_id] - 1)
                     for seq in running)
        return needed <= space.num_free_blocks()

    def emitted_per_round(self) -> float:
        """Tokens a sequence's round has emitted lately (1 until measured: each round emits one or more)."""
        tokens, rounds = self._emitted
        return max(1.0, tokens / rounds) if rounds else 1.0

    def fits(self, sched: Any, num_running: int) -> bool:
        """Whether the scheduler gave the step what `plan` asked for: every running sequence, each
        with all its placeholder drafts, and nothing else (no preemption, no swap)."""
        planned = self._planned
        return (len(sched.scheduled) == num_running and not sched.preempted and not sched.swap_out
                and not sched.swap_in and all(not item.is_prefill and len(item.draft_token_ids) + 1 == planned.get(
                    item.seq.seq_id) for item in sched.scheduled))

    @staticmethod
    def unplan(sched: Any) -> None:
        """The step was not scheduled as planned: its sequences decode plainly instead (their
        placeholder drafts are no drafts); the slots held for the rounds stay theirs as lookahead."""
        for item in sched.scheduled:
            if item.draft_token_ids:
                item.num_new_tokens -= len(item.draft_token_ids)
                item.draft_token_ids = ()

    def start(self, seqs: list[Any], tables: np.ndarray, allowed: list[bool], rooms: list[int], caps: list[int],
              rounds: int, temperatures: list[float] | None = None, chained: bool = False,
              grammar_slots: list[int] | None = None) -> tuple:
        """Queue `rounds` rounds for these sequences and the copy of what they emit to the host;
        finish() reads it. Each sequence stops at its length + rooms[i] or at caps[i], whichever
        is less (the slots the scheduler holds for it; its prompt plus max_tokens);
        temperatures: each one's (rounds that sample). chained: the rounds queue behind rounds
        whose tokens the host has not read: each sequence starts from the length those leave it,
        known only on the device (the host's tokens lag theirs). grammar_slots: each sequence's
        slot of the grammar table (0: unconstrained), whose state the rounds start from and leave
        advanced by the tokens they emit."""
        k, graphs = self.k, self.graphs
        real = len(seqs)
        batch = self.sizes[bisect.bisect_left(self.sizes, real)]  # padded with rows of length 0
        rows = self._upload_missing(seqs)
        if not k:  # without drafts a sequence grows to its limit, unless a stop (it then ends): known now
            for seq, room, cap in zip(seqs, rooms, caps):
                self._rows[seq.seq_id][1] = min(seq.num_tokens + room, cap)
        self.catch_up_tokens = self.proposer.before(seqs, tables)  # a prefill of the drafter's
        w = tables.shape[1]
        temps = [] if temperatures is None else np.asarray(temperatures, dtype=np.float64).view(np.int64)
        slots = [] if self.grammar is None else (grammar_slots or [0] * real)
        host = np.concatenate([rows, [seq.num_tokens for seq in seqs], rooms, caps, np.asarray(allowed, dtype=np.int64),
                               temps, slots, tables.reshape(-1)]).astype(np.int64)
        sent = torch.from_numpy(host).to(self.device, non_blocking=True)
        rows_d = sent[:real]
        self.lens[:batch].zero_()
        self.lens[:real] = self.row_lens[rows_d] if chained else sent[real: 2 * real]
        torch.minimum(self.lens[:real] + sent[2 * real: 3 * real], sent[3 * real: 4 * real], out=self.limits[:real])
        self.allow[:real] = sent[4 * real: 5 * real]
        at = 5 * real
        if temperatures is not None:
            self.temperatures[:real] = sent[at: at + real].view(torch.float64)
            self.temperatures[real:].zero_()
            at += real
        if self.grammar is not None:
            slots_d = sent[at: at + real]
            self.grammar_states[:real] = self.grammar.states[slots_d]
            self.grammar_states[real:].zero_()
            at += real
        self.work[:real] = self.tokens[rows_d]
        # Graph row s * (k + 1) + j is sequence s's token j (its decode token, then its drafts);
        # rows past the sequences' are padding: one token in block 0 whose K/V go to the padding slot.
        n, b = real * (k + 1), graphs.size_for(batch * (k + 1))
        graphs.block_tables[:n, :w] = sent[at:].view(real, w).repeat_interleave(k + 1, dim=0)
        self._pad_rows(n, b)
        out = torch.empty(rounds, real, k + 3, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for r in range(rounds):
                if batch in self.round_graphs:
                    self.round_graphs[batch].replay()
                else:
                    self._round(batch)
                out[r] = self.last[:real]
        self.tokens[rows_d] = self.work[:real]
        self.row_lens[rows_d] = self.lens[:real]
        if self.grammar is not None:
            self.grammar.states[slots_d] = self.grammar_states[:real]
        if out.is_cuda:
            host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host_out.copy_(out, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host_out, copied = out, None
        self.num_steps += 1
        self.num_rounds += rounds
        return seqs, host_out, copied

    def finish(self, started: tuple) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """What start()'s rounds emitted: each sequence's tokens, and per sequence the (drafted,
        accepted) counts of each round it was not done in. Waits for them."""
        seqs, host_out, copied = started
        if copied is not None:
            copied.synchronize()  # the step's one wait for the device
        result = host_out.numpy()
        k = self.k
        if k == 0:  # one token a round until a sequence is done (accepted -1 from then on)
            made = (result[:, :, 2] >= 0).sum(axis=0).tolist()
            emitted = [tokens[:n] for tokens, n in zip(result[:, :, 0].T.tolist(), made)]
            counts = [[(0, 0)] * n for n in made]
        else:
            emitted = [[] for _ in seqs]
            counts = [[] for _ in seqs]
            for r in range(len(result)):
                for s in range(len(seqs)):
                    accepted = int(result[r, s, k + 2])
                    if accepted >= 0:
                        emitted[s] += result[r, s, : accepted + 1].tolist()
                        counts[s].append((int(result[r, s, k + 1]), accepted))
        self._emitted = 0.9 * self._emitted[0] + sum(map(len, emitted)), 0.9 * self._emitted[1] + sum(map(len, counts))
        if k:  # k = 0: counted at start
            # Read a step late, a sequence may be gone (finished, aborted) and its row another's.
            live = [(seq, tokens) for seq, tokens in zip(seqs, emitted) if seq.seq_id in self._rows]
            self.proposer.after([seq for seq, _ in live], [tokens for _, tokens in live])
            for seq, tokens in live:
                self._rows[seq.seq_id][1] += len(tokens)
        return emitted, counts

    def _pad_rows(self, n: int, b: int) -> None:
        """Graph rows n .. b-1 (past the step's sequences, padding b's captured size): one token
        in block 0 whose K/V go to the padding slot; no row takes a sampled token as input."""
        graphs = self.graphs
        graphs.block_tables[n:b].zero_()
        graphs.input_ids[n:b] = 0
        graphs.positions[n:b] = 0
        graphs.slot_mapping[n:b] = self.padding_slot
        graphs.seq_lens[n:b] = 1
        graphs.sources[:b] = -1

    def _round(self, batch: int) -> None:
        """One round for the first `batch` rows of work/lens/allow (rows of length 0 are padding),
        on fixed shapes, reading and writing only device buffers: draft, write the verification
        rows, run the decode forward of graph size b, accept, append, record in `last`."""
        graphs = self.graphs
        b = graphs.size_for(batch * (self.k + 1))
        work, lens = self.work[:batch], self.lens[:batch]
        limits = self.limits[:batch]
        drafts, num_drafts = self.proposer.propose(work, lens, limits)
        prepare_round(work, lens, limits, self.allow[:batch], drafts, num_drafts, graphs.block_tables,
                      block_size=self.block_size, padding_slot=self.padding_slot, input_ids=graphs.input_ids,
                      positions=graphs.positions, slot_mapping=graphs.slot_mapping, seq_lens=graphs.seq_lens)
        _, logits = graphs.forward(b)
        if self.sample:
            if self.grammar is not None:
                self.grammar.mask(logits[:batch], self.grammar_states[:batch])
            gumbel_sample(logits, self.temperatures[:b], self.seed, out=graphs.sampled[:b])
            self.seed.add_(1)
        finish_round(drafts, num_drafts, graphs.sampled, work, lens, limits, self.last)
        if self.grammar is not None:  # a row's state moves by the token it emitted (none once done)
            states = self.grammar_states[:batch]
            moved = self.grammar.advance(states, graphs.sampled[:batch])
            self.grammar_states[:batch] = torch.where(self.last[:batch, 2] >= 0, moved, states)

    @torch.inference_mode()
    def step_times(self, repeats: int = 50) -> dict[str, float]:
        """Seconds one replay takes, with nothing running (every row padding): a plain one-token
        decode step, a verification of k + 1 rows and a whole round, at batch 1 (GPU time by
        CUDA events on a GPU, wall time elsewhere). A round less its verification is its
        drafting: with a draft model, k of its steps (the c of the speed-up formula)."""
        graphs, b = self.graphs, self.sizes[0]
        self.lens.zero_()
        self._pad_rows(0, graphs.sizes[-1])
        replay = self.round_graphs[b].replay if b in self.round_graphs else (lambda: self._round(b))
        step = graphs.graphs[graphs.size_for(1)].replay
        verify = graphs.graphs[graphs.size_for(self.k + 1)].replay
        return {"step": _seconds(step, repeats), "verify": _seconds(verify, repeats), "round": _seconds(replay, repeats)}

    def figures(self) -> dict[str, Any]:
        return {"steps": self.num_steps, "rounds": self.num_rounds, "max_rounds": MAX_ROUNDS,
                "captured": sorted(self.round_graphs)}

    def _upload_missing(self, seqs: list[Any]) -> list[int]:
        """Each sequence's row, after copying in the tokens it gained on the host (its prompt, and
        tokens of steps the host ran) in one copy."""
        rows, index, values = [], [], []
        width = self.tokens.shape[1]
        for seq in seqs:
            entry = self._rows.get(seq.seq_id)
            if entry is None:
                entry = self._rows[seq.seq_id] = [self._free.pop(), 0]
            row, held = entry
            held = min(held, seq.num_tokens)  # a row never holds more than the sequence has
            if held < seq.num_tokens:
                held = max(held, seq.num_tokens - width)  # a ring keeps the latest `width` tokens
                index.append(row * width + np.arange(held, seq.num_tokens) % width)
                values.append(np.asarray(seq.token_prefix(seq.num_tokens)[held:], dtype=np.int32))
                entry[1] = seq.num_tokens
            rows.append(row)
        if index:
            flat = self.tokens.view(-1)
            # Not blocking: a blocking copy would wait for the step still running (a multi-step in flight).
            flat[torch.from_numpy(np.concatenate(index)).to(self.device, non_blocking=True)] = \
                torch.from_numpy(np.concatenate(values)).to(self.device, non_blocking=True)
        return rows

    def forget(self, seq_id: int) -> None:
        self.proposer.forget(seq_id)
        entry = self._rows.pop(seq_id, None)
        if entry is not None:
            self._free.append(entry[0])
