"""Triton compiles inside a timed region. A kernel compiles the first time its constexprs come
(about a second on a cold cache); inside a benchmark's timed loop that second is counted as
serving time, and while serving it stalls every request. H200, `bench throughput --quant int4`
before the engine compiled its quantized launches at load: four compiles in the timed loop took 4.1
of its 8.8 s. Counted through Triton's JIT hooks, chained to any already installed."""

from __future__ import annotations

import time
from collections import Counter


class JitCompiles:
    """`with JitCompiles() as jit:` counts the kernels Triton compiled (or loaded from its disk
    cache) inside the block: jit.count, jit.seconds, jit.kernels (name -> count).
    JitCompiles.process_wide(): one instance counting from its first call to the process's end
    (the server's /metrics)."""

    _process: JitCompiles | None = None

    @classmethod
    def process_wide(cls) -> JitCompiles:
        if cls._process is None:
            cls._process = cls().__enter__()
        return cls._process

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.kernels: Counter[str] = Counter()
        self._started: float | None = None
        self._saved: tuple = ()

    def _before(self, **kwargs) -> bool | None:
        self._started = time.perf_counter()
        return self._saved[0](**kwargs) if self._saved[0] else None  # True from a previous hook skips the compile

    def _after(self, **kwargs) -> None:
        self.count += 1
        self.kernels[kwargs["fn"].name.rsplit(".", 1)[-1]] += 1  # a qualified name: the function's own
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None
        if self._saved[1]:
            self._saved[1](**kwargs)

    def __enter__(self) -> JitCompiles:
        from triton import knobs

        self._saved = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc) -> None:
        from triton import knobs

        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved

    def summary(self) -> dict:
        return {"count": self.count, "seconds": self.seconds, "kernels": dict(self.kernels)}
