"""`bench serve`'s load, sent from one process or split over several.

One Python process parsing every streamed chunk tops out near a core: on the H200 machine the
client used 100% of one while a server streamed ~20k tokens/s, so the figure was the client's.
With --client-processes N, request i goes to process i mod N; each runs the asyncio load on its
share (its share of the concurrency cap, and of the request rate: N independent Poisson processes
of rate r/N together are one of rate r), all start at one barrier, and the results are put back
in workload order. Each process reports the share of a core it used, so a saturated client shows.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import queue
import threading
import time
from typing import Any, Callable

from vibee.bench.report import Workload
from vibee.bench.serve_load import RequestResult, ServeBenchError, run_load

BUSY_CLIENT = 0.9  # a client process using this share of a core may have limited the figure


def shares(total: int | None, n: int) -> list[int | None]:
    """`total` (a concurrency cap, or None for none) split as evenly as it goes over n processes."""
    if total is None:
        return [None] * n
    return [total // n + (k < total % n) for k in range(n)]


def _measured_load(base_url, model, workload, request_rate, max_concurrency, api_key, seed, timeout,
                   on_done) -> tuple[list[RequestResult], float, float, float]:
    """(results, start, end, share of a core used): times on the monotonic clock, which every
    process of the machine shares."""
    cpu0, start = time.process_time(), time.monotonic()
    results, _ = asyncio.run(run_load(base_url, model, workload, request_rate=request_rate,
                                      max_concurrency=max_concurrency, api_key=api_key, seed=seed, timeout=timeout,
                                      on_done=on_done))
    end = time.monotonic()
    return results, start, end, (time.process_time() - cpu0) / max(end - start, 1e-9)


def _client(k: int, args: tuple, barrier, done, out) -> None:
    """One client process: wait for the others, run its share, send back what it measured."""
    try:
        barrier.wait(60)
        out.put((k, _measured_load(*args, on_done=lambda r: done.put(r.ok))))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent as one line
        out.put((k, f"{type(exc).__name__}: {exc}"))


def send_load(base_url: str, model: str, workload: Workload, *, processes: int, request_rate: float,
              max_concurrency: int | None, api_key: str | None, seed: int, timeout: float,
              on_done: Callable[[bool], None]) -> tuple[list[RequestResult], float, list[float]]:
    """(results in workload order, wall time from the first send to the last answer, the share of a
    core each client process used). on_done(ok) is called in this process once per request."""
    if max_concurrency is not None and max_concurrency < processes:
        raise ServeBenchError(f"--max-concurrency {max_concurrency} is below --client-processes {processes}: "
                              "every process needs at least one request in flight")
    if processes == 1:
        results, start, end, busy = _measured_load(base_url, model, workload, request_rate, max_concurrency, api_key,
                                                   seed, timeout, on_done=lambda r: on_done(r.ok))
        return results, end - start, [busy]
    ctx = multiprocessing.get_context("spawn")
    barrier, done, out = ctx.Barrier(processes), ctx.Queue(), ctx.Queue()
    caps = shares(max_concurrency, processes)
    parts = [Workload(workload.prompts[k::processes], workload.output_lens[k::processes]) for k in range(processes)]
    workers = [ctx.Process(target=_client, daemon=True, args=(
        k, (base_url, model, parts[k], request_rate / processes, caps[k], api_key, seed + k, timeout),
        barrier, done, out)) for k in range(processes)]
    for w in workers:
        w.start()
    finished = threading.Event()

    def relay() -> None:  # completions, for the caller's progress bar
        while not finished.is_set():
            try:
                on_done(done.get(timeout=0.1))
            except queue.Empty:
                pass

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    measured: dict[int, Any] = {}
    try:
        while len(measured) < processes:
            try:
                k, value = out.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w in workers if not w.is_alive() and w.exitcode not in (0, None)]
                if dead:
                    raise ServeBenchError(f"a client process exited with code {dead[0].exitcode}") from None
                continue
            if isinstance(value, str):
                raise ServeBenchError(f"client process {k}: {value}")
            measured[k] = value
    finally:
        finished.set()
        relay_thread.join(1.0)
        while True:  # what arrived after the last result
            try:
                on_done(done.get_nowait())
            except queue.Empty:
                break
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.terminate()
    results: list[RequestResult] = [None] * len(workload.prompts)  # type: ignore[list-item]
    for k, (part, _, _, _) in measured.items():
        results[k::processes] = part
    start = min(v[1] for v in measured.values())
    end = max(v[2] for v in measured.values())
    return results, end - start, [measured[k][3] for k in range(processes)]


def busy_client_note(busy: list[float]) -> str | None:
    """A warning when a client process was near a full core (its measurement may be its own limit)."""
    worst = max(busy, default=0.0)
    if worst < BUSY_CLIENT:
        return None
    more = max(2, 2 * len(busy))
    return (f"The busiest client process used {100 * worst:.0f}% of a core: the client may have limited these "
            f"figures; run again with --client-processes {more}.")


def rate_label(request_rate: float) -> str:
    return "inf (all at once)" if math.isinf(request_rate) else f"{request_rate:g} req/s (Poisson)"
