"""Per-request sampling parameters, validated the way an OpenAI/vLLM client expects.

Ranges (the server reports a violation as a 400 with ``param`` = the field name):

- ``n``: 1..16 choices per request (OpenAI allows up to 128; every choice holds its own KV
  blocks after the shared prompt, so a small bound keeps one request from filling the cache).
- ``temperature``: 0..2 as in the OpenAI API; below ``GREEDY_EPS`` counts as greedy (argmax).
- ``top_p``: (0, 1]; ``top_k``: -1 or 0 = off, else >= 1 (larger than the vocabulary = off);
  ``min_p``: [0, 1].
- ``presence_penalty`` / ``frequency_penalty``: [-2, 2]; ``repetition_penalty``: > 0 (1 = off).
- ``max_tokens``: >= 1. ``logprobs``: None, or 0..20 top alternatives (0 = only the sampled
  token's logprob); ``prompt_logprobs`` the same for each prompt token.
- ``logit_bias``: token id (an int, or its decimal string as JSON keys are) -> a bias in
  [-100, 100] added to that token's logit. ``min_tokens``: 0..max_tokens; before that many output
  tokens, EOS and ``stop_token_ids`` cannot be sampled (stop strings still apply, as in vLLM).
- ``structured_output``: an llguidance grammar (JSON text) the output keeps to; checked against
  the tokenizer where the engine adds the request.
- ``stop``: a string or a list of up to 16 non-empty strings of at most 256 characters each
  (OpenAI allows 4, vLLM any number; 16 keeps the per-token stop check cheap). Normalised to a
  list without duplicates. ``stop_token_ids``: ints >= 0.
- ``seed``: any int a torch.Generator accepts (-2**63 .. 2**64-1).

Numbers are strict: booleans and numeric strings are rejected; ints are accepted for floats.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_TEMPERATURE = 2.0
# Temperatures this small would blow logits up to inf/nan; treat them as greedy (as vLLM does).
GREEDY_EPS = 1e-5
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range. ``field`` names it; ``str(err)`` is one line naming it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _convert(err: ValidationError) -> SamplingParamsError:
    # Report the first problem only: one field, one line.
    first = err.errors()[0]
    inner = first.get("ctx", {}).get("error")
    if isinstance(inner, SamplingParamsError):
        return inner  # model_validate ran our __init__, which already converted it
    loc = first.get("loc") or ("sampling_params",)
    field = str(loc[0])
    if first["type"] == "value_error" and "error" in first.get("ctx", {}):
        message = str(first["ctx"]["error"])  # our own message, already names the field
    elif first["type"] == "extra_forbidden":
        message = f"{field}: unknown sampling parameter"
    else:
        where = "".join(f"[{p}]" for p in loc[1:])
        message = f"{field}{where}: {first['msg']}"
    return SamplingParamsError(field, message)


def _strict_float(**kw: Any) -> Any:
    return Field(strict=True, **kw)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    n: int = Field(1, strict=True)
    temperature: float = _strict_float(default=1.0)
    top_p: float = _strict_float(default=1.0)
    top_k: int = Field(-1, strict=True)
    min_p: float = _strict_float(default=0.0)
    seed: int | None = Field(None, strict=True)
    presence_penalty: float = _strict_float(default=0.0)
    frequency_penalty: float = _strict_float(default=0.0)
    repetition_penalty: float = _strict_float(default=1.0)
    max_tokens: int = Field(16, strict=True)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[StrictInt] = Field(default_factory=list)
    ignore_eos: bool = Field(False, strict=True)
    logprobs: int | None = Field(None, strict=True)
    # The prompt's own tokens' logprobs (vLLM's prompt_logprobs; OpenAI completions' echo with
    # logprobs): this many top alternatives at each position, 0 = only the prompt token's.
    prompt_logprobs: int | None = Field(None, strict=True)
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias: -100..100).
    logit_bias: dict[int, float] = Field(default_factory=dict)
    # EOS and stop_token_ids cannot be sampled before this many output tokens (vLLM's min_tokens).
    min_tokens: int = Field(0, strict=True)
    # Structured output: an llguidance grammar (vibee/runtime/structured_output.py's grammar_for_*)
    # that every output token must keep to.
    structured_output: str | None = Field(None, strict=True)
    skip_special_tokens: bool = Field(True, strict=True)
    include_stop_str_in_output: bool = Field(False, strict=True)

    # pydantic wraps errors raised in validators into ValidationError; convert at the entry points
    # so callers only ever see SamplingParamsError.
    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _convert(err) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> SamplingParams:
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise _convert(err) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> SamplingParams:
        try:
            return super().model_validate_json(json_data, **kwargs)
        except ValidationError as err:
            raise _convert(err) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise _convert(err) from None

    # ---- field checks (messages name the field) ----

    @field_validator("n")
    @classmethod
    def _check_n(cls, v: int) -> int:
        if not 1 <= v <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, v: float) -> float:
        if not 0.0 <= v <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {v}")
        return float(v)

    @field_validator("top_p")
    @classmethod
    def _check_top_p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return float(v)

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or at least 1, got {v}")
        return v

    @field_validator("min_p")
    @classmethod
    def _check_min_p(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"min_p must be between 0 and 1, got {v}")
        return float(v)

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v: int | None) -> int | None:
        if v is not None and not SEED_MIN <= v <= SEED_MAX:
            raise ValueError(f"seed must be between {SEED_MIN} and {SEED_MAX}, got {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _check_additive_penalty(cls, v: float, info: Any) -> float:
        if not -2.0 <= v <= 2.0:
            raise ValueError(f"{info.field_name} must be between -2 and 2, got {v}")
        return float(v)

    @field_validator("repetition_penalty")
    @classmethod
    def _check_repetition_penalty(cls, v: float) -> float:
        if not v > 0.0:
            raise ValueError(f"repetition_penalty must be greater than 0, got {v}")
        return float(v)

    @field_validator("max_tokens")
    @classmethod
    def _check_max_tokens(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("logprobs", "prompt_logprobs")
    @classmethod
    def _check_logprobs(cls, v: int | None, info) -> int | None:
        if v is not None and not 0 <= v <= MAX_LOGPROBS:
            raise ValueError(f"{info.field_name} must be between 0 and {MAX_LOGPROBS}, got {v}")
        return v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError(f"logit_bias must map token ids to biases, got {type(v).__name__}")
        out = {}
        for key, bias in v.items():
            token = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {key!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be numbers between -100 and 100, got {bias!r} for {key!r}")
            out[token] = float(bias)
        return out

    @field_validator("min_tokens")
    @classmethod
    def _check_min_tokens(cls, v: int, info) -> int:
        if v < 0:
            raise ValueError(f"min_tokens must be at least 0, got {v}")
        if v > info.data.get("max_tokens", v):
            raise ValueError(f"min_tokens ({v}) must be at most max_tokens ({info.data['max_tokens']})")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _normalise_stop(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if isinstance(v, tuple):
            return list(v)
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(v)}")
        for s in v:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got {len(s)}")
        return list(dict.fromkeys(v))  # drop duplicates, keep order

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _normalise_stop_token_ids(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, tuple):
            return list(v)
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, v: list[int]) -> list[int]:
        for t in v:
            if t < 0:
                raise ValueError(f"stop_token_ids must be token ids >= 0, got {t!r}")
        return list(dict.fromkeys(v))

    # ---- derived views used by the sampler/engine ----

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k >= 1

    @property
    def has_penalties(self) -> bool:
        """Whether the logits are changed per row before sampling (penalties, a bias, a minimum
        length, a grammar): such rows take the sampler's general path, with every token on the host."""
        return self.has_logit_rules or self.structured_output is not None

    @property
    def has_logit_rules(self) -> bool:
        """has_penalties but for a grammar (which a token DFA applies in decode rounds too)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias) or self.min_tokens > 0)
