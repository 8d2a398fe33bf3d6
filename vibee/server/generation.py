"""Running a validated request on the engine: one engine request per prompt, merged into one
stream of outputs, aborted when the client goes away.

Cancellation: a generation is aborted by closing the engine's iterator. Streaming responses are
cancelled by Starlette when the client disconnects; while a non-streaming response (or the first
chunk of a streaming one) is being computed, a watcher task waits for the disconnect message and
cancels the generation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable

import anyio
from fastapi import Request
from fastapi.responses import Response

from vibee.server.errors import APIError, bad_request, is_engine_closed, one_line, service_unavailable
from vibee.server.protocol import PromptTokensDetails, UsageInfo
from vibee.server.state import EngineClient


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def client_gone_response() -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


@dataclass
class Choice:
    """One choice's running state for building responses."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_offset: int = 0  # completions logprobs: characters before the next token
    started: bool = False  # streaming: sent the first chunk (role / echo)


@dataclass
class Job:
    """A validated generation: one engine request per prompt."""

    request_id: str
    prompts: list[list[int]]
    params: list[Any]
    n: int
    prompt_texts: list[str] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    prompt_logprobs: dict[int, list[Any]] = field(default_factory=dict)  # by prompt index, when asked for
    prompt_only: bool = False  # max_tokens 0 with echo: the one token the engine samples is not sent

    def choice_index(self, prompt_index: int, index: int) -> int:
        return prompt_index * self.n + index

    def usage(self, choices: dict[int, Choice]) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = 0 if self.prompt_only else sum(c.num_tokens for c in choices.values())
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens)))


def engine_error(exc: BaseException, prompt_param: str) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if is_engine_closed(exc):
        return service_unavailable()
    if isinstance(exc, ValueError):
        return bad_request(one_line(str(exc)), param=prompt_param)
    return APIError(500, f"The engine failed: {type(exc).__name__}: {one_line(str(exc))}")


async def aclose(agen: Any) -> None:
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


async def _merge(engine: EngineClient, jobs: list[tuple[list[int], Any]],
                 request_id: str) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, RequestOutput) from one engine request per prompt, as they come.
    Closing this iterator closes (so aborts) every engine request still running."""
    if len(jobs) == 1:
        agen = engine.generate(jobs[0][0], jobs[0][1], request_id)
        try:
            async for out in agen:
                yield 0, out
        finally:
            await aclose(agen)
        return

    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    # Under the scheduler's "fair" policy a request's choices take turns with other requests': prompt
    # i's choices rank after the i * n choices of the prompts before it.
    agens = [engine.generate(ids, params, f"{request_id}-{i}", share_rank=i * params.n)
             for i, (ids, params) in enumerate(jobs)]

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
            await aclose(agen)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (sent when the client
    # goes away, or by the server after the response is complete).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await `awaitable`, cancelling it if the client disconnects first (-> ClientGone)."""
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
        raise ClientGone()
    return work.result()


async def open_stream(engine: EngineClient, job: Job,
                      prompt_param: str) -> tuple[AsyncIterator[tuple[int, Any]], Any]:
    """Open the engine requests and wait for the first output, so a refused request (closed
    engine, bad prompt) is a proper HTTP error rather than an error inside a 200 stream."""
    stream = _merge(engine, list(zip(job.prompts, job.params)), job.request_id)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException as exc:
        await aclose(stream)
        if isinstance(exc, Exception):
            raise engine_error(exc, prompt_param) from None
        raise  # cancelled: the client went away
    return stream, first


async def collect(engine: EngineClient, raw: Request, job: Job, prompt_param: str) -> dict[int, Choice]:
    """Run a non-streaming job to the end; ClientGone (and the job aborted) if the client leaves."""

    async def run() -> dict[int, Choice]:
        stream, item = await open_stream(engine, job, prompt_param)
        choices: dict[int, Choice] = {}
        try:
            while item is not None:
                prompt_index, out = item
                job.cached_tokens[prompt_index] = out.num_cached_tokens
                if out.prompt_logprobs is not None:
                    job.prompt_logprobs[prompt_index] = out.prompt_logprobs
                for c in out.outputs:
                    choice = choices.setdefault(job.choice_index(prompt_index, c.index), Choice())
                    choice.text, choice.num_tokens = c.text, c.num_tokens
                    choice.logprobs = c.logprobs
                    choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    item = None
        except Exception as exc:
            raise engine_error(exc, prompt_param) from None
        finally:
            await aclose(stream)
        return choices

    return await unless_disconnected(raw, run())
