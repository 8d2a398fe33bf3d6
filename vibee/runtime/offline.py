"""Running an engine outside a server: prompts to completion, and the heap set aside for a
process whose one engine lives as long as it does."""

from __future__ import annotations

import gc
from typing import Callable

from vibee.runtime.engine import LLMEngine
from vibee.runtime.outputs import CompletionOutput, RequestOutput
from vibee.runtime.sampling_params import SamplingParams


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_step: Callable[[], None] | None = None) -> list[RequestOutput]:
    """Run prompts to completion offline; returns each request's final output (all choices)."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"offline-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params_list):
        engine.add_request(rid, prompt, p)
    final: dict[str, dict[int, CompletionOutput]] = {rid: {} for rid in ids}
    prompt_logprobs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                final[out.request_id][c.index] = c
            if out.prompt_logprobs is not None:
                prompt_logprobs[out.request_id] = out.prompt_logprobs
        if on_step:
            on_step()
    return [RequestOutput(rid, prompt, [final[rid][i] for i in sorted(final[rid])], True,
                          prompt_logprobs=prompt_logprobs.get(rid))
            for rid, prompt in zip(ids, prompts)]


def freeze_heap() -> None:
    """Move everything alive now (the model, the KV cache's bookkeeping, imports) out of the
    garbage collector's view: a full collection over that heap pauses a step for 100+ ms. For
    a process's one long-lived engine only (frozen cycles are never collected)."""
    gc.collect()
    gc.freeze()
