"""Server-sent events for streaming completions and chat: `data: <json>` per chunk, errors after
the 200 reported in-band, `data: [DONE]` last, and the engine requests closed however it ends."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from vibee.server.generation import (ClientGone, Job, aclose, client_gone_response, engine_error, open_stream,
                                     unless_disconnected)
from vibee.server.state import EngineClient

# The chunks one engine output (prompt index, RequestOutput) becomes.
MakeChunks = Callable[[int, Any], list[dict[str, Any]]]


class _SSEResponse(StreamingResponse):
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


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage_options(req: Any) -> tuple[bool, bool]:
    """(usage in a last chunk, usage on every chunk) as the request's stream_options ask."""
    options = req.stream_options
    return bool(options and options.include_usage), bool(options and options.continuous_usage_stats)


async def _events(job: Job, stream: AsyncIterator[tuple[int, Any]], first: Any, make_chunks: MakeChunks,
                  opening: Iterable[dict[str, Any]], final: Callable[[], dict[str, Any] | None],
                  prompt_param: str) -> AsyncIterator[str]:
    try:
        for chunk in opening:
            yield sse(chunk)
        item = first
        while item is not None:
            job.cached_tokens[item[0]] = item[1].num_cached_tokens
            for chunk in make_chunks(*item):
                yield sse(chunk)
            try:
                item = await stream.__anext__()
            except StopAsyncIteration:
                item = None
        last = final()
        if last is not None:
            yield sse(last)
    except Exception as exc:  # the status line is long sent: report in-band, as vLLM does
        yield sse(engine_error(exc, prompt_param).body())
    finally:
        await aclose(stream)
    yield sse("[DONE]")


async def stream_job(engine: EngineClient, raw: Request, job: Job, prompt_param: str, *, make_chunks: MakeChunks,
                     final: Callable[[], dict[str, Any] | None], opening: Iterable[dict[str, Any]] = ()) -> Response:
    """Start `job` and stream it: `opening` chunks first, `make_chunks` of every engine output,
    then `final()` unless it is None. A request the engine refuses is an HTTP error, not a stream."""
    try:
        stream, first = await unless_disconnected(raw, open_stream(engine, job, prompt_param))
    except ClientGone:
        return client_gone_response()
    return _SSEResponse(_events(job, stream, first, make_chunks, opening, final, prompt_param),
                        on_close=lambda: aclose(stream))
