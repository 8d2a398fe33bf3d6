"""Config of the continuous_batch kind: the iteration-level scheduler that decides, every engine
step, which sequences run and how many of their tokens. Every knob is a runtime value: the
runtime passes the resolved values to the generated Scheduler, which checks them with the same
rules (limits.py)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import ValidationInfo, field_validator

from vibee.ir.spec import KindConfig, knob
from vibee.kinds.continuous_batch import limits


class ContinuousBatchConfig(KindConfig):
    KIND: ClassVar[str] = "continuous_batch"
    BEHAVIORS: ClassVar[dict[str, str]] = {
        "add": "Scheduler.add: queue a new sequence, refusing one that could never fit",
        "schedule": "Scheduler.schedule: pick the sequences and token counts of the next step within the limits",
        "chunked_prefill": "Scheduler._chunk_limit: split a long prompt over several steps within the token budget",
        "preempt": "Scheduler._preempt: take a running sequence's blocks and requeue it, recomputed or swapped back in",
        "update": "Scheduler.update: append the sampled tokens, finish sequences at max_tokens or a stop token",
        "abort": "Scheduler.abort: drop a sequence wherever it is and free its blocks",
        "can_ever_fit": "Scheduler.can_ever_fit: whether a sequence at its longest fits in the KV cache",
        "stats": "Scheduler.stats: queue sizes, preemptions and the last step's batch",
    }
    # What a spec test case may say; templates/test.py.j2 gives each key its meaning.
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "num_requests",  # how many requests (default: len(prompt_lens))
            "prompt_lens",  # prompt length of each request, or one length for all
            "max_tokens",  # output tokens each request may generate (a list or one number; default 4)
            "priorities",  # priority of each request (lower runs sooner under policy: priority)
            "share_ranks",  # each sequence's place among its client request's (policy fair serves rank 0s first)
            "arrival_steps",  # engine step at which each request is added (default: all before step 0)
            "stop_token_ids",  # token ids that finish a sequence when sampled (shared by every request)
            "num_blocks",  # KV blocks of the test's block space (default: enough for every request at once)
            "block_size",  # tokens per KV block of the test's block space (default 16)
            "prefix_hit_tokens",  # the block space reports this many leading tokens as prefix-cache hits
            "seed",  # seed of the random prompt token ids
            # Scheduler settings that override the spec's config for this case only:
            "policy",
            "max_num_seqs",
            "max_num_batched_tokens",
            "enable_chunked_prefill",
            "long_prefill_token_threshold",
            "watermark",
            "preemption_mode",
            "num_swap_slots",  # host slots (blocks) of the swap space the engine would size from swap_space_gib
        }
    )
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "all_finished",  # true: every request finishes; false: some are refused at add time (the rest finish)
            "num_rejected",  # exactly this many requests are refused at add time
            "min_preemptions",  # at least this many preemptions happen (blocks are scarce)
            "max_preemptions",  # at most this many (0: blocks are plentiful)
            "max_steps",  # every request finishes within this many engine steps (requests really batch)
            "peak_batch_size",  # the most sequences scheduled in one step
            "first_step_tokens",  # tokens scheduled in the first step
            "prefill_chunks",  # the first request's prefill chunk sizes, in order
            "admission_order",  # request indices in the order they are first scheduled
            "min_swap_outs",  # at least this many preemptions copy the victim's KV to the host
            "max_swap_outs",  # at most this many (0: the swap space is too small, every preemption recomputes)
        }
    )

    policy: Literal["fcfs", "priority", "fair"] = knob("runtime", flag="--scheduling-policy",
        default="fcfs",
        description="Order of service: 'fcfs' (first come, first served), 'priority' (lower Sequence.priority "
        "first, then arrival) or 'fair' (client requests take turns: every request's first sequence before any "
        "request's second, by Sequence.share_rank, then arrival). The same order picks preemption victims, "
        "from the back.",
    )
    max_num_seqs: int = knob("runtime", flag="--max-num-seqs", aliases=("--batch-size",), default=256, strict=True, description="Most sequences running at once (the decode batch size).")
    max_num_batched_tokens: int = knob("runtime", flag="--max-num-batched-tokens",
        default=8192,
        strict=True,
        validate_default=True,
        description="Token budget of one step: prompt tokens being prefilled plus one per decoding sequence.",
    )
    enable_chunked_prefill: bool = knob("runtime", flag="--enable-chunked-prefill",
        default=True,
        strict=True,
        description="Split prompts longer than the step's remaining budget over several steps. When false a "
        "prompt is prefilled in one step, so a request whose prompt (or its recompute after preemption) "
        "exceeds max_num_batched_tokens is refused when added.",
    )
    long_prefill_token_threshold: int = knob("runtime", flag="--long-prefill-token-threshold",
        default=0,
        strict=True,
        validate_default=True,
        description="Most prompt tokens one sequence may prefill in a step, so one long prompt cannot take "
        "the whole budget from the others (0 = no cap beyond the budget). Needs chunked prefill.",
    )
    watermark: float = knob("runtime",
        0.01,
        strict=True,
        description="Fraction of KV blocks (0 <= w < 1) kept free when admitting new sequences, so running "
        "sequences can grow without being preempted at once.",
    )

    preemption_mode: Literal["recompute", "swap"] = knob("runtime", flag="--preemption-mode",
        default="recompute",
        description="What a preempted sequence loses: 'recompute' frees its KV blocks and prefills it again on "
        "return; 'swap' copies its KV blocks to pinned host memory and back (recompute when the swap space is full).",
    )
    swap_space_gib: float = knob("runtime", flag="--swap-space",
        default=4.0,
        strict=True,
        validate_default=True,
        description="GiB of pinned host memory for the KV blocks of swapped-out sequences (preemption_mode swap).",
    )

    num_scheduler_steps: int = knob("runtime", flag="--num-scheduler-steps",
        default=8,
        strict=True,
        validate_default=True,
        description="Decode steps the engine runs on the device per host round trip while every running "
        "sequence decodes plainly (temperature only) and none waits to join: the host schedules, packs and "
        "reads once per that many tokens of each sequence. 1: every step is scheduled on the host.",
    )

    # Checks that compare two settings sit on the later field (validated even when left at its
    # default), so an error points at a key of the config rather than at the whole section.
    @field_validator("max_num_seqs")
    @classmethod
    def _seqs_at_least_one(cls, value: int) -> int:
        limits.check_max_num_seqs(value)
        return value

    @field_validator("max_num_batched_tokens")
    @classmethod
    def _budget_covers_a_decode_batch(cls, value: int, info: ValidationInfo) -> int:
        limits.check_budget(value, info.data.get("max_num_seqs"))
        return value

    @field_validator("long_prefill_token_threshold")
    @classmethod
    def _threshold_caps_chunks(cls, value: int, info: ValidationInfo) -> int:
        limits.check_threshold(value, info.data.get("enable_chunked_prefill"), info.data.get("max_num_batched_tokens"))
        return value

    @field_validator("watermark")
    @classmethod
    def _watermark_is_a_fraction(cls, value: float) -> float:
        limits.check_watermark(value)
        return value

    @field_validator("num_scheduler_steps")
    @classmethod
    def _at_least_one_step(cls, value: int) -> int:
        limits.check_scheduler_steps(value)
        return value

    @field_validator("swap_space_gib")
    @classmethod
    def _swap_space_holds_blocks(cls, value: float, info: ValidationInfo) -> float:
        limits.check_swap_space(value, info.data.get("preemption_mode"))
        return value

    def prefill_tokens_per_seq_step(self) -> int:
        """Most prompt tokens one sequence computes in a step."""
        return self.long_prefill_token_threshold or self.max_num_batched_tokens

    def derived(self, shape=None) -> dict[str, str]:  # shape: the model explain is run for (unused here)
        per_seq = self.prefill_tokens_per_seq_step()
        if self.enable_chunked_prefill:
            prompts = f"any length, in chunks of at most {per_seq:,} tokens per sequence and step"
            long_prompt = f"{math.ceil(32768 / per_seq):,} steps"
        else:
            prompts = f"prompt + max_tokens - 1 <= {self.max_num_batched_tokens:,} tokens (prefilled in one step)"
            long_prompt = "1 step" if 32768 <= self.max_num_batched_tokens else "refused (longer than the step's budget)"
        victims = "latest-arrived" if self.policy == "fcfs" else "lowest-priority (then latest-arrived)"
        return {
            "tokens per step (worst case)": f"{self.max_num_batched_tokens:,}",
            "decoding sequences per step (max)": f"{self.max_num_seqs:,}",  # the budget covers them (validated)
            "prompts accepted": prompts,
            "a 32k-token prompt prefills in": long_prompt,
            "decode steps per host round trip": (f"{self.num_scheduler_steps} while the whole batch decodes plainly "
                                                 "(tokens stream in groups of up to that many)"
                                                 if self.num_scheduler_steps > 1 else "1 (every step scheduled on the host)"),
            "blocks kept free at admission": f"{self.watermark:.1%} of the cache "
            f"({int(self.watermark * 10_000):,} of 10,000 blocks)",
            "preemption": (f"recompute: the {victims} running sequence gives way first (its KV is freed and prefilled again)"
                           if self.preemption_mode == "recompute" else
                           f"swap: the {victims} running sequence gives way first (its KV goes to {self.swap_space_gib:g} GiB "
                           "of pinned host memory and comes back; recompute when that is full)"),
        }
