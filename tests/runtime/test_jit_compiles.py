"""JitCompiles: Triton compiles inside a timed region, through Triton's JIT hooks."""

from types import SimpleNamespace

import pytest
import torch
from triton import knobs

from vibee.runtime.jit_compiles import JitCompiles


def test_counts_each_compile_between_the_hooks_and_chains_and_restores_the_previous_ones(monkeypatch):
    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append(("cache", kw["fn"].name)) or None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(("post", kw["fn"].name)))
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    with JitCompiles() as jit:
        for name in ["_a", "_b", "_a"]:  # as Triton calls them around each compile
            assert knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name=name)) is None
            knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(name=name))
    assert (jit.count, dict(jit.kernels)) == (3, {"_a": 2, "_b": 1}) and jit.seconds >= 0
    assert seen == [(hook, name) for name in ["_a", "_b", "_a"] for hook in ("cache", "post")]
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before
    assert jit.summary() == {"count": 3, "seconds": jit.seconds, "kernels": {"_a": 2, "_b": 1}}


def test_a_previous_cache_hook_that_skips_the_compile_is_obeyed(monkeypatch):
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: True)
    with JitCompiles():
        assert knobs.runtime.jit_cache_hook(fn=SimpleNamespace(name="_a")) is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_kernel_compiled_inside_the_block_is_counted_once():
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(out_ptr, VALUE: tl.constexpr):
        tl.store(out_ptr + tl.arange(0, 16), tl.full([16], VALUE, tl.float32))

    out = torch.empty(16, device="cuda")
    with JitCompiles() as jit:
        _fill[(1,)](out, VALUE=3.0)
        _fill[(1,)](out, VALUE=3.0)  # compiled: launched from the cache
    assert jit.count == 1 and dict(jit.kernels) == {"_fill": 1} and jit.seconds > 0
    assert out.eq(3.0).all()
