"""Speculative decoding around the engine's step: a drafter (n-gram, a draft model or Medusa heads) proposes
tokens for each decoding sequence, the target verifies them in its forward (greedy or rejection
sampling), and an acceptance tracker measures how often drafts hold."""

from __future__ import annotations

from typing import Any

import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.config import DEFAULT_DRAFT_MODEL_DIR, EngineConfig
from vibee.runtime.device_rounds import DeviceRounds
from vibee.runtime.draft_rounds import DraftModelProposer
from vibee.runtime.draft_runner import DraftRunner
from vibee.runtime.generated import GeneratedModules
from vibee.runtime.kv_sizing import worst_case_step
from vibee.runtime.loader import load_model_dir
from vibee.runtime.medusa_drafter import MedusaDrafter, heads_path
from vibee.runtime.model import build_model
from vibee.runtime.round_proposers import NgramProposer
from vibee.runtime.sampler import SampleResult, Sampler


MAX_REST_STEPS = 8  # the longest run of steps without drafting after empty proposals


class Speculator:
    """Drafter and acceptance tracker from the speculative_decode spec (built when --speculative)."""

    def __init__(self, gen: GeneratedModules, config: EngineConfig, target, *, dtype: torch.dtype,
                 device: str, block_size: int, progress: bool):
        self.gen = gen
        self.device = device
        self.block_size = block_size
        self.draft_model = None
        self.draft_dir = None
        self.medusa: MedusaDrafter | None = None
        spec = gen.configs.speculative_decode
        sd = gen.speculative_decode
        self.num_speculative_tokens = spec.num_speculative_tokens
        vocab_size = target.config.vocab_size
        if spec.method == "ngram":
            self.drafter = sd.NgramDrafter(spec.num_speculative_tokens, spec.ngram.min_n, spec.ngram.max_n)
        elif spec.method == "medusa":
            model_dir = None if config.shape is not None else config.model_dir
            self.drafter = self.medusa = MedusaDrafter(gen, target, heads_path(spec, model_dir), self.num_speculative_tokens,
                                                       dtype=dtype, device=device)
        else:
            builtin = config.model is None and config.shape is None
            draft_dir = config.draft_model or (DEFAULT_DRAFT_MODEL_DIR if builtin else None)
            if draft_dir is None:
                raise ValueError("speculative method draft_model needs --draft-model DIR (a model with the same tokenizer)")
            self.draft_dir = draft_dir
            loaded = load_model_dir(draft_dir, dtype=dtype, device=device, progress=progress)
            if loaded.config.vocab_size != vocab_size:
                raise ValueError(f"the draft model {draft_dir} has a vocabulary of {loaded.config.vocab_size} tokens, "
                                 f"the target {vocab_size}; they must share a tokenizer")
            self.draft_model = build_model(loaded, gen, flash_attn=config.flash_attn).eval()
            self.drafter = None  # the DraftRunner, once the KV cache is sized (start_draft_cache)
        self.acceptance = sd.AcceptanceTracker(spec.num_speculative_tokens)
        self.rounds: DeviceRounds | None = None  # rounds on the device, once the runner has graphs
        self.ngram_indexes: dict[int, Any] = {}  # seq_id -> its NgramIndex (n-gram drafts in O(n) a step)
        self.rest_steps = 0  # steps left without drafting (see propose)
        self.catch_up_tokens = 0  # tokens the draft model caught up on in this step (see drafter_prefilled)
        self._empty_proposals = 0  # proposals in a row that gave no sequence a draft
        # Per sequence: drafting stops while its recent acceptance is below the spec's threshold.
        self.gate = sd.SpeculationGate(spec.acceptance_threshold)

    def drafter_prefilled(self) -> bool:
        """Whether this step's draft model caught up on more than a step's tokens: a new
        sequence's prompt, or what it missed while decoding went on without it (a prefill of its
        own, which the speed gate does not time). Steady drafting catches up at most one token."""
        return self.catch_up_tokens > self.num_speculative_tokens

    def draft_bytes_per_block(self, block_size: int) -> int:
        """What one KV block costs the draft model's cache (0 for n-gram drafts): every block
        of the target's cache has one in the draft's, so the KV sizing counts both."""
        return 0 if self.draft_model is None else DraftRunner.bytes_per_token(self.draft_model) * block_size

    def start_draft_cache(self, kv_module, *, num_blocks: int, max_batched_tokens: int) -> None:
        """The draft model's own paged KV cache, as many blocks as the target's."""
        if self.draft_model is not None:
            self.drafter = DraftRunner(self.draft_model, kv_module, num_blocks=num_blocks, block_size=self.block_size,
                                       k=self.num_speculative_tokens, max_batched_tokens=max_batched_tokens)

    def start_rounds(self, graphs, *, max_num_seqs: int, max_model_len: int, padding_slot: int,
                     max_batched_tokens: int) -> None:
        """With n-gram or draft-model drafts and decode graphs: speculate in rounds on the device
        (device_rounds.py; the draft model's forwards in draft_rounds.py)."""
        spec = self.gen.configs.speculative_decode
        if graphs is None or spec.method not in ("ngram", "draft_model"):
            return
        k = self.num_speculative_tokens
        max_rows = max(1, min(max_num_seqs, spec.disable_by_batch_size or max_num_seqs, graphs.sizes[-1] // (k + 1)))
        if spec.method == "ngram":
            proposer = NgramProposer(self.gen.speculative_decode, self.drafter)
        else:
            proposer = DraftModelProposer(self.drafter, graphs, k=k, max_rows=max_rows, max_model_len=max_model_len,
                                          block_size=self.block_size, padding_slot=padding_slot,
                                          max_batched_tokens=max_batched_tokens)
        self.rounds = DeviceRounds(proposer, graphs, k=k, max_rows=max_rows, max_model_len=max_model_len,
                                   block_size=self.block_size, padding_slot=padding_slot, device=self.device)

    def plan_step(self, scheduler, by_seq, runner, max_num_batched_tokens: int) -> int:
        """The drafts of the next step, before it is scheduled: none while resting, rounds on the
        device where they can run (returns how many), else drafts from the host (returns 0)."""
        if self.resting(scheduler.running):
            self.rest(scheduler.running)
            return 0
        rounds = self.plan_rounds(scheduler, by_seq, max_num_batched_tokens)
        if not rounds:
            self.propose(scheduler.running, by_seq, runner)
        return rounds

    def plan_rounds(self, scheduler, by_seq, max_num_batched_tokens: int, in_flight: int = 0) -> int:
        """Rounds on the device for the next step (see DeviceRounds.plan); 0: draft on the host.
        in_flight: rounds of a step whose tokens are not read yet, which these would follow."""
        if self.rounds is None:
            return 0
        spec = self.gen.configs.speculative_decode
        enabled = self.gen.speculative_decode.speculation_enabled(len(scheduler.running), spec.disable_by_batch_size)
        rounds = self.rounds.plan(scheduler, by_seq, max_num_batched_tokens=max_num_batched_tokens,
                                  greedy_verification=spec.verification == "greedy", enabled=enabled,
                                  in_flight=in_flight)
        if rounds:  # drafting on the device ends a streak of empty host proposals (see propose)
            self._empty_proposals = 0
        return rounds

    def queue_rounds(self, seqs, tables, rounds: int, chained: bool) -> tuple:
        """Queue `rounds` rounds for these sequences on the device (read_rounds reads them);
        chained: behind rounds whose tokens are not read yet. The per-sequence gate does not
        learn from rounds: a round verifies k + 1 rows per sequence whatever it drafted (on the
        H200, 250 us a round against ~270 us for a plain host-bound step), so pausing a sequence
        there saves nothing and loses its later matches; whether rounds pay at all is the speed
        gate's to measure. A sequence the gate paused on the host still waits out its pause
        (rows masked)."""
        allowed = [self.gate.allows(seq.seq_id) for seq in seqs]
        room = rounds * (self.num_speculative_tokens + 1)
        started = self.rounds.start(seqs, tables, allowed, [room] * len(seqs),
                                    [len(seq.prompt_token_ids) + seq.max_tokens for seq in seqs], rounds,
                                    chained=chained)
        self.catch_up_tokens += self.rounds.catch_up_tokens
        return started

    def read_rounds(self, started: tuple) -> list[list[int]]:
        """Each sequence's tokens from queue_rounds' rounds (waits for them); the acceptance
        tracker counts every round that drafted."""
        emitted, counts = self.rounds.finish(started)
        for per_round in counts:
            for drafted, accepted in per_round:
                if drafted:
                    self.acceptance.update(drafted, accepted)
        return emitted

    def worst_case_draft_step(self, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> None:
        """The heaviest drafting a step can do (for memory profiling): a catch-up forward of the
        draft over as many tokens as a step holds; nothing for n-gram drafts."""
        if self.draft_model is None:
            return
        seq_lens, _, _ = worst_case_step(max_num_batched_tokens, max_num_seqs, max_model_len)
        batch = make_attention_batch(seq_lens, seq_lens, None, self.block_size, self.device)
        ids = torch.zeros(sum(seq_lens), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            hidden = self.draft_model(ids, batch.positions(), batch, None)
            self.draft_model.compute_logits(hidden[torch.arange(len(seq_lens), device=self.device)])

    def resting(self, running=()) -> bool:
        """Whether this step skips drafting: the last proposals were all empty, or the acceptance
        gate pauses every running sequence. A step that drafts needs the previous step's tokens
        on the host, so it cannot overlap it; a resting step can (it decodes like a plain one)."""
        return self.rest_steps > 0 or (bool(running) and all(self.gate.paused(seq.seq_id) for seq in running))

    def rest(self, running) -> None:
        """A step without drafting (while resting); it counts as a step of each paused sequence's pause."""
        for seq in running:
            seq.draft_token_ids = []
            self.gate.allows(seq.seq_id)
        self.rest_steps = max(0, self.rest_steps - 1)

    def propose(self, running, by_seq: dict[int, tuple[Any, Any]], runner) -> None:
        """Give each decoding sequence its draft tokens for this step (the scheduler verifies them);
        runner: the model runner, whose last step's hidden states Medusa heads draft from. When no
        sequence gets any, the next 1, 2, 4 ... MAX_REST_STEPS steps (doubling while proposals keep
        coming back empty) rest: they decode without drafting, overlapped like plain steps. A step
        with no sequence to draft for (only prefills) proposes nothing and counts for nothing: at
        batch 1 it made every request's first decode step a rest."""
        if not self._draft(running, by_seq, runner):
            return
        if any(seq.draft_token_ids for seq in running):
            self._empty_proposals = 0
        else:
            self.rest_steps = min(2 ** self._empty_proposals, MAX_REST_STEPS)
            self._empty_proposals += 1

    def _draft(self, running, by_seq: dict[int, tuple[Any, Any]], runner) -> bool:
        """Set each sequence's drafts; returns whether the step counts as a proposal (False: no
        sequence was decoding with room to draft)."""
        for seq in running:
            seq.draft_token_ids = []
        spec = self.gen.config("speculative_decode")
        if not self.gen.speculative_decode.speculation_enabled(len(running), spec.disable_by_batch_size):
            return True  # an empty proposal: resting steps overlap
        candidates = []
        for seq in running:
            req, _ = by_seq[seq.seq_id]
            room = seq.max_tokens - len(seq.output_token_ids) - 1
            # Penalties change the target distribution token by token; such requests decode plainly.
            if seq.output_token_ids and seq.num_tokens - seq.num_computed_tokens == 1 and room > 0 \
                    and not req.params.has_penalties and self.gate.allows(seq.seq_id):
                candidates.append((seq, room))
        if not candidates:
            return False
        if self.medusa is not None:
            for (seq, _), drafts in zip(candidates, self.medusa.propose(runner, candidates)):
                seq.draft_token_ids = drafts
        elif self.draft_model is None:
            for seq, room in candidates:
                index = self.ngram_indexes.get(seq.seq_id)
                if index is None:
                    index = self.ngram_indexes[seq.seq_id] = self.gen.speculative_decode.NgramIndex(self.drafter)
                index.extend(seq.token_prefix(seq.num_tokens)[len(index.tokens):])  # what it gained since
                seq.draft_token_ids = index.propose()[:room]
        else:
            # Greedy drafts: q is one-hot, which keeps rejection sampling exact at any temperature.
            if self.rounds is not None:
                # A sequence's last < k + 1 tokens after rounds (too few for a round) decode plainly:
                # drafting them on the host would first run the draft over the whole sequence.
                candidates = [(seq, room) for seq, room in candidates
                              if room > self.num_speculative_tokens or seq.seq_id in self.drafter.fed]
                if not candidates:
                    return True  # an empty proposal: resting steps overlap
                self.rounds.proposer.invalidate()  # the host writes the draft cache through its own blocks
            rows = self.drafter.propose([seq.token_prefix(seq.num_tokens) for seq, _ in candidates],
                                        [seq.seq_id for seq, _ in candidates])
            self.catch_up_tokens += self.drafter.catch_up_tokens
            for (seq, room), row in zip(candidates, rows):
                seq.draft_token_ids = row[:room]
        return True

    def verify(self, req, choice, drafts: tuple[int, ...], logits: torch.Tensor, targets: list[int] | None,
               sampler: Sampler) -> list[SampleResult]:
        """What a speculative step emits for one sequence: accepted drafts, then one token from
        the target (logits [k+1, V] at the decode token and each draft; targets: their argmax,
        when a CUDA graph computed it, so greedy verification needs nothing from the device)."""
        sd = self.gen.speculative_decode
        greedy = req.params.is_greedy or self.gen.configs.speculative_decode.verification == "greedy"
        if greedy and targets is not None:
            tokens = sd.greedy_accept(list(drafts), targets)
            self._record(choice.seq.seq_id, len(drafts), len(tokens) - 1)
            if req.params.logprobs is None:
                return [SampleResult(t, None, None) for t in tokens]
            return sampler.results_for(logits[: len(tokens)], torch.tensor(tokens, device=logits.device),
                                       [req.params] * len(tokens))
        draft = torch.tensor([drafts], dtype=torch.long, device=logits.device)
        if greedy:
            emitted, accepted = sd.greedy_verify(draft, logits[None])
        else:
            probs = sampler.probabilities(logits, req.params)
            generator = choice.generator or sampler.shared_generator(logits.device)
            emitted, accepted = sd.rejection_sample(draft, None, probs[None], generator)
        tokens = emitted[0]
        self._record(choice.seq.seq_id, len(drafts), len(tokens) - 1)
        return sampler.results_for(logits[: len(tokens)], torch.tensor(tokens, device=logits.device),
                                   [req.params] * len(tokens))

    def _record(self, seq_id: int, num_drafts: int, num_accepted: int) -> None:
        self.acceptance.update(num_drafts, num_accepted)
        self.gate.record(seq_id, num_drafts, num_accepted)
        if self.medusa is not None:  # its next drafts read the hidden state at the last accepted token
            self.medusa.record(seq_id, num_accepted)

    def preempted(self, seq_id: int) -> None:
        """A sequence lost its KV blocks: what lives beside them on the device goes too (its
        rounds' row, the draft's cache, Medusa's hidden state); the gate and the n-gram index,
        which only read its tokens, stay."""
        if self.rounds is not None:
            self.rounds.forget(seq_id)
        if self.medusa is not None:
            self.medusa.forget(seq_id)
        if self.draft_model is not None:
            self.drafter.forget(seq_id)

    def forget(self, seq_id: int) -> None:
        """A sequence finished or was aborted: the gate, the n-gram index and what preempted()
        drops go."""
        self.gate.forget(seq_id)
        self.ngram_indexes.pop(seq_id, None)
        self.preempted(seq_id)
