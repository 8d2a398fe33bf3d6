"""OpenAI API request and response models (the subset vibee serves, plus vLLM's extensions).

Requests ignore unknown fields, as OpenAI clients send extras (`user`, `metadata`, ...). Field
types and simple bounds are checked here, so a wrong-typed or out-of-range field is a 400 naming
it; the sampling bounds proper are SamplingParams's (vibee/runtime/sampling_params.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vibee.runtime.sampling_params import MAX_LOGPROBS, MAX_N  # the engine's limits, checked here first



def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _lone_surrogate(value: Any) -> int | None:
    """The index of the first lone surrogate in a string (JSON's "\\ud800" escapes decode to one; no
    tokenizer takes it), searched through lists and dict values too; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # in C: a 10 MB prompt costs milliseconds
        except UnicodeEncodeError as exc:
            return exc.start
        return None
    items = value if isinstance(value, list) else value.values() if isinstance(value, dict) else ()
    return next((at for at in map(_lone_surrogate, items) if at is not None), None)


class _Request(BaseModel):
    # strict: "5" is not a number and 1 is not a bool (as OpenAI's API); ints still pass for floats.
    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())

    @field_validator("*", mode="after")
    @classmethod
    def _unicode_text(cls, value: Any) -> Any:
        at = _lone_surrogate(value)
        if at is not None:
            raise ValueError(f"the text has a lone UTF-16 surrogate at character {at}, which is not Unicode text")
        return value


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the output always keeps to the schema, strict or not


class ResponseFormat(_Request):
    # text (no constraint), json_object (any JSON object), json_schema; vibee's: grammar (a Lark
    # grammar in llguidance's dialect, `start` its top rule) and regex.
    type: Literal["text", "json_object", "json_schema", "grammar", "regex"]
    json_schema: JsonSchemaFormat | None = None
    grammar: str | None = None
    regex: str | None = None


class _SamplingFields(_Request):
    """Fields the completions and chat endpoints share."""

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None  # accepted, unused
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None  # completions too, as vLLM


class CompletionRequest(_SamplingFields):
    # A string, a token list, or a batch of either (choice index = prompt index * n + choice).
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM: add BOS to string prompts
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM: each choice's prompt_logprobs


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or content parts; only text parts are supported.
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: list[dict[str, Any]] | None = None  # an assistant message: the calls it made


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    add_generation_prompt: bool = True  # vLLM extension
    parallel_tool_calls: bool | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM: the templated prompt's, not streamed


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses ----


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogProbs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it
    # vLLM's: per prompt position, None for the first, else {token id: {logprob, rank, decoded_token}}
    # for the prompt's token and the prompt_logprobs likeliest.
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(_Response):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    # vLLM's (with prompt_logprobs): per position of the templated prompt, as a completion choice's.
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vibee"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Response):
    prompt: str
