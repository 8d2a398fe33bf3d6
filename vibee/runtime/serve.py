"""`vibee serve`: build the engine, print what was loaded, and run the HTTP server until a signal.

Shutdown: uvicorn stops accepting on SIGINT/SIGTERM and waits up to `graceful_timeout` seconds
for open responses, which the engine keeps serving meanwhile; then the engine aborts whatever is
left and its thread stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from rich.console import Console

from vibee.runtime.async_engine import AsyncEngine
from vibee.runtime.config import EngineConfig
from vibee.runtime.kv_sizing import format_bytes
from vibee.runtime.offline import freeze_heap

console = Console(stderr=True, soft_wrap=True)
GIL_SWITCH_INTERVAL_S = 0.0002  # see run_server


def describe(engine: AsyncEngine) -> list[str]:
    """The startup summary: model, precision, KV capacity, and each optimization's state."""
    e = engine.engine
    mc = e.model_config
    lines = [
        f"model      {e.config.model_source} ({mc.architecture}, {mc.num_layers} layers, hidden {mc.hidden_size}, "
        f"{mc.num_heads}/{mc.num_kv_heads} heads) served as '{e.config.model_name}'",
        f"device     {e.device} {e.dtype_name}; max_model_len {e.max_model_len}",
        f"weights    {format_bytes(e.weight_bytes_loaded)}" + (
            f" -> {format_bytes(e.weight_bytes)} after --quant {e.config.quant}" if e.config.quant != "none" else ""),
        f"kv cache   {e.num_blocks} blocks x {e.block_size} tokens = {e.kv_capacity_tokens} tokens "
        f"({format_bytes(e.num_blocks * e.kv_bytes_per_block)})" + ("" if e.use_kv_cache else "  [--no-kv-cache: recompute]"),
    ]
    if e.memory_profile is not None:
        p = e.memory_profile
        lines.append(f"memory     sized at --gpu-memory-utilization {p['utilization']} of {format_bytes(p['total_bytes'])}: "
                     f"{format_bytes(p['in_use_bytes'])} in use before the KV cache (weights {format_bytes(p['weights_bytes'])}), "
                     f"activation peak {format_bytes(p['activation_peak_bytes'])} (profiled), "
                     f"CUDA graph reserve {format_bytes(p['graph_reserve_bytes'])}")
    lines += [
        f"batching   max_num_seqs {e.max_num_seqs}, max_num_batched_tokens {e.max_num_batched_tokens}, "
        f"prefix caching {'on' if e.enable_prefix_caching else 'off'}",
        f"attention  {'generated flash_attention' if e.config.flash_attn else 'generated reference (--no-flash-attn)'}",
        f"modules    {e.gen.source}",
    ]
    return lines


def run_server(config: EngineConfig, *, host: str, port: int, api_key: str | None,
               graceful_timeout: float = 30.0, log_level: str = "info") -> None:
    import prometheus_client
    import uvicorn

    from vibee.server.app import create_app

    prometheus_client.disable_created_metrics()  # no *_created series: /metrics shows what people read

    console.print(f"[bold]vibee serve[/bold]: loading {config.model_source}")
    engine = AsyncEngine.from_config(config, progress=True)
    freeze_heap()
    # The engine thread waits for the GPU with the GIL released and must get it back at once,
    # while the event loop thread streams to every client. Python hands the GIL over only every
    # switch interval (5 ms by default): a step that waits for the GPU twice can lose 10 ms.
    # A CPU model of it (a thread sleeping 0.5 ms then working, beside a busy thread) ran 174
    # steps/s at 5 ms and 1,056 at 0.2 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    for line in describe(engine):
        console.print("  " + line, highlight=False)
    app = create_app(engine, api_key=api_key)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    console.print(f"[bold green]serving[/bold green] http://{shown_host}:{port}/v1  "
                  f"(OpenAI API; /metrics, /v1/inference/info, /v1/inference/stats)"
                  + ("  API key required" if api_key else ""), highlight=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=graceful_timeout))
    # uvicorn re-raises the signal that stopped it once it has shut down; with Python's default
    # SIGTERM action that would kill the process before the engine stops, so take it as a no-op.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except KeyboardInterrupt:  # the re-raised SIGINT
        pass
    finally:
        asyncio.run(engine.shutdown(timeout=0.0))
        logging.getLogger("vibee").info("engine stopped")
        console.print("vibee serve: stopped")
