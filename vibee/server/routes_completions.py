"""/v1/completions and /v1/chat/completions: validate, run on the engine, answer in one body or
as a stream of chunks."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from vibee.server.errors import bad_request
from vibee.server.generation import Choice, ClientGone, Job, client_gone_response, collect
from vibee.server.logprobs import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from vibee.server.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatResponseMessage,
                                   CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo, now,
                                   random_id)
from vibee.server.response_format import checked_grammar, format_grammar
from vibee.server.request_params import chat_prompt, check_choices, check_common, check_length, sampling_params
from vibee.server.state import State
from vibee.server.streaming import stream_job, usage_options
from vibee.server.tool_calls import CallStream, plan_tools

router = APIRouter()


@router.post("/v1/completions")
async def completions(req: CompletionRequest, raw: Request, state: State) -> Response:
    check_common(state, req)
    if req.suffix:
        raise bad_request("suffix is not supported.", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (other than best_of == n).", param="best_of")
    prompt_only = req.max_tokens == 0  # score the prompt: lm-evaluation-harness's loglikelihood requests
    if prompt_only and not req.echo:
        raise bad_request("max_tokens 0 returns only the prompt: it needs echo set to true.", param="max_tokens")
    tokenizer = state.engine.tokenizer

    # Normalise to a batch of token lists; remember each prompt's text for echo.
    prompt = req.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("The prompt is empty.", param="prompt")
    check_choices(state, len(prompt), req.n)
    prompts: list[list[int]] = []
    texts: list[str] = []
    for i, p in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            ids = await state.encode(p, add_special_tokens=req.add_special_tokens, param=param)
            texts.append(p)
        else:
            ids = list(p)
            state.check_tokens(ids, param)
            texts.append(tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens) if req.echo else "")
        if not ids:
            raise bad_request("The prompt is empty; it needs at least one token.", param=param)
        prompts.append(ids)

    grammar = await checked_grammar(state, format_grammar(req.response_format), "response_format")
    params = []
    for i, ids in enumerate(prompts):
        # max_tokens null: whatever the context leaves (vLLM's meaning); 0: the engine samples one token, unsent.
        max_tokens = req.max_tokens if req.max_tokens is not None else max(1, state.max_model_len - len(ids))
        # echo with logprobs: the prompt's own tokens' logprobs too.
        p = sampling_params(req, max_tokens=max(1, max_tokens), logprobs=req.logprobs, chat=False,
                            prompt_logprobs=_prompt_logprobs(req), structured_output=grammar)
        check_length(state, ids, p, prompt_param="prompt" if len(prompts) == 1 else f"prompt[{i}]",
                     max_tokens_param="max_tokens")
        params.append(p)

    job = Job(random_id("cmpl"), prompts, params, req.n, texts, [0] * len(prompts), prompt_only=prompt_only)
    created = now()
    top_n = req.logprobs or 0

    if not req.stream:
        try:
            choices = await collect(state.engine, raw, job, "prompt")
        except ClientGone:
            return client_gone_response()
        out = []
        for index in range(len(prompts) * req.n):
            c = choices.get(index, Choice())
            p_index = index // req.n
            if prompt_only:
                c.text, c.logprobs, c.finish_reason, c.stop_reason = "", [], "length", None
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(state, c.logprobs or [], top_n, c,
                                               prompts[p_index] if req.echo else None,
                                               job.prompt_logprobs.get(p_index), req.skip_special_tokens)
            text = (texts[p_index] + c.text) if req.echo else c.text
            out.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                        prompt_logprobs=vllm_prompt_logprobs(state, job.prompt_logprobs.get(p_index),
                                                                             req.prompt_logprobs)))
        return JSONResponse(CompletionResponse(id=job.request_id, created=created, model=state.model_name,
                                               choices=out, usage=job.usage(choices),
                                               system_fingerprint=state.system_fingerprint).model_dump())

    include_usage, continuous_usage = usage_options(req)
    running: dict[int, Choice] = {}

    def chunk(choices: list[dict[str, Any]], usage: UsageInfo | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": job.request_id, "object": "text_completion", "created": created,
                                "model": state.model_name, "choices": choices,
                                "system_fingerprint": state.system_fingerprint}
        if include_usage:
            body["usage"] = usage.model_dump() if usage is not None else None
        return body

    def make_chunks(prompt_index: int, out: Any) -> list[dict[str, Any]]:
        chunks = []
        for c in out.outputs:
            index = job.choice_index(prompt_index, c.index)
            choice = running.setdefault(index, Choice())
            if prompt_only and choice.started:
                continue  # the echo went out with the first output; the token sampled after it is not sent
            choice.num_tokens = c.num_tokens
            text, entries, finish_reason, stop_reason = c.delta_text, c.delta_logprobs or [], c.finish_reason, c.stop_reason
            if prompt_only:
                text, entries, finish_reason, stop_reason = "", [], "length", None
            echo_ids = None
            first = not choice.started
            if not choice.started:
                choice.started = True
                if req.echo:
                    text = texts[prompt_index] + text
                    echo_ids = prompts[prompt_index]
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(state, entries, top_n, choice, echo_ids, out.prompt_logprobs,
                                               req.skip_special_tokens).model_dump()
            # vLLM sends a choice's prompt_logprobs with its first chunk.
            scored = (vllm_prompt_logprobs(state, out.prompt_logprobs, req.prompt_logprobs)
                      if first and req.prompt_logprobs is not None else None)
            if not text and finish_reason is None and not (logprobs and logprobs["tokens"]) and scored is None:
                continue  # nothing new to say (text held back for a possible stop string)
            body = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                    "stop_reason": stop_reason}
            if scored is not None:
                body["prompt_logprobs"] = scored
            chunks.append(chunk([body],
                                job.usage(running) if continuous_usage else None))
        return chunks

    def final() -> dict[str, Any] | None:
        return chunk([], job.usage(running)) if include_usage else None

    return await stream_job(state.engine, raw, job, "prompt", make_chunks=make_chunks, final=final)


def _prompt_logprobs(req: CompletionRequest) -> int | None:
    """How many alternatives each prompt position is scored with: for echo with logprobs, for
    vLLM's prompt_logprobs, or both (the larger)."""
    asked = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    return max(asked) if asked else None


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, raw: Request, state: State) -> Response:
    check_common(state, req)
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls,
                       getattr(state.engine.tokenizer, "chat_template_text", ""))
    grammar = format_grammar(req.response_format)
    if grammar is not None and tools is not None and tools.grammar is not None:
        raise bad_request("response_format and tools can't both shape one answer; set tool_choice to 'none' "
                          "or drop response_format.", param="response_format")
    if tools is not None and tools.grammar is not None:
        grammar = await checked_grammar(state, tools.grammar, "tools")
    else:
        grammar = await checked_grammar(state, grammar, "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true.", param="top_logprobs")
    if req.prompt_logprobs is not None and req.stream:  # as vLLM: the response body carries them
        raise bad_request("prompt_logprobs are not available when stream is true.", param="prompt_logprobs")

    check_choices(state, 1, req.n)
    text = await asyncio.to_thread(chat_prompt, state, req.messages, req.add_generation_prompt, "messages", tools)
    # The chat template writes the special tokens (BOS included) itself.
    ids = await state.encode(text, add_special_tokens=False, param="messages")
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # OpenAI's default: as much as the context leaves
        max_tokens = max(1, state.max_model_len - len(ids))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, chat=True,
                             prompt_logprobs=req.prompt_logprobs, structured_output=grammar)
    check_length(state, ids, params, prompt_param="messages", max_tokens_param=max_tokens_param)

    job = Job(random_id("chatcmpl"), [ids], [params], req.n, [text], [0])
    created = now()
    top_n = req.top_logprobs or 0

    if not req.stream:
        try:
            choices = await collect(state.engine, raw, job, "messages")
        except ClientGone:
            return client_gone_response()
        out = []
        for index in range(req.n):
            c = choices.get(index, Choice())
            content, calls = tools.parse(c.text) if tools is not None else (c.text, [])
            out.append(ChatChoice(index=index, message=ChatResponseMessage(content=content, tool_calls=calls),
                                  logprobs=chat_logprobs(state, c.logprobs or [], top_n) if req.logprobs else None,
                                  finish_reason="tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason,
                                  stop_reason=c.stop_reason))
        return JSONResponse(ChatCompletionResponse(
            id=job.request_id, created=created, model=state.model_name, choices=out, usage=job.usage(choices),
            system_fingerprint=state.system_fingerprint,
            prompt_logprobs=vllm_prompt_logprobs(state, job.prompt_logprobs.get(0), req.prompt_logprobs)).model_dump())

    include_usage, continuous_usage = usage_options(req)
    running: dict[int, Choice] = {i: Choice() for i in range(req.n)}

    def chunk(choice: dict[str, Any] | None, usage: UsageInfo | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": job.request_id, "object": "chat.completion.chunk", "created": created,
                                "model": state.model_name, "choices": [choice] if choice else [],
                                "system_fingerprint": state.system_fingerprint}
        if include_usage:
            body["usage"] = usage.model_dump() if usage is not None else None
        return body

    # OpenAI opens each choice with the role and empty content.
    opening = [chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}) for i in range(req.n)]

    # With tools: a choice's text is held while it may still become calls (tool_calls.ToolPlan.may_be_call);
    # once it is one, its calls stream as they are written (tool_calls.CallStream).
    held: dict[int, str] = {i: "" for i in range(req.n)} if tools is not None and tools.grammar is not None else {}
    calling: dict[int, CallStream] = {}

    def make_chunks(prompt_index: int, out: Any) -> list[dict[str, Any]]:
        chunks = []
        for c in out.outputs:
            choice = running.setdefault(c.index, Choice())
            choice.num_tokens = c.num_tokens
            logprobs = None
            if req.logprobs and c.delta_logprobs:
                logprobs = chat_logprobs(state, c.delta_logprobs, top_n).model_dump()
            text, finish_reason, calls = c.delta_text, c.finish_reason, []
            if c.index in held:
                text = held.pop(c.index) + text  # the whole output so far
                if c.index not in calling and tools.is_call(text):
                    calling[c.index] = CallStream(tools)
                stream = calling.get(c.index)
                if stream is not None:
                    calls = stream.deltas(text)
                if stream is not None and stream.sent:  # calls are streaming: no content, whatever follows
                    held[c.index], text = text, ""
                    if finish_reason == "stop":
                        finish_reason = "tool_calls"
                elif finish_reason is not None:
                    content, whole = tools.parse(text)
                    text = content or ""
                    calls = [{"index": k, **call} for k, call in enumerate(whole)]
                    if calls and finish_reason == "stop":
                        finish_reason = "tool_calls"
                elif tools.may_be_call(text):
                    held[c.index], text = text, ""
            if not text and not calls and finish_reason is None and logprobs is None:
                continue
            delta: dict[str, Any] = {"content": text} if (text or (finish_reason is None and c.index not in held)) else {}
            if calls:
                delta["tool_calls"] = calls
            body = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            if c.finish_reason is not None:
                body["stop_reason"] = c.stop_reason
            chunks.append(chunk(body, job.usage(running) if continuous_usage else None))
        return chunks

    def final() -> dict[str, Any] | None:
        return chunk(None, job.usage(running)) if include_usage else None

    return await stream_job(state.engine, raw, job, "messages", make_chunks=make_chunks, final=final,
                            opening=opening)
