"""A request's state in the engine: its choices (one scheduler Sequence each), and how each
emitted token becomes text, logprobs, a finish reason and the deltas a RequestOutput reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vibee.runtime.detokenizer import IncrementalDetokenizer
from vibee.runtime.outputs import CompletionOutput, TokenLogprob
from vibee.runtime.sampler import SampleResult
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.stop_strings import StopStringMatcher


@dataclass
class Choice:
    """One choice of a request: its scheduler sequence and the text made from it so far."""

    index: int
    seq: Any  # the generated continuous_batch.Sequence
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    generator: torch.Generator | None
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    last_token_time: float | None = None
    num_known: int = 0  # output tokens read back from the device (a placeholder may follow them)
    emitted_tokens: int = 0  # output tokens already reported in a RequestOutput
    emitted_logprobs: int = 0
    reported_text: str = ""  # text already reported in a RequestOutput
    constraint: Any = None  # its TokenConstraint when the request has a grammar (structured_output.py)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    choices: list[Choice] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None  # computed at admission; handed to the first output, then None

    @property
    def finished(self) -> bool:
        for c in self.choices:  # a loop, not all(genexpr): asked for every request every step
            if c.finish_reason is None:
                return False
        return True


def check_request(prompt_token_ids: list[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                  kv_tokens: int) -> None:
    """Raise ValueError with a user-facing message if the request can't be served: an empty
    prompt, an id outside the vocabulary, more tokens than max_model_len, or more KV than the
    cache holds above its watermark (kv_tokens)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty; it needs at least one token")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    biased = [t for t in params.logit_bias if t >= vocab_size]
    if biased:
        raise ValueError(f"logit_bias names token id {biased[0]}, outside the vocabulary (0..{vocab_size - 1})")
    if n + params.max_tokens > max_model_len:
        raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                         f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the "
                         "completion). Please reduce the prompt or max_tokens.")
    longest = n + params.max_tokens - 1
    if longest > kv_tokens:
        raise ValueError(f"the request needs up to {longest} tokens of KV cache but the server holds "
                         f"{kv_tokens}; reduce the prompt or max_tokens")


def choice_generator(seed: int | None, index: int, device: str) -> torch.Generator | None:
    """A choice's own generator when the request is seeded (None: the sampler's shared one);
    choice 0 uses the seed itself, the others a value derived from it."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index) % 2**63 if index else seed)
    return g


def accept_token(req: Request, choice: Choice, token: int, result: SampleResult, now: float, last: bool,
                 finish_stopped: Callable[[int], Any]) -> bool:
    """Turn one emitted token into text, logprobs and finish state for its choice. `last`: the
    final token this step emitted for it (only then does the scheduler's status apply).
    finish_stopped(seq_id) tells the scheduler a stop string ended the sequence.
    Returns True when a stop string ended the choice at this token."""
    seq = choice.seq
    choice.num_known += 1
    if choice.last_token_time is None:
        if req.first_token_time is None:
            req.first_token_time = now
    elif now != choice.last_token_time:  # one gap per step: a step's tokens (drafts, rounds) arrive together
        req.inter_token_latencies.append(now - choice.last_token_time)
    choice.last_token_time = now
    if choice.logprobs is not None:
        choice.logprobs.append(TokenLogprob(token, float(result.logprob), list(result.top_logprobs or [])))
    status = seq.status.name if last else "RUNNING"
    if status == "FINISHED_STOPPED":  # a stop token or EOS: its text is not part of the output
        stopped = end_text(choice)
        choice.finish_reason = "stop"
        choice.stop_reason = stopped if stopped is not None else (token if token in req.params.stop_token_ids else None)
        return False
    emit, stopped = choice.stop.feed(choice.detokenizer.add(token))
    choice.text += emit
    if stopped is None and status == "FINISHED_LENGTH":
        stopped = end_text(choice)
        choice.finish_reason = "length"
    if stopped is not None:
        finish_stopped(seq.seq_id)  # running, or preempted while its last token was read back
        choice.finish_reason, choice.stop_reason = "stop", stopped
        return True
    return False


def end_text(choice: Choice) -> str | None:
    """Generation ended: release what the detokenizer (an unfinished character) and the stop
    matcher (a possible stop string's start) held back. Returns a stop string completed by it."""
    emit, stopped = choice.stop.feed(choice.detokenizer.flush())
    choice.text += emit
    if stopped is None:
        choice.text += choice.stop.flush()
        stopped = choice.stop.stopped
    return stopped


def choice_output(choice: Choice) -> CompletionOutput:
    """The choice's state with what is new since its last report (its token list is shared, not
    copied: see CompletionOutput)."""
    n = choice.num_known  # not the placeholder of a step in flight
    tokens = choice.seq.output_token_ids
    delta_tokens = tokens[choice.emitted_tokens: n]
    delta_text = choice.text[len(choice.reported_text):]
    choice.reported_text = choice.text
    choice.emitted_tokens = n
    delta_logprobs = None
    if choice.logprobs is not None:
        delta_logprobs = choice.logprobs[choice.emitted_logprobs:]
        choice.emitted_logprobs = len(choice.logprobs)
    return CompletionOutput(choice.index, choice.text, tokens, delta_text, delta_tokens, delta_logprobs,
                            choice.logprobs, choice.finish_reason, choice.stop_reason, n)


def token_slice(seq, start: int, stop: int) -> list[int]:
    """seq.all_token_ids[start:stop] without building the whole list (a decode step needs one token)."""
    prompt, n = seq.prompt_token_ids, len(seq.prompt_token_ids)
    if start >= n:
        return seq.output_token_ids[start - n: stop - n]
    return prompt[start:stop] + seq.output_token_ids[: max(0, stop - n)]
