"""`vibee serve`: build the engine, print what was loaded, and run the HTTP server until a signal.

Shutdown: uvicorn stops accepting on SIGINT/SIGTERM and waits up to `graceful_timeout` seconds
for open responses, which the engine keeps serving meanwhile; then the engine aborts whatever is
left and its process stops. If the engine process dies (a crash, a kill), the server stops too
and exits 1 with the reason, rather than answering 503 forever.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

from rich.console import Console

from vibee.runtime.async_engine import AsyncEngine
from vibee.runtime.config import EngineConfig

console = Console(stderr=True, soft_wrap=True)
GIL_SWITCH_INTERVAL_S = 0.0002  # see _serve


def run_server(config: EngineConfig, *, host: str, port: int, api_key: str | None, limits: Any = None,
               graceful_timeout: float = 30.0, log_level: str = "info") -> None:
    """limits: the server's ServerLimits (None: its defaults)."""
    import prometheus_client

    prometheus_client.disable_created_metrics()  # no *_created series: /metrics shows what people read

    console.print(f"[bold]vibee serve[/bold]: loading {config.model_source}")
    engine = AsyncEngine.from_config(config, progress=True)
    died: list[str] = []
    try:  # whatever happens from here, the engine process is stopped before this one exits
        _serve(engine, died, host=host, port=port, api_key=api_key, limits=limits, graceful_timeout=graceful_timeout,
               log_level=log_level)
    except KeyboardInterrupt:  # the re-raised SIGINT
        pass
    finally:
        asyncio.run(engine.shutdown(timeout=0.0))
        logging.getLogger("vibee").info("engine stopped")
        console.print("vibee serve: stopped")
    if died:
        console.print(f"[bold red]error[/bold red]: {died[0]}; vibee serve stopped", highlight=False)
        sys.exit(1)


def _serve(engine: AsyncEngine, died: list[str], *, host: str, port: int, api_key: str | None, limits: Any,
           graceful_timeout: float, log_level: str) -> None:
    import uvicorn

    from vibee.server.app import create_app

    # The reader thread hands each step's tokens to the event loop, which streams them to every
    # client; Python passes the GIL between the two only every switch interval (5 ms by default).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    for line in engine.facts.summary:
        console.print("  " + line, highlight=False)
    app = create_app(engine, api_key=api_key, limits=limits)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    console.print(f"[bold green]serving[/bold green] http://{shown_host}:{port}/v1  "
                  f"(OpenAI API; /metrics, /v1/inference/info, /v1/inference/stats)"
                  + ("  API key required" if api_key else ""), highlight=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=graceful_timeout))
    # uvicorn re-raises the signal that stopped it once it has shut down; with Python's default
    # SIGTERM action that would kill the process before the engine stops, so take it as a no-op.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    def engine_died(reason: str) -> None:  # the reader thread: ask uvicorn's loop to stop
        died.append(reason)
        server.should_exit = True

    engine.on_death = engine_died
    server.run()
