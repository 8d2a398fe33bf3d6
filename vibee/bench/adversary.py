"""`vibee bench adversary`: does one hostile client slow everyone else down?

Against a running server, the same load of normal streams runs twice: alone (idle), then beside
an adversary that sends, at once:
- a prompt of `--huge-prompt-mb` of text (the server must refuse it without stalling: 413 or 400),
- a request of 300 prompts x n 16 (more completions than one request may ask: a 400),
- the largest request the server accepts, streamed: `--hog-prompts` prompts x n `--hog-n` choices
  of `--hog-output-len` tokens each (it must be served, and must not starve the others).
The adversary starts first (its requests are ahead in any first-come queue), the normal streams a
moment later. Reported: the normal streams' inter-token latency and TTFT in both runs and their
ratio (the issue's target: p99 ITL under 2x idle), normal requests lost, and what each adversary
request got.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import click
import httpx

from vibee.bench.report import Section, environment, fail, finish, parse_range, random_workload
from vibee.bench.serve_load import (FALLBACK_MIN_ID, SSEParser, ServeBenchError, auth_headers, probe_server,
                                   run_load, summarize_load)


async def _refusal(client: httpx.AsyncClient, url: str, payload: dict[str, Any], headers: dict[str, str]) -> dict:
    """Send a request the server should refuse; how it answered and how long it took."""
    start = time.perf_counter()
    try:
        resp = await client.post(url, json=payload, headers=headers)
        status, message = resp.status_code, resp.text[:200]
    except httpx.HTTPError as exc:
        status, message = None, f"{type(exc).__name__}: {exc}"
    return {"status": status, "seconds": time.perf_counter() - start, "message": message}


async def _hog(client: httpx.AsyncClient, url: str, payload: dict[str, Any], headers: dict[str, str]) -> dict:
    """Stream the largest accepted request to its end; tokens it got and how long it took."""
    start = time.perf_counter()
    tokens, status, error = 0, None, None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            status = resp.status_code
            if status != 200:
                error = (await resp.aread()).decode(errors="replace")[:200]
            else:
                parser = SSEParser()
                async for chunk in resp.aiter_bytes():
                    for data in parser.feed(chunk):
                        if data.strip() != "[DONE]" and '"completion_tokens"' in data:
                            usage = json.loads(data).get("usage") or {}
                            tokens = int(usage.get("completion_tokens") or tokens)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"status": status, "seconds": time.perf_counter() - start, "completion_tokens": tokens, "error": error}


async def run_attack(base_url: str, model: str, workload, *, huge_prompt_mb: float, hog_prompts: int, hog_n: int,
                     hog_output_len: int, vocab: int, api_key: str | None, timeout: float, head_start: float,
                     seed: int) -> tuple[dict[str, Any], list, float]:
    """The adversary's three requests and, `head_start` seconds after them, the normal load."""
    headers = auth_headers(api_key)
    url = base_url + "/v1/completions"
    hog_workload = random_workload(hog_prompts, (16, 16), (hog_output_len, hog_output_len), vocab,
                                   set(range(FALLBACK_MIN_ID)), seed + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client:
        huge = "lorem ipsum " * int(huge_prompt_mb * 2**20 / 12)
        tasks = {
            "huge_prompt": asyncio.create_task(_refusal(client, url, {"model": model, "prompt": huge, "max_tokens": 8},
                                                        headers)),
            "too_many_choices": asyncio.create_task(_refusal(
                client, url, {"model": model, "prompt": [[FALLBACK_MIN_ID + 1] * 4] * 300, "n": 16, "max_tokens": 8},
                headers)),
            "hog": asyncio.create_task(_hog(client, url, {
                "model": model, "prompt": hog_workload.prompts, "n": hog_n, "max_tokens": hog_output_len,
                "ignore_eos": True, "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}},
                headers)),
        }
        await asyncio.sleep(head_start)
        results, duration = await run_load(base_url, model, workload, api_key=api_key, seed=seed, timeout=timeout)
        adversary = {name: await task for name, task in tasks.items()}
    return adversary, results, duration


@click.command()
@click.option("--base-url", default="http://127.0.0.1:8000", show_default=True, help="The server (without /v1).")
@click.option("--model", default=None, help="Model name to request (default: the first of GET /v1/models).")
@click.option("--normal-streams", type=click.IntRange(min=1), default=32, show_default=True,
              help="Normal streamed requests, all sent at once, in both runs.")
@click.option("--input-len", default="32:128", show_default=True, help="Normal prompts' lengths (N or LOW:HIGH).")
@click.option("--output-len", default="64:128", show_default=True, help="Normal outputs' lengths (N or LOW:HIGH).")
@click.option("--huge-prompt-mb", type=float, default=10.0, show_default=True, help="Size of the huge prompt's text.")
@click.option("--hog-prompts", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--hog-n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--hog-output-len", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--head-start", type=float, default=0.5, show_default=True,
              help="Seconds the adversary's requests go ahead of the normal ones.")
@click.option("--api-key", envvar="VIBEE_API_KEY", default=None)
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds one request may take.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--result-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("results/bench"),
              show_default=True)
def adversary(base_url, model, normal_streams, input_len, output_len, huge_prompt_mb, hog_prompts, hog_n,
              hog_output_len, head_start, api_key, timeout, seed, result_dir):
    """Normal streams alone, then beside a hostile client: their latency ratio and nothing lost."""
    from rich.console import Console

    out, err = Console(), Console(stderr=True)
    base_url = base_url.rstrip("/").removesuffix("/v1")
    try:
        input_range, output_range = parse_range(input_len), parse_range(output_len)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    try:
        server = probe_server(base_url, api_key, model)
    except ServeBenchError as exc:
        fail(str(exc))
    vocab = server.vocab_size
    if vocab is None:
        fail(f"{base_url}/v1/inference/info gave no vocabulary size")
    excluded = set(server.special_ids) if server.special_ids is not None else set(range(FALLBACK_MIN_ID))
    workload = random_workload(normal_streams, input_range, output_range, vocab, excluded, seed)

    err.print(f"idle: {normal_streams} normal streams alone", highlight=False)
    idle_results, idle_duration = asyncio.run(run_load(base_url, server.model, workload, api_key=api_key, seed=seed,
                                                       timeout=timeout))
    err.print(f"attack: the same streams beside a {huge_prompt_mb:g} MB prompt, 300 prompts x n 16, and "
              f"{hog_prompts} prompts x n {hog_n} x {hog_output_len} tokens", highlight=False)
    adversary_out, attack_results, attack_duration = asyncio.run(run_attack(
        base_url, server.model, workload, huge_prompt_mb=huge_prompt_mb, hog_prompts=hog_prompts, hog_n=hog_n,
        hog_output_len=hog_output_len, vocab=vocab, api_key=api_key, timeout=timeout, head_start=head_start,
        seed=seed))
    idle, attack = summarize_load(idle_results, idle_duration), summarize_load(attack_results, attack_duration)

    def ratio(key: str, stat: str) -> float | None:
        a, b = attack[key][stat], idle[key][stat]
        return a / b if a is not None and b else None

    verdict = {"itl_p99_ratio": ratio("itl_ms", "p99"), "ttft_p99_ratio": ratio("ttft_ms", "p99"),
               "normal_lost": attack["failed"],
               "refused_cleanly": all(adversary_out[k]["status"] in (400, 413) for k in ("huge_prompt", "too_many_choices")),
               "hog_served": adversary_out["hog"]["status"] == 200
               and adversary_out["hog"]["completion_tokens"] == hog_prompts * hog_n * hog_output_len}
    verdict["met"] = (verdict["itl_p99_ratio"] is not None and verdict["itl_p99_ratio"] < 2.0
                      and verdict["normal_lost"] == 0 and verdict["refused_cleanly"] and verdict["hog_served"])
    settings = {"base_url": base_url, "model": server.model, "normal_streams": normal_streams, "input_len": input_len,
                "output_len": output_len, "huge_prompt_mb": huge_prompt_mb, "hog": f"{hog_prompts} x n {hog_n} x "
                f"{hog_output_len}", "head_start_s": head_start, "seed": seed,
                "server_device": ((server.info or {}).get("model") or {}).get("device")}
    data = {"benchmark": "adversary", "settings": settings, "idle": idle, "attack": attack,
            "adversary": adversary_out, "verdict": verdict, "server_info": server.info, "environment": environment()}
    rows = []
    for label, key in (("ITL (ms)", "itl_ms"), ("TTFT (ms)", "ttft_ms"), ("E2E (ms)", "e2e_ms")):
        for stat in ("median", "p99"):
            r = ratio(key, stat)
            rows.append([f"{label} {stat}", idle[key][stat], attack[key][stat], None if r is None else round(r, 2)])
    rows.append(["Normal requests completed", idle["completed"], attack["completed"], None])
    sections = [
        Section("Normal streams: idle vs beside the adversary", ["Metric", "Idle", "Attack", "Ratio"], rows),
        Section("Adversary", ["Request", "Status", "Seconds", "Detail"], [
            [name, r["status"], round(r["seconds"], 3),
             r.get("completion_tokens", None) if name == "hog" else (r.get("message") or "")[:80]]
            for name, r in adversary_out.items()]),
        Section("Verdict", ["Check", "Value"], [[k, v] for k, v in verdict.items()]),
        Section("Settings", ["Setting", "Value"], [[k, v] for k, v in settings.items()]),
    ]
    notes = ["Target (issue 13): the normal streams' p99 inter-token latency under 2x its idle value, no normal "
             "request lost, the oversized requests refused (413/400) and the largest accepted request served whole."]
    finish(out, result_dir, "adversary", data, f"vibee bench adversary: {server.model} at {base_url}", sections, notes)
