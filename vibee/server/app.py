"""The OpenAI-compatible HTTP server: `create_app(engine, api_key=None) -> FastAPI`.

The engine is anything with the AsyncEngine interface (vibee/runtime/async_engine.py): tokenizer,
config, generate(prompt_token_ids, params, request_id) as an async iterator of RequestOutput,
check_prompt, info, stats, add_observer, and optionally is_alive / max_model_len /
served_model_name. The app does not own the engine: whoever built it shuts it down.

Cancellation: a generation is aborted by closing the engine's iterator. Streaming responses are
cancelled by Starlette when the client disconnects; while a non-streaming response (or the first
chunk of a streaming one) is being computed, a watcher task waits for the disconnect message and
cancels the generation.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from vibee.server.errors import (APIError, bad_request, install_error_handlers, is_engine_closed, one_line,
                                 service_unavailable)
from vibee.server.metrics import PrometheusObserver
from vibee.server.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogProbs,
                                   ChatMessage, ChatResponseMessage, ChatTokenLogprob, CompletionChoice,
                                   CompletionLogProbs, CompletionRequest, CompletionResponse, DetokenizeRequest,
                                   DetokenizeResponse, ModelCard, ModelList, PromptTokensDetails, TextContentPart,
                                   TokenizeRequest, TokenizeResponse, TopLogprob, UsageInfo, now, random_id)

# JSON has no -inf; vLLM sends this for impossible tokens' logprobs too.
_NEG_INF_LOGPROB = -9999.0

# Paths open without the API key: probes and scrapers don't carry it.
_OPEN_PATHS = {"/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


class _AuthMiddleware:
    """`Authorization: Bearer <key>` on everything except _OPEN_PATHS. Plain ASGI, so it runs
    before body parsing (a bad key is a 401 even with a malformed body) and leaves streaming alone."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in _OPEN_PATHS:
            got = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    got = value.strip()
                    break
            if not secrets.compare_digest(got, self.expected):
                message = ("Missing API key: send it as 'Authorization: Bearer <key>'." if not got
                           else "Incorrect API key provided.")
                err = APIError(401, message, code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _StreamResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, even when Starlette cancels it before the
    body iterator starts (then the iterator's own `finally` never runs)."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]], **kw):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._on_close()


async def _aclose(agen: Any) -> None:
    """Close an async iterator (which aborts an engine request still running), even while the
    calling task is being cancelled."""
    close = getattr(agen, "aclose", None)
    if close is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await close()
        except Exception:
            pass  # it already failed; that error was (or will be) reported elsewhere


async def _merge(engine: Any, jobs: list[tuple[list[int], Any]], request_id: str) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, RequestOutput) from one engine request per prompt, as they come.
    Closing this iterator closes (so aborts) every engine request still running."""
    if len(jobs) == 1:
        agen = engine.generate(jobs[0][0], jobs[0][1], request_id)
        try:
            async for out in agen:
                yield 0, out
        finally:
            await _aclose(agen)
        return

    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    agens = [engine.generate(ids, params, f"{request_id}-{i}") for i, (ids, params) in enumerate(jobs)]

    async def pump(i: int, agen: Any) -> None:
        try:
            async for out in agen:
                queue.put_nowait((i, out))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, agen)) for i, agen in enumerate(agens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # cancelling a pump mid-iteration closes its engine request
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
        for agen in agens:
            await _aclose(agen)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (sent when the client
    # goes away, or by the server after the response is complete).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await `awaitable`, cancelling it if the client disconnects first (-> _ClientGone)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        watcher.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(work, watcher, return_exceptions=True)
    if work.cancelled():
        raise _ClientGone()
    return work.result()


def _engine_error(exc: BaseException, prompt_param: str) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if is_engine_closed(exc):
        return service_unavailable()
    if isinstance(exc, ValueError):
        return bad_request(one_line(str(exc)), param=prompt_param)
    return APIError(500, f"The engine failed: {type(exc).__name__}: {one_line(str(exc))}")


def _clean_logprob(x: float) -> float:
    return _NEG_INF_LOGPROB if math.isinf(x) and x < 0 else float(x)


@dataclass
class _Choice:
    """One choice's running state for building responses."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0  # completions logprobs: characters before the next token
    started: bool = False  # streaming: sent the first chunk (role / echo)


@dataclass
class _Job:
    """A validated generation: one engine request per prompt."""

    request_id: str
    prompts: list[list[int]]
    params: list[Any]
    n: int
    prompt_texts: list[str] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)

    def choice_index(self, prompt_index: int, index: int) -> int:
        return prompt_index * self.n + index

    def usage(self, choices: dict[int, _Choice]) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(c.num_tokens for c in choices.values())
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens)))


