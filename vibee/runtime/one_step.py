"""One step launched eagerly (not as rounds on the device): its prefill accounted, the forward
queued, its plain rows' sampling queued, and the scheduler advanced, with placeholders when the
next step may be launched before these tokens are read, else with the tokens themselves (drafts'
verification needs them now)."""

from __future__ import annotations

import time
from typing import Any

from vibee.runtime.launched_step import PLACEHOLDER, LaunchedStep
from vibee.runtime.sampler import SamplingRow


def launch_step(sched: Any, previous: LaunchedStep | None, runner: Any, sampler: Any, speculator: Any, scheduler: Any,
                by_seq: dict, can_overlap: bool, counters: tuple[float, int, int]) -> LaunchedStep:
    """Launch the scheduled step `sched`; previous: the step in flight, whose placeholders the
    runner reads on the device; counters: (start time, prefix-cache queries, hits) at scheduling."""
    t0, queries0, hits0 = counters
    now = time.monotonic()
    new_prompt_tokens = computed_prefill = 0
    for item in sched.scheduled:
        if item.is_prefill:  # a sequence's first step always is
            computed_prefill += item.num_new_tokens
            req = by_seq[item.seq.seq_id][0]
            if req.first_scheduled_time is None:
                new_prompt_tokens += len(req.prompt_token_ids)
                req.first_scheduled_time = now
                # Admission set num_computed_tokens to the prompt tokens the prefix cache had.
                req.num_cached_tokens = item.seq.num_computed_tokens

    plan, logits, rows_argmax = runner.run(sched, previous.placeholders if previous is not None else {})
    # (sequence, first logits row, drafts, request, choice) of each sequence that samples.
    sampling = [(seq, row, drafts, *by_seq[seq.seq_id]) for seq, row, drafts in plan]
    # Plain rows sample one token; speculative rows verify their drafts (k + 1 logits each).
    plain = [s for s in sampling if not s[2]]
    pending = None
    if plain:
        params = [req.params for _, _, _, req, _ in plain]
        # Every row plain: the logits are theirs, in order; no gather (its index copy waits for the GPU).
        x = logits if len(plain) == len(logits) else logits[[row for _, row, _, _, _ in plain]]
        if rows_argmax and len(plain) == len(logits) and all(p.is_greedy and not p.has_penalties for p in params):
            # The graph's argmax is what sample() would pick: only the copies are queued.
            pending = sampler.launch_for(x, runner.sampled[: len(plain)], params)
        else:
            pending = sampler.launch(x, [SamplingRow(req.params, req.prompt_token_ids, seq.output_token_ids,
                                                     choice.generator, seq.stop_token_ids, choice.constraint)
                                         for seq, _, _, req, choice in plain])
            if len(plain) == len(sampling):  # where the next step reads them; not over a verifying step's argmax
                runner.sampled[: len(plain)].copy_(pending.tokens)
    before = [len(s[0].output_token_ids) for s in sampling]
    launched = LaunchedStep(sched, sampling, before, pending, None, {}, t0, new_prompt_tokens, computed_prefill,
                            queries0, hits0)
    if pending is not None and len(plain) == len(sampling) and can_overlap:
        launched.placeholders = {s[0].seq_id: j for j, s in enumerate(plain)}
        scheduler.update(sched, dict.fromkeys(launched.placeholders, PLACEHOLDER))
        return launched
    # Read now: the drafts' verification decides what the step emitted.
    plain_results = sampler.collect(pending) if pending is not None else []
    results = {s[0].seq_id: [r] for s, r in zip(plain, plain_results)}
    sampled: dict[int, Any] = {seq_id: rs[0].token_id for seq_id, rs in results.items()}
    # A graph's argmax of every row: greedy verification needs no logits on the host.
    targets = runner.sampled[: len(logits)].tolist() if rows_argmax and len(plain) < len(sampling) else None
    for seq, row, drafts, _, _ in sampling:
        if drafts:
            req, choice = by_seq[seq.seq_id]
            results[seq.seq_id] = speculator.verify(
                req, choice, drafts, logits[row: row + len(drafts) + 1],
                None if targets is None else targets[row: row + len(drafts) + 1], sampler)
            sampled[seq.seq_id] = [r.token_id for r in results[seq.seq_id]]
    launched.results = results
    scheduler.update(sched, sampled)
    return launched
