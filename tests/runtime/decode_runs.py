"""The same requests decoded per step and in decode rounds, for tests that compare the two."""

from __future__ import annotations

from collections.abc import Sequence

from vibee.engine_flags import split_flags
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams


def decode(prompts: Sequence[list[int] | str], params: Sequence[SamplingParams], *, rounds: int, device: str = "cpu",
           max_num_seqs: int = 4) -> tuple[LLMEngine, list[tuple[list[int], str, str]]]:
    """An engine of the built-in model (float32; num_scheduler_steps = rounds) and, for each prompt
    (token ids, or text its tokenizer encodes), its output's (token ids, text, finish reason)."""
    settings, knobs = split_flags({"num_scheduler_steps": rounds, "max_num_seqs": max_num_seqs})
    memory = {"dtype": "float32"} if device == "cuda" else {"cpu_kv_cache_gib": 0.25}
    engine = LLMEngine(EngineConfig(device=device, seed=0, **memory, **settings, knobs=knobs), progress=False)
    ids = [engine.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts]
    return engine, [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                    for o in generate(engine, ids, params)]
