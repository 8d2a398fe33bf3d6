"""Predicted speed-up of speculative decoding, the one copy of the formulas: `vibee explain` prints
them and the generated module re-exports them for the engine's stats and the ablation benchmark."""

from __future__ import annotations


def check_acceptance(acceptance_rate: float) -> None:
    if not 0.0 <= acceptance_rate <= 1.0:
        raise ValueError(f"an acceptance rate lies between 0 and 1, got {acceptance_rate}")


def claimed_speedup(acceptance_rate: float, k: int) -> float:
    """The original design's formula 1 / (1 - a + a / k). It ignores the draft's cost and that a
    rejection ends the draft. (The design's example says a = 0.8, k = 5 gives about 2.3; the
    formula gives 1 / 0.36 = 2.78.)"""
    check_acceptance(acceptance_rate)
    return 1.0 / (1.0 - acceptance_rate + acceptance_rate / k)


def expected_tokens_per_step(acceptance_rate: float, k: int) -> float:
    """Tokens one target forward emits when each of k draft tokens survives with probability a,
    independently: sum_{j=0..k} a^j = (1 - a^(k+1)) / (1 - a); exactly k + 1 at a = 1."""
    check_acceptance(acceptance_rate)
    if acceptance_rate == 1.0:
        return float(k + 1)
    return (1.0 - acceptance_rate ** (k + 1)) / (1.0 - acceptance_rate)


def expected_speedup(acceptance_rate: float, k: int, draft_cost: float = 0.0) -> float:
    """The standard form E[tokens per target step] / (1 + k * c), c the cost of one draft step
    relative to one target step (0 for n-gram drafts); 1 / (1 + k * c) at a = 0."""
    if draft_cost < 0:
        raise ValueError(f"draft_cost is a relative cost, at least 0, got {draft_cost}")
    return expected_tokens_per_step(acceptance_rate, k) / (1.0 + k * draft_cost)