class _Server:
    def __init__(self, engine: Any, api_key: str | None, registry: CollectorRegistry):
        self.engine = engine
        self.api_key = api_key
        self.registry = registry
        self.model_name = self._served_model_name()
        self.created = now()
        self._token_text: dict[int, str] = {}

    # --- engine facts -------------------------------------------------------------------------

    def _served_model_name(self) -> str:
        name = getattr(self.engine, "served_model_name", None)
        if isinstance(name, str) and name:
            return name
        config = self.engine.config
        return getattr(config, "served_model_name", None) or getattr(config, "model_name", None) or "vibee"

    @property
    def max_model_len(self) -> int:
        value = getattr(self.engine, "max_model_len", None)
        if isinstance(value, int):
            return value
        value = getattr(self.engine.config, "max_model_len", None)
        if isinstance(value, int):
            return value
        return int(self.engine.model_config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        size = getattr(getattr(self.engine, "model_config", None), "vocab_size", None)
        return int(size) if size else int(self.engine.tokenizer.vocab_size)

    def is_alive(self) -> bool:
        alive = getattr(self.engine, "is_alive", None)
        if alive is None:
            return True
        return bool(alive() if callable(alive) else alive)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    # --- request checks -----------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist. This server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def check_tokens(self, ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise bad_request(f"Token id {t} is outside the vocabulary (0..{vocab - 1}).", param=param)

    def check_common(self, req: Any) -> None:
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true.", param="stream_options")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported.", param="logit_bias")

    def sampling_params(self, req: Any, *, max_tokens: int, logprobs: int | None, chat: bool) -> Any:
        from vibee.runtime.sampling_params import SamplingParams

        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        kw: dict[str, Any] = dict(n=req.n, max_tokens=max_tokens, stop=stop,
                                  stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                                  logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
                                  include_stop_str_in_output=req.include_stop_str_in_output)
        for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                kw[name] = value
        try:
            return SamplingParams(**kw)
        except ValueError as exc:  # SamplingParamsError: one line naming the field, in `.field`
            message = one_line(str(exc))
            field_name = getattr(exc, "field", None) or next((f for f in kw if f in message), None)
            raise bad_request(message, param=self._request_param(field_name, req, chat)) from None

    @staticmethod
    def _request_param(field_name: str | None, req: Any, chat: bool) -> str | None:
        """The request field a SamplingParams field came from."""
        if field_name == "max_tokens" and chat and req.max_completion_tokens is not None:
            return "max_completion_tokens"
        if field_name == "logprobs" and chat:
            return "top_logprobs" if req.top_logprobs is not None else "logprobs"
        return field_name

    def check_length(self, ids: list[int], params: Any, *, prompt_param: str, max_tokens_param: str) -> None:
        """The engine's checks (empty prompt, vocabulary, context length, KV capacity), each a 400
        naming the prompt or max_tokens field."""
        limit = self.max_model_len
        try:
            self.engine.check_prompt(ids, params)
        except ValueError as exc:
            message = one_line(str(exc))
            param = max_tokens_param if ("max_tokens" in message and len(ids) < limit) else prompt_param
            raise bad_request(message, param=param) from None
        if len(ids) + params.max_tokens > limit:  # for engines whose check_prompt doesn't do this
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, {params.max_tokens} for the "
                f"completion). Please reduce the prompt or {max_tokens_param}.", param=max_tokens_param)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool, param: str = "messages") -> str:
        plain: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            content = message.content
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
            plain.append(entry)
        try:
            return self.engine.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # a template that raises (e.g. on roles it doesn't allow) is the user's 400
            raise bad_request(f"The chat template failed on these messages: {one_line(str(exc))}",
                              param=param) from None

    # --- logprobs -----------------------------------------------------------------------------

    def completion_logprobs(self, entries: list[Any], top_n: int, choice: _Choice,
                            prompt_ids: list[int] | None = None) -> CompletionLogProbs:
        out = CompletionLogProbs()
        if prompt_ids:  # echo: prompt tokens, whose logprobs the engine doesn't compute
            for t in prompt_ids:
                text = self.token_text(t)
                out.tokens.append(text)
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                out.text_offset.append(choice.text_offset)
                choice.text_offset += len(text)
        for e in entries:
            text = self.token_text(e.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(_clean_logprob(e.logprob))
            top = {self.token_text(t): _clean_logprob(lp) for t, lp in list(e.top)[:top_n]}
            top.setdefault(text, _clean_logprob(e.logprob))  # the sampled token is always listed (as vLLM does)
            out.top_logprobs.append(top)
            out.text_offset.append(choice.text_offset)
            choice.text_offset += len(text)
        return out

    def chat_logprobs(self, entries: list[Any], top_n: int) -> ChatLogProbs:
        content = []
        for e in entries:
            text = self.token_text(e.token_id)
            tops = [TopLogprob(token=self.token_text(t), logprob=_clean_logprob(lp),
                               bytes=list(self.token_text(t).encode()))
                    for t, lp in list(e.top)[:top_n]]
            content.append(ChatTokenLogprob(token=text, logprob=_clean_logprob(e.logprob),
                                            bytes=list(text.encode()), top_logprobs=tops))
        return ChatLogProbs(content=content)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def create_app(engine: Any, *, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app around `engine`. With `api_key`, every endpoint but /health,
    /metrics and the docs needs `Authorization: Bearer <api_key>`."""
    registry = CollectorRegistry()
    server = _Server(engine, api_key, registry)
    observer = PrometheusObserver(registry, model_name=server.model_name)
    engine.add_observer(observer)

    app = FastAPI(title="vibee", summary="OpenAI-compatible LLM inference server")
    app.state.engine = engine
    app.state.registry = registry
    app.state.observer = observer
    install_error_handlers(app)
    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)

    # --- info endpoints ------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if server.is_alive():
            return Response(status_code=200)
        err = APIError(503, "The engine is not running.", code="engine_dead")
        return JSONResponse(err.body(), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> ModelCard:
        return ModelCard(id=server.model_name, created=server.created, root=server.model_name,
                         max_model_len=server.max_model_len)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        server.check_model(model)
        return model_card()

    @app.get("/v1/inference/info")
    async def inference_info() -> JSONResponse:
        return JSONResponse(engine.info())

    @app.get("/v1/inference/stats")
    async def inference_stats() -> JSONResponse:
        return JSONResponse(engine.stats())

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("Send exactly one of 'prompt' and 'messages'.",
                              param="prompt" if req.prompt is None else "messages")
        if req.prompt is not None:
            ids = engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            text = server.chat_prompt(req.messages, req.add_generation_prompt)
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=server.max_model_len)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        server.check_model(req.model)
        server.check_tokens(req.tokens, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens))

    # --- generation ----------------------------------------------------------------------------

    async def open_stream(job: _Job, prompt_param: str) -> tuple[AsyncIterator[tuple[int, Any]], Any]:
        """Open the engine requests and wait for the first output, so a refused request (closed
        engine, bad prompt) is a proper HTTP error rather than an error inside a 200 stream."""
        stream = _merge(engine, list(zip(job.prompts, job.params)), job.request_id)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException as exc:
            await _aclose(stream)
            if isinstance(exc, Exception):
                raise _engine_error(exc, prompt_param) from None
            raise  # cancelled: the client went away
        return stream, first

    async def collect(raw: Request, job: _Job, prompt_param: str) -> dict[int, _Choice]:
        """Run a non-streaming job to the end; _ClientGone (and the job aborted) if the client leaves."""

        async def run() -> dict[int, _Choice]:
            stream, item = await open_stream(job, prompt_param)
            choices: dict[int, _Choice] = {}
            try:
                while item is not None:
                    prompt_index, out = item
                    job.cached_tokens[prompt_index] = out.num_cached_tokens
                    for c in out.outputs:
                        choice = choices.setdefault(job.choice_index(prompt_index, c.index), _Choice())
                        choice.text, choice.num_tokens = c.text, len(c.token_ids)
                        choice.logprobs = c.logprobs
                        choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
                    try:
                        item = await stream.__anext__()
                    except StopAsyncIteration:
                        item = None
            except Exception as exc:
                raise _engine_error(exc, prompt_param) from None
            finally:
                await _aclose(stream)
            return choices

        return await _unless_disconnected(raw, run())

    def gone() -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    async def sse_body(job: _Job, stream: AsyncIterator[tuple[int, Any]], first: Any,
                       make_chunks: Callable[[int, Any], list[dict[str, Any]]],
                       opening: list[dict[str, Any]], final: Callable[[], dict[str, Any] | None],
                       prompt_param: str) -> AsyncIterator[str]:
        try:
            for chunk in opening:
                yield _sse(chunk)
            item = first
            while item is not None:
                job.cached_tokens[item[0]] = item[1].num_cached_tokens
                for chunk in make_chunks(*item):
                    yield _sse(chunk)
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    item = None
            last = final()
            if last is not None:
                yield _sse(last)
        except Exception as exc:  # the status line is long sent: report in-band, as vLLM does
            yield _sse(_engine_error(exc, prompt_param).body())
        finally:
            await _aclose(stream)
        yield _sse("[DONE]")

    # --- /v1/completions -----------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        server.check_common(req)
        if req.suffix:
            raise bad_request("suffix is not supported.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported (other than best_of == n).", param="best_of")

        # Normalise to a batch of token lists; remember each prompt's text for echo.
        prompt = req.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise bad_request("The prompt is empty.", param="prompt")
        prompts: list[list[int]] = []
        texts: list[str] = []
        for i, p in enumerate(prompt):
            param = "prompt" if len(prompt) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                ids = engine.tokenizer.encode(p, add_special_tokens=req.add_special_tokens)
                texts.append(p)
            else:
                ids = list(p)
                server.check_tokens(ids, param)
                texts.append(engine.tokenizer.decode(ids, skip_special_tokens=req.skip_special_tokens) if req.echo
                             else "")
            if not ids:
                raise bad_request("The prompt is empty; it needs at least one token.", param=param)
            prompts.append(ids)

        params = []
        for i, ids in enumerate(prompts):
            # max_tokens null: whatever the context leaves (vLLM's meaning).
            max_tokens = req.max_tokens if req.max_tokens is not None else max(1, server.max_model_len - len(ids))
            p = server.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, chat=False)
            server.check_length(ids, p, prompt_param="prompt" if len(prompts) == 1 else f"prompt[{i}]",
                                max_tokens_param="max_tokens")
            params.append(p)

        job = _Job(random_id("cmpl"), prompts, params, req.n, texts, [0] * len(prompts))
        created = now()
        top_n = req.logprobs or 0

        if not req.stream:
            try:
                choices = await collect(raw, job, "prompt")
            except _ClientGone:
                return gone()
            out = []
            for index in range(len(prompts) * req.n):
                c = choices.get(index, _Choice())
                p_index = index // req.n
                logprobs = None
                if req.logprobs is not None:
                    logprobs = server.completion_logprobs(c.logprobs or [], top_n, c,
                                                          prompts[p_index] if req.echo else None)
                text = (texts[p_index] + c.text) if req.echo else c.text
                out.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            return JSONResponse(CompletionResponse(id=job.request_id, created=created, model=server.model_name,
                                                   choices=out, usage=job.usage(choices)).model_dump())

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous_usage = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        try:
            stream, first = await _unless_disconnected(raw, open_stream(job, "prompt"))
        except _ClientGone:
            return gone()
        state: dict[int, _Choice] = {}

        def chunk(choices: list[dict[str, Any]], usage: UsageInfo | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {"id": job.request_id, "object": "text_completion", "created": created,
                                    "model": server.model_name, "choices": choices}
            if include_usage:
                body["usage"] = usage.model_dump() if usage is not None else None
            return body

        def make_chunks(prompt_index: int, out: Any) -> list[dict[str, Any]]:
            chunks = []
            for c in out.outputs:
                index = job.choice_index(prompt_index, c.index)
                choice = state.setdefault(index, _Choice())
                choice.num_tokens = len(c.token_ids)
                text = c.delta_text
                echo_ids = None
                if not choice.started:
                    choice.started = True
                    if req.echo:
                        text = texts[prompt_index] + text
                        echo_ids = prompts[prompt_index]
                logprobs = None
                if req.logprobs is not None:
                    logprobs = server.completion_logprobs(c.delta_logprobs or [], top_n, choice, echo_ids).model_dump()
                if not text and c.finish_reason is None and not (logprobs and logprobs["tokens"]):
                    continue  # nothing new to say (text held back for a possible stop string)
                chunks.append(chunk([{"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}],
                                    job.usage(state) if continuous_usage else None))
            return chunks

        def final() -> dict[str, Any] | None:
            return chunk([], job.usage(state)) if include_usage else None

        return _StreamResponse(sse_body(job, stream, first, make_chunks, [], final, "prompt"),
                               on_close=lambda: _aclose(stream))

    # --- /v1/chat/completions ------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        server.check_common(req)
        if req.tools:
            raise bad_request("Tool calling is not supported.", param="tools")
        if req.response_format is not None and req.response_format.type != "text":
            raise bad_request(f"response_format {req.response_format.type!r} is not supported (only 'text').",
                              param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true.", param="top_logprobs")

        text = server.chat_prompt(req.messages, req.add_generation_prompt)
        # The chat template writes the special tokens (BOS included) itself.
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # OpenAI's default: as much as the context leaves
            max_tokens = max(1, server.max_model_len - len(ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = server.sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, chat=True)
        server.check_length(ids, params, prompt_param="messages", max_tokens_param=max_tokens_param)

        job = _Job(random_id("chatcmpl"), [ids], [params], req.n, [text], [0])
        created = now()
        top_n = req.top_logprobs or 0

        if not req.stream:
            try:
                choices = await collect(raw, job, "messages")
            except _ClientGone:
                return gone()
            out = []
            for index in range(req.n):
                c = choices.get(index, _Choice())
                out.append(ChatChoice(index=index, message=ChatResponseMessage(content=c.text),
                                      logprobs=server.chat_logprobs(c.logprobs or [], top_n) if req.logprobs else None,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            return JSONResponse(ChatCompletionResponse(id=job.request_id, created=created, model=server.model_name,
                                                       choices=out, usage=job.usage(choices)).model_dump())

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous_usage = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        try:
            stream, first = await _unless_disconnected(raw, open_stream(job, "messages"))
        except _ClientGone:
            return gone()
        state: dict[int, _Choice] = {i: _Choice() for i in range(req.n)}

        def chunk(choice: dict[str, Any] | None, usage: UsageInfo | None = None) -> dict[str, Any]:
            body: dict[str, Any] = {"id": job.request_id, "object": "chat.completion.chunk", "created": created,
                                    "model": server.model_name, "choices": [choice] if choice else []}
            if include_usage:
                body["usage"] = usage.model_dump() if usage is not None else None
            return body

        # OpenAI opens each choice with the role and empty content.
        opening = [chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}) for i in range(req.n)]

        def make_chunks(prompt_index: int, out: Any) -> list[dict[str, Any]]:
            chunks = []
            for c in out.outputs:
                choice = state.setdefault(c.index, _Choice())
                choice.num_tokens = len(c.token_ids)
                logprobs = None
                if req.logprobs and c.delta_logprobs:
                    logprobs = server.chat_logprobs(c.delta_logprobs, top_n).model_dump()
                if not c.delta_text and c.finish_reason is None and logprobs is None:
                    continue
                delta = {"content": c.delta_text} if (c.delta_text or c.finish_reason is None) else {}
                body = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason}
                if c.finish_reason is not None:
                    body["stop_reason"] = c.stop_reason
                chunks.append(chunk(body, job.usage(state) if continuous_usage else None))
            return chunks

        def final() -> dict[str, Any] | None:
            return chunk(None, job.usage(state)) if include_usage else None

        return _StreamResponse(sse_body(job, stream, first, make_chunks, opening, final, "messages"),
                               on_close=lambda: _aclose(stream))

    return app
