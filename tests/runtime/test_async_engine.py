"""The engine in its own process (async_engine.py + engine_core.py): the same outputs as the
engine in this process, aborts that free KV blocks, outputs merged when the reader falls behind,
and a dead engine process failing its requests instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.runtime.hf_models import make_model
from tests.runtime.test_engine import GREEDY, prompts
from vibee.runtime.async_engine import AsyncEngine, EngineClosed, EngineDead, EngineStartError
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.offline import generate
from vibee.runtime.output_stream import OutputStream
from vibee.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    make_model(model_dir, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return EngineConfig(model=model_dir, device="cpu", num_kv_blocks=64, seed=0)


def _choices(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


async def _final(engine, prompt, params, request_id):
    """The request's last output, with every choice's final state (outputs carry changed choices only)."""
    state, last = {}, None
    async for out in engine.generate(prompt, params, request_id):
        for c in out.outputs:
            state[c.index] = (c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs)
        last = out
    assert last.finished
    return [state[i] for i in sorted(state)]


def test_process_engine_equals_the_engine_in_process(config):
    """Concurrent requests (greedy, n = 2 sampled with a seed, stop strings, logprobs) give what
    the engine gives when called directly."""
    batch = prompts([7, 12, 5, 9])
    plain = generate(LLMEngine(config, progress=False), batch[2:3], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0].text
    stop_text = plain[6:9]
    params = [SamplingParams(max_tokens=20, **GREEDY),
              SamplingParams(max_tokens=16, n=2, temperature=0.9, seed=3),
              SamplingParams(max_tokens=20, stop=[stop_text], temperature=0.0),
              SamplingParams(max_tokens=12, logprobs=2, **GREEDY)]
    want = []
    for p, sp in zip(batch, params):
        out = generate(LLMEngine(config, progress=False), [p], sp)[0]
        want.append([(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in out.outputs])

    async def scenario():
        engine = AsyncEngine.from_config(config, progress=False)
        try:
            return await asyncio.gather(*[_final(engine, p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(batch, params))])
        finally:
            await engine.shutdown(timeout=0.0)

    got = asyncio.run(scenario())
    assert [[c[:4] for c in r] for r in got] == [[c[:4] for c in r] for r in want]
    assert got[2][0][2] == "stop" and stop_text not in got[2][0][1]
    got_lp, want_lp = got[3][0][4], want[3][0][4]
    assert [t.token_id for t in got_lp] == [t.token_id for t in want_lp]
    assert [t.logprob for t in got_lp] == pytest.approx([t.logprob for t in want_lp])


def test_cancel_frees_kv_and_closed_engine_refuses(config):
    async def scenario():
        engine = AsyncEngine.from_config(config, progress=False)
        done = [out async for out in engine.generate(prompts([8])[0], SamplingParams(max_tokens=5, **GREEDY), "a")]
        assert done[-1].finished and len(done[-1].outputs[0].token_ids) == 5
        gen = engine.generate(prompts([30])[0], SamplingParams(max_tokens=400, **GREEDY), "b")
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()  # the client went away
        for _ in range(500):
            stats = await engine.stats()
            if stats["requests"]["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert stats["requests"]["aborted"] == 1 and stats["kv_cache"]["used_blocks"] == 0
        info = await engine.info()
        assert info["model"]["max_model_len"] == engine.max_model_len
        await engine.shutdown(timeout=1.0)
        assert not engine.is_alive()
        with pytest.raises(EngineClosed):
            async for _ in engine.generate(prompts([8])[0], SamplingParams(max_tokens=5), "c"):
                pass

    asyncio.run(scenario())


def test_killed_engine_process_fails_requests_and_says_why(config):
    died = []

    async def scenario():
        engine = AsyncEngine.from_config(config, progress=False)
        engine.on_death = died.append
        gen = engine.generate(prompts([8])[0], SamplingParams(max_tokens=400, **GREEDY), "long")
        await gen.__anext__()
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(EngineDead, match="exit code -9"):
            async with asyncio.timeout(30):
                async for _ in gen:
                    pass
        assert not engine.is_alive()
        with pytest.raises(EngineDead):
            await engine.stats()
        with pytest.raises(EngineDead):
            await engine.generate(prompts([8])[0], SamplingParams(max_tokens=5), "x").__anext__()
        await engine.shutdown(timeout=0.0)

    asyncio.run(scenario())
    assert died and "exit code -9" in died[0]


def test_a_user_mistake_at_startup_is_a_message(tmp_path):
    with pytest.raises(EngineStartError, match=r"^error: .*config\.json: no supported 'architectures'"):
        (tmp_path / "config.json").write_text("{}")
        AsyncEngine.from_config(EngineConfig(model=tmp_path, device="cpu"), progress=False)


def test_output_stream_merges_steps_the_reader_missed():
    """Three steps' news taken at once is one output with all of it: deltas joined, final state."""

    async def scenario():
        stream = OutputStream("r", [1, 2], n=2, want_logprobs=False)
        stream.add(False, 4, [(0, "a", [10], None, None, None), (1, "x", [20], None, None, None)])
        first = await stream.next()
        assert [(c.index, c.delta_text, c.delta_token_ids) for c in first.outputs] == [(0, "a", [10]), (1, "x", [20])]
        stream.add(False, 4, [(0, "b", [11], None, None, None)])
        stream.add(False, 4, [(0, "c", [12], None, None, None), (1, "y", [21], None, "length", None)])
        stream.add(True, 4, [(0, "", [13], None, "stop", 13)])
        merged = await stream.next()
        assert merged.finished and merged.num_cached_tokens == 4
        c0, c1 = merged.outputs
        assert (c0.text, c0.delta_text, c0.token_ids, c0.delta_token_ids) == ("abc", "bc", [10, 11, 12, 13], [11, 12, 13])
        assert (c0.finish_reason, c0.stop_reason) == ("stop", 13)
        assert (c1.text, c1.delta_text, c1.token_ids, c1.finish_reason) == ("xy", "y", [20, 21], "length")
        stream.fail(EngineDead("gone"))
        with pytest.raises(EngineDead):
            await stream.next()

    asyncio.run(scenario())


def test_an_abort_reports_the_gauges_it_leaves(config):
    """With nothing left to step, no step would report the running/waiting/KV gauges an abort
    changed: the engine process sends them with the abort's outputs."""
    import multiprocessing

    from vibee.runtime.engine_core import EngineCore

    eng = LLMEngine(config, progress=False)
    ours, theirs = multiprocessing.Pipe()
    core = EngineCore(eng, theirs)
    core._handle(("add", "r", prompts([12])[0], SamplingParams(max_tokens=8), None, 0))
    core._handle(("abort", "r"))
    kind, deltas, steps, finished = ours.recv()
    assert kind == "step" and deltas[0][1] is True  # the aborted request's final output
    assert steps and (steps[-1].num_running, steps[-1].num_waiting, steps[-1].kv_cache_usage) == (0, 0, 0.0)
