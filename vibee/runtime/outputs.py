"""What the engine hands out: per-step request outputs, and the figures observers (metrics) get."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the top_logprobs, best first
    rank: int | None = None  # 1 + tokens likelier than it (vLLM's rank), where computed (prompt tokens)


@dataclass
class CompletionOutput:
    """One choice's state after a step. All of its tokens and logprobs so far are the first
    num_tokens of lists the engine keeps growing (they only ever grow past that point), so a
    step reports a sequence of any length without copying it; token_ids and logprobs copy on
    access."""

    index: int  # choice index, 0..n-1
    text: str  # all text so far (a stop string excluded)
    all_token_ids: list[int]  # its first num_tokens are this choice's output tokens so far
    delta_text: str  # new since the previous RequestOutput for this choice
    delta_token_ids: list[int]
    delta_logprobs: list[TokenLogprob] | None  # for delta_token_ids, when logprobs were asked for
    all_logprobs: list[TokenLogprob] | None  # its first num_tokens are the logprobs, when asked for
    finish_reason: str | None = None  # None | "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_tokens: int = -1  # -1: all of all_token_ids

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            self.num_tokens = len(self.all_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """All output tokens so far."""
        return self.all_token_ids[: self.num_tokens]

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """The logprobs of token_ids (None when not asked for)."""
        return None if self.all_logprobs is None else self.all_logprobs[: self.num_tokens]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # only the choices that changed in this step
    finished: bool  # every choice has finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With params.prompt_logprobs: one per prompt token, None for the first (nothing precedes it);
    # in the request's first output (and every one after, on the server's side of the pipe).
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class StepStats:
    """One engine step, for metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 of the KV blocks in use
    num_preemptions: int  # this step
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache this step
    prefix_cache_hits: int  # ... and found
    num_prompt_tokens: int  # prompt tokens of the requests first scheduled this step (cached ones included)
    num_generation_tokens: int  # tokens sampled this step
    batch_size: int  # sequences in the step
    step_time: float  # seconds


@dataclass
class RequestStats:
    """One finished request (all of its choices), for metrics."""

    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    queue_time: float  # seconds from arrival to first scheduled
    time_to_first_token: float | None
    e2e_latency: float
    inter_token_latencies: list[float] = field(default_factory=list)
