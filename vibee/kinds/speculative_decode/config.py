"""Config of the speculative_decode kind: how draft tokens are proposed and how the target model
verifies them. Every knob is a runtime value: the engine passes the resolved values to the
generated code."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vibee.ir.spec import KindConfig, knob
from vibee.kinds.speculative_decode.speedup import claimed_speedup, expected_speedup, expected_tokens_per_step

MAX_SPECULATIVE_TOKENS = 16
MAX_NGRAM = 8
# The acceptance rates `vibee explain` predicts the speed-up for when --acceptance is not given.
EXPLAIN_ACCEPTANCE_RATES = (0.5, 0.7, 0.8, 0.9)


class NgramConfig(BaseModel):
    """Prompt-lookup drafting: match the last n tokens against earlier context."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_n: int = Field(1, strict=True, description="Shortest suffix n-gram that may produce a proposal.")
    max_n: int = Field(3, strict=True, description="Longest suffix n-gram tried first; longer matches win.")

    @field_validator("min_n", "max_n")
    @classmethod
    def _within_limits(cls, value: int, info) -> int:
        if not 1 <= value <= MAX_NGRAM:
            raise ValueError(f"{info.field_name} must be between 1 and {MAX_NGRAM}, got {value}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> "NgramConfig":
        if self.min_n > self.max_n:
            raise ValueError(f"ngram.min_n ({self.min_n}) must not exceed ngram.max_n ({self.max_n})")
        return self


class SpeculativeDecodeConfig(KindConfig):
    KIND: ClassVar[str] = "speculative_decode"
    BEHAVIORS: ClassVar[dict[str, str]] = {
        "propose_ngram": "NgramDrafter.propose: prompt-lookup draft from the longest recent suffix match",
        "propose_draft_model": "DraftModelDrafter.propose: k tokens sampled autoregressively from a small draft model",
        "propose_medusa": "MedusaHeads.propose: k tokens at once, one per trained head, from the target's last hidden state",
        "rejection_sample": "rejection_sample: lossless speculative sampling of the target distribution",
        "greedy_verify": "greedy_verify: accept drafts while they equal the target argmax",
        "verify_draft": "verify_draft: the spec's verification rule applied to target logits",
        "track_acceptance": "AcceptanceTracker.update: running acceptance statistics",
        "speculation_enabled": "speculation_enabled: whether a batch of this size speculates",
        "gate_speculation": "SpeculationGate.allows: whether a sequence drafts, given its recent acceptance",
    }
    # What a spec test case may say; the generated test gives each key a meaning (see test.py.j2).
    TEST_INPUT_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "token_ids",  # n-gram proposal from this context
            "num_speculative_tokens",  # per-case override of k for the n-gram drafter
            "min_n",
            "max_n",
            "draft_tokens",  # [B][k] drafts for greedy verification
            "target_argmax",  # [B][k+1] target argmax per position for greedy verification
            "target_probs",  # target distribution over a small vocab (statistical verification)
            "draft_probs",  # draft distribution q; absent means a deterministic (n-gram) draft
            "draft_token",  # the deterministic draft token when draft_probs is absent
            "num_draws",
            "seed",
            "batch_size",  # speculation_enabled for a batch of this size
        }
    )
    TEST_EXPECTED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {
            "proposal",  # exact n-gram proposal
            "proposal_length",
            "output_tokens",  # greedy verification output per sequence
            "num_accepted",
            "acceptance_rate",  # stated rate; checked against sum_x min(p, q) and the sampler
            "rate_tolerance",  # allowed gap between sampled and stated acceptance rate
            "speculate",  # speculation_enabled(batch_size)
        }
    )

    method: Literal["ngram", "draft_model", "medusa"] = knob("runtime", flag="--speculative-method",
        default="ngram", description="Drafter: n-gram prompt lookup (no extra model), a small draft model, or "
        "medusa heads (trained heads on the target's last hidden state)."
    )
    num_speculative_tokens: int = knob("runtime", flag="--num-speculative-tokens",
        default=4, strict=True, description="Draft tokens proposed per step (k); the target verifies k + 1 positions."
    )
    ngram: NgramConfig = knob("runtime", default_factory=NgramConfig, description="n-gram sizes for prompt lookup.")
    verification: Literal["rejection_sampling", "greedy"] = knob("runtime",
        "rejection_sampling",
        description="rejection_sampling is lossless at any temperature (exact greedy matching at temperature 0); "
        "greedy accepts drafts only while they equal the target argmax.",
    )
    disable_by_batch_size: int | None = knob("runtime", flag="--speculative-disable-by-batch-size",
        default=None, strict=True, description="Turn speculation off for batches larger than this; null keeps it on."
    )

    medusa_heads: str | None = knob("runtime", flag="--medusa-heads",
        default=None, strict=True,
        description="The medusa heads file (safetensors) for method medusa; null: medusa_heads.safetensors "
        "in the served model's directory.",
    )

    acceptance_threshold: float = knob("runtime", flag="--speculative-acceptance-threshold",
        default=0.2, strict=True,
        description="A sequence whose recent drafts are accepted at a rate below this stops drafting, "
        "and drafts again after a pause to re-measure; 0 never stops.",
    )

    @field_validator("acceptance_threshold", mode="before")
    @classmethod
    def _threshold_is_a_rate(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `acceptance_threshold: 0` is a rate too
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(f"acceptance_threshold must be at least 0 and below 1, got {value}")
        return value

    @field_validator("num_speculative_tokens")
    @classmethod
    def _k_in_range(cls, value: int) -> int:
        if not 1 <= value <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {value}")
        return value

    @field_validator("disable_by_batch_size")
    @classmethod
    def _positive_batch(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"disable_by_batch_size must be a positive batch size or null, got {value}")
        return value

    def derived(self, shape=None, acceptance_rates=None) -> dict:  # shape: unused here
        """Figures for `vibee explain`; `acceptance_rates` (default EXPLAIN_ACCEPTANCE_RATES) are the
        per-token acceptance rates a the predicted speed-up is printed for."""
        k = self.num_speculative_tokens
        figures: dict = {
            "drafter": self.method
            + (f" (n = {self.ngram.max_n} down to {self.ngram.min_n})" if self.method == "ngram" else ""),
            "positions verified per target forward": str(k + 1),
        }
        # An n-gram draft runs no model (c = 0); a draft model's (or the heads') cost is measured, not known from the spec.
        cost = {"ngram": "c = 0: n-gram drafts run no model",
                "medusa": "c ~ 0: the heads are k small matmuls on the target's last hidden state",
                }.get(self.method, "c = 0 assumed: measure the draft model's cost")
        table = figures[f"predicted speed-up, k = {k} ({cost})"] = {}
        for alpha in acceptance_rates or EXPLAIN_ACCEPTANCE_RATES:
            table[f"acceptance {alpha}"] = {
                "tokens per target forward E": round(expected_tokens_per_step(alpha, k), 2),
                "original formula 1/(1-a+a/k)": round(claimed_speedup(alpha, k), 2),
                "standard form E/(1+k*c)": round(expected_speedup(alpha, k, 0.0), 2),
            }
        if self.disable_by_batch_size is not None:
            figures["speculation"] = f"off for batches larger than {self.disable_by_batch_size}"
        if self.acceptance_threshold > 0:
            figures["per-sequence drafting"] = f"paused while recent acceptance is below {self.acceptance_threshold}"
        return figures
