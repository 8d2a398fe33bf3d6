"""`vibee bench serve`: HTTP load against a running OpenAI-compatible server, like vLLM's
benchmark_serving. Requests arrive as a seeded Poisson process (or all at once) and/or under a
concurrency cap; each streams /v1/completions and is timed per content chunk.

TTFT is from sending the request to the first chunk with text; ITL is each gap between chunks
with text (a chunk may carry more than one token); TPOT is (e2e - TTFT) / (output tokens - 1)
with output tokens from the stream's usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx

from vibee.bench.report import Workload, summarize

FALLBACK_MIN_ID = 10  # without the server's special ids, stay clear of the low ids where they usually sit


class ServeBenchError(Exception):
    """A problem the user can fix (server unreachable, bad answer); the message is one line."""


# --- server-sent events --------------------------------------------------------------------------


class SSEParser:
    """Incremental server-sent-events parser: feed it bytes as they arrive, get back the `data`
    payload of each complete event. Handles \\n, \\r\\n and \\r line ends split across reads,
    comments, multi-line data and fields other than data (ignored)."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events: list[str] = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                return events
            line, width = cut
            raw, self._buf = self._buf[:line], self._buf[line + width:]
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)

    def close(self) -> list[str]:
        """End of stream: a last event without its blank line still counts (lenient)."""
        events = []
        if self._buf:
            event = self._line(self._buf.decode("utf-8", errors="replace"))
            self._buf = b""
            if event is not None:
                events.append(event)
        event = self._line("")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):  # a comment (keep-alive)
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None


def _line_end(buf: bytes) -> tuple[int, int] | None:
    """(index, width) of the first line end in buf, or None if none is complete yet."""
    n, r = buf.find(b"\n"), buf.find(b"\r")
    if r == -1 or (n != -1 and n < r):
        return (n, 1) if n != -1 else None
    if r + 1 == len(buf):
        return None  # a lone \r at the end may be half of \r\n: wait for the next read
    return (r, 2) if buf[r + 1:r + 2] == b"\n" else (r, 1)


# --- one request ---------------------------------------------------------------------------------


@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    prompt_tokens: int | None = None  # from usage
    output_tokens: int = 0
    usage_reported: bool = False
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _error_message(status: int, body: bytes) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            text = err["message"]
        elif isinstance(err, str):
            text = err
    except (ValueError, AttributeError):
        pass
    return f"HTTP {status}: {' '.join(text.split())[:300]}"


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                       headers: dict[str, str]) -> RequestResult:
    result = RequestResult(prompt_len=len(payload["prompt"]), max_tokens=payload["max_tokens"])
    content_chunks = 0
    first_choice_time: float | None = None
    last: float | None = None
    done = False
    start = time.perf_counter()

    def handle(data: str, now: float) -> None:
        nonlocal content_chunks, first_choice_time, last, done
        if data.strip() == "[DONE]":
            done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            raise ServeBenchError(f"the stream sent data that is not JSON: {data[:100]!r}") from None
        if isinstance(obj.get("error"), (dict, str)):
            err = obj["error"]
            raise ServeBenchError("error in stream: " + (err.get("message", str(err)) if isinstance(err, dict) else err))
        choices = obj.get("choices") or []
        if choices and first_choice_time is None:
            first_choice_time = now
        if any(c.get("text") for c in choices):
            content_chunks += 1
            if last is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
        usage = obj.get("usage")
        if usage:
            result.usage_reported = True
            result.output_tokens = int(usage.get("completion_tokens") or 0)
            if usage.get("prompt_tokens") is not None:
                result.prompt_tokens = int(usage["prompt_tokens"])

    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                result.error = _error_message(resp.status_code, await resp.aread())
                return result
            parser = SSEParser()
            async for chunk in resp.aiter_bytes():
                now = time.perf_counter()
                for data in parser.feed(chunk):
                    handle(data, now)
            for data in parser.close():
                handle(data, time.perf_counter())
    except ServeBenchError as exc:
        result.error = str(exc)
        return result
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return result
    result.e2e = time.perf_counter() - start
    if not done and not result.usage_reported:
        result.error = "the stream ended before [DONE]"
        return result
    if not result.usage_reported:
        result.output_tokens = content_chunks  # best guess: one token per chunk
    if result.ttft is None and first_choice_time is not None and result.output_tokens > 0:
        result.ttft = first_choice_time - start  # tokens came, but all decoded to empty text
    result.ok = True
    return result


