"""`vibee bench adversary` end to end against the real engine behind the HTTP server: the
oversized requests are refused, the largest accepted one is served whole, no normal stream is
lost, and the report says so (the latency ratio is a measurement, not checked here)."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner

from tests.server.harness import serve
from vibee.bench.cli import bench

pytestmark = pytest.mark.slow


def test_adversary_against_the_engine(tmp_path):
    from vibee.runtime.async_engine import AsyncEngine
    from vibee.runtime.config import EngineConfig
    from vibee.server.app import create_app

    engine = AsyncEngine.from_config(EngineConfig(device="cpu", cpu_kv_cache_gib=0.25, seed=0), progress=False)
    try:
        with serve(create_app(engine)) as url:
            result = CliRunner().invoke(bench, [
                "adversary", "--base-url", url, "--normal-streams", "4", "--input-len", "8:16", "--output-len", "6",
                "--huge-prompt-mb", "1", "--hog-prompts", "2", "--hog-n", "3", "--hog-output-len", "5",
                "--head-start", "0.1", "--result-dir", str(tmp_path)])
    finally:
        asyncio.run(engine.shutdown(timeout=0.0))
    assert result.exit_code == 0, result.output
    data = json.loads(next(tmp_path.glob("adversary-*.json")).read_text())
    adversary, verdict = data["adversary"], data["verdict"]
    assert adversary["huge_prompt"]["status"] == 400 and adversary["too_many_choices"]["status"] == 400
    assert adversary["hog"]["status"] == 200 and adversary["hog"]["completion_tokens"] == 2 * 3 * 5
    assert verdict["normal_lost"] == 0 and verdict["refused_cleanly"] and verdict["hog_served"]
    assert data["idle"]["completed"] == data["attack"]["completed"] == 4
    assert data["attack"]["itl_ms"]["count"] > 0 and verdict["itl_p99_ratio"] > 0
    assert "Verdict" in next(tmp_path.glob("adversary-*.md")).read_text()
