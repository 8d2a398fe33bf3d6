"""What a generation request asks of the engine: the prompt text of chat messages and the
SamplingParams of the request's fields. Every refusal is a 400 naming the request field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from vibee.server.errors import bad_request, one_line
from vibee.server.protocol import ChatMessage, TextContentPart
from vibee.server.state import ServerState
from vibee.server.tool_calls import ToolPlan, call_text, tool_prompt


def check_common(state: ServerState, req: Any) -> None:
    """Checks that completions and chat share."""
    state.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")


def sampling_params(req: Any, *, max_tokens: int, logprobs: int | None, chat: bool,
                    prompt_logprobs: int | None = None, structured_output: str | None = None) -> Any:
    from vibee.runtime.sampling_params import SamplingParams

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    kw: dict[str, Any] = dict(n=req.n, max_tokens=max_tokens, stop=stop,
                              stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              skip_special_tokens=req.skip_special_tokens,
                              include_stop_str_in_output=req.include_stop_str_in_output,
                              structured_output=structured_output)
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "logit_bias", "min_tokens"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    try:
        return SamplingParams(**kw)
    except ValueError as exc:  # SamplingParamsError: one line naming the field, in `.field`
        message = one_line(str(exc))
        field_name = getattr(exc, "field", None) or next((f for f in kw if f in message), None)
        raise bad_request(message, param=_request_param(field_name, req, chat)) from None


def _request_param(field_name: str | None, req: Any, chat: bool) -> str | None:
    """The request field a SamplingParams field came from."""
    if field_name == "max_tokens" and chat and req.max_completion_tokens is not None:
        return "max_completion_tokens"
    if field_name == "logprobs" and chat:
        return "top_logprobs" if req.top_logprobs is not None else "logprobs"
    return field_name


def check_length(state: ServerState, ids: list[int], params: Any, *, prompt_param: str,
                 max_tokens_param: str) -> None:
    """The engine's checks (empty prompt, vocabulary, context length, KV capacity), each a 400
    naming the prompt or max_tokens field."""
    limit = state.max_model_len
    try:
        state.engine.check_prompt(ids, params)
    except ValueError as exc:
        message = one_line(str(exc))
        param = max_tokens_param if ("max_tokens" in message and len(ids) < limit) else prompt_param
        raise bad_request(message, param=param) from None
    if len(ids) + params.max_tokens > limit:  # for engines whose check_prompt doesn't do this
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} for the "
            f"completion). Please reduce the prompt or {max_tokens_param}.", param=max_tokens_param)


def check_choices(state: ServerState, num_prompts: int, n: int) -> None:
    """A 400 when one request asks for more completions than the server takes from one client."""
    limit = state.limits.max_choices
    if num_prompts * n > limit:
        asked = f"{num_prompts} prompts x n {n}" if num_prompts > 1 else f"n {n}"
        raise bad_request(f"This request asks for {num_prompts * n} completions ({asked}); the server takes at most "
                          f"{limit} per request (vibee serve --max-choices-per-request).",
                          param="prompt" if num_prompts > 1 else "n")


def chat_prompt(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool,
                param: str = "messages", tools: ToolPlan | None = None) -> str:
    """The prompt text the tokenizer's chat template makes of `messages` (text parts only), with
    the request's tools: given to a template that renders them, else in a system message of vibee's."""
    tokenizer = state.engine.tokenizer
    template = getattr(tokenizer, "chat_template_text", "")
    renders_tools = "tools" in template
    plain: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.content
        if content is None and message.role != "assistant":  # an assistant turn may be tool calls alone
            raise bad_request(f"A {message.role} message needs its content.", param=f"{param}[{i}].content")
        if message.role == "tool" and not message.tool_call_id:
            raise bad_request("A tool message needs the tool_call_id of the call it answers.",
                              param=f"{param}[{i}].tool_call_id")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                try:
                    texts.append(TextContentPart.model_validate(part).text)
                except ValidationError:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad_request(f"Only text content parts are supported (got {kind!r}).",
                                      param=f"{param}[{i}].content[{j}]") from None
            content = "".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            if "tool_calls" in template:
                entry["tool_calls"] = message.tool_calls
            else:  # the calls as the model wrote them
                entry["content"] = "\n".join(t for t in (entry["content"], call_text(
                    message.tool_calls, tools.format if tools else "hermes")) if t)
        plain.append(entry)
    extra: dict[str, Any] = {}
    if tools is not None and renders_tools:
        extra["tools"] = tools.tools
    elif tools is not None:
        if plain and plain[0]["role"] == "system":
            plain[0] = {**plain[0], "content": plain[0]["content"] + "\n\n" + tool_prompt(tools)}
        else:
            plain.insert(0, {"role": "system", "content": tool_prompt(tools)})
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:  # a template that raises (e.g. on roles it doesn't allow) is the user's 400
        raise bad_request(f"The chat template failed on these messages: {one_line(str(exc))}",
                          param=param) from None