# --- the load ------------------------------------------------------------------------------------


@dataclass
class ServerInfo:
    model: str
    vocab_size: int | None
    special_ids: list[int] | None
    max_model_len: int | None
    info: dict[str, Any] | None  # /v1/inference/info, when the server has it


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def probe_server(base_url: str, api_key: str | None, model: str | None, timeout: float = 30.0) -> ServerInfo:
    """Ask the server which model it serves and what its vocabulary is."""
    headers = auth_headers(api_key)
    with httpx.Client(base_url=base_url, headers=headers, timeout=timeout) as client:
        try:
            models = client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise ServeBenchError(f"cannot reach {base_url} ({type(exc).__name__}: {exc}); is the server running?") from None
        if models.status_code != 200:
            raise ServeBenchError(f"GET {base_url}/v1/models: {_error_message(models.status_code, models.content)}")
        if model is None:
            try:
                model = models.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise ServeBenchError(f"GET {base_url}/v1/models listed no model; pass --model") from None
        info = None
        try:
            resp = client.get("/v1/inference/info")
            if resp.status_code == 200:
                info = resp.json()
        except (httpx.HTTPError, ValueError):
            info = None  # not a vibee server: the caller falls back to --vocab-size
    m = (info or {}).get("model") or {}
    tok = (info or {}).get("tokenizer") or {}
    special = m.get("all_special_ids") or tok.get("all_special_ids")
    # A model's embedding is often padded past the tokenizer: ids beyond the tokenizer can't be decoded.
    sizes = [v for v in (m.get("vocab_size"), m.get("tokenizer_vocab_size"), tok.get("vocab_size")) if isinstance(v, int)]
    return ServerInfo(model=model, vocab_size=min(sizes) if sizes else None, special_ids=list(special) if special else None,
                      max_model_len=m.get("max_model_len"), info=info)


def arrival_gaps(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for the first, then exponential gaps (a Poisson
    process of `request_rate` per second); all 0 for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [0.0] + [rng.expovariate(request_rate) for _ in range(n - 1)]


async def run_load(base_url: str, model: str, workload: Workload, *, request_rate: float = math.inf,
                   max_concurrency: int | None = None, api_key: str | None = None, seed: int = 0,
                   timeout: float = 600.0,
                   on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send every request of the workload; returns the results (in workload order) and the wall time
    from the first send to the last answer."""
    headers = auth_headers(api_key)
    url = base_url.rstrip("/") + "/v1/completions"
    # Connections must never be the bottleneck: the benchmark would measure its own pool queue.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> RequestResult:
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                   "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if sem is None:
            result = await send_request(client, url, payload, headers)
        else:
            async with sem:
                result = await send_request(client, url, payload, headers)
        if on_done is not None:
            on_done(result)
        return result

    gaps = arrival_gaps(len(workload.prompts), request_rate, seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for gap, prompt, max_tokens in zip(gaps, workload.prompts, workload.output_lens):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(client, prompt, max_tokens)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return list(results), duration


def summarize_load(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The benchmark's figures (latencies in ms) over the successful requests."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "requests_without_usage": sum(not r.usage_reported for r in ok),
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": summarize([r.ttft for r in ok if r.ttft is not None], 1000.0),
        "tpot_ms": summarize([r.tpot for r in ok if r.tpot is not None], 1000.0),
        "itl_ms": summarize([x for r in ok for x in r.itl], 1000.0),
        "e2e_ms": summarize([r.e2e for r in ok if r.e2e is not None], 1000.0),
    }
