"""The rules the scheduler's settings obey, in one place: the config model checks a spec's values
with them (errors positioned at the key), and the generated Scheduler checks the values the
runtime passes it (a ValueError), without the IR."""

from __future__ import annotations

POLICIES = ("fcfs", "priority", "fair")
PREEMPTION_MODES = ("recompute", "swap")


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def check_max_num_seqs(max_num_seqs: int) -> None:
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}")


def check_budget(max_num_batched_tokens: int, max_num_seqs: int | None) -> None:
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be at least 1, got {max_num_batched_tokens}")
    if max_num_seqs is not None and max_num_batched_tokens < max_num_seqs:
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_num_seqs ({max_num_seqs}): "
            "every running sequence needs one token of a step's budget to decode"
        )


def check_threshold(threshold: int, enable_chunked_prefill: bool | None, max_num_batched_tokens: int | None) -> None:
    if threshold < 0:
        raise ValueError(f"long_prefill_token_threshold must be 0 (off) or a positive token count, got {threshold}")
    if threshold and enable_chunked_prefill is False:
        raise ValueError(
            "long_prefill_token_threshold caps prefill chunks, which needs enable_chunked_prefill: true "
            "(or set long_prefill_token_threshold: 0)"
        )
    if max_num_batched_tokens is not None and threshold > max_num_batched_tokens:
        raise ValueError(
            f"long_prefill_token_threshold ({threshold}) is above max_num_batched_tokens ({max_num_batched_tokens}), "
            f"so it would never cap a chunk; use at most {max_num_batched_tokens}, or 0 to turn it off"
        )


def check_watermark(watermark: float) -> None:
    if not 0.0 <= watermark < 1.0:
        raise ValueError(f"watermark is the fraction of KV blocks kept free, so 0 <= watermark < 1; got {watermark}")


def check_preemption_mode(preemption_mode: str) -> None:
    if preemption_mode not in PREEMPTION_MODES:
        raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {preemption_mode!r}")


def check_swap_space(swap_space_gib: float, preemption_mode: str | None) -> None:
    if swap_space_gib < 0:
        raise ValueError(f"swap_space_gib is GiB of host memory, so at least 0; got {swap_space_gib}")
    if preemption_mode == "swap" and swap_space_gib == 0:
        raise ValueError("preemption_mode swap needs host memory to swap to: set swap_space_gib above 0 "
                         "(vLLM's default is 4), or use preemption_mode: recompute")


def check_swap_slots(num_swap_slots: int) -> None:
    if num_swap_slots < 0:
        raise ValueError(f"num_swap_slots is a count of host KV blocks, so at least 0; got {num_swap_slots}")


def check_scheduler_settings(*, policy: str, max_num_seqs: int, max_num_batched_tokens: int,
                             enable_chunked_prefill: bool, long_prefill_token_threshold: int, watermark: float,
                             preemption_mode: str, num_swap_slots: int) -> None:
    """Every rule at once, for settings given together (the Scheduler's arguments)."""
    check_policy(policy)
    check_max_num_seqs(max_num_seqs)
    check_budget(max_num_batched_tokens, max_num_seqs)
    check_threshold(long_prefill_token_threshold, enable_chunked_prefill, max_num_batched_tokens)
    check_watermark(watermark)
    check_preemption_mode(preemption_mode)
    check_swap_slots(num_swap_slots)


def check_scheduler_steps(num_scheduler_steps: int) -> None:
    if num_scheduler_steps < 1:
        raise ValueError(f"num_scheduler_steps is decode steps per host round trip, so at least 1; got {num_scheduler_steps}")
