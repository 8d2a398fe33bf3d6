"""On a GPU, Mistral and Qwen2 with sliding windows run the generated Triton kernels (the
window is the kernels' runtime argument), never the torch path, and match transformers within
bf16 tolerances."""

from __future__ import annotations

import os

import pytest
import torch

from .hf_models import generated, model_cache
from .window_models import WINDOW_MODELS, greedy_with_logits, hf_logits, our_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="needs a CUDA GPU")]

LAUNCHERS = ("triton_paged_prefill", "triton_paged_decode", "triton_varlen_attention")
TORCH_PATHS = ("_torch_paged_prefill", "_torch_paged_decode", "_torch_varlen_attention")
# bf16 weights and activations against transformers in float32. The logits of these tiny random
# models reach about 4; bf16 on the torch path is within 0.05 of them, while leaving the window
# out moves them by about 3.
BF16_ATOL = 0.15


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, WINDOW_MODELS)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton launchers' calls (with their windows); the torch path may not run."""
    fa = generated().flash_attention
    calls: list[tuple[str, int | None]] = []
    for name in LAUNCHERS:
        def counted(*args, _launch=getattr(fa, name), _name=name, **kwargs):
            calls.append((_name, kwargs.get("window")))
            return _launch(*args, **kwargs)

        monkeypatch.setattr(fa, name, counted)
    for name in TORCH_PATHS:
        def refused(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} ran: a windowed model fell back to torch attention on the GPU")

        monkeypatch.setattr(fa, name, refused)
    return calls


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("name", list(WINDOW_MODELS))
def test_windowed_models_run_the_triton_kernels_and_match_transformers(models, kernel_calls, name, block_size):
    model_dir, hf = models(name)
    model = our_model(model_dir, dtype=torch.bfloat16, device="cuda")
    steps = 6
    seqs, logits = greedy_with_logits(model, block_size, steps)
    layers = model.config.num_layers
    # One prefill step of fresh prompts (contiguous K/V), then decode steps over the pages.
    assert [n for n, _ in kernel_calls] == ["triton_varlen_attention"] * layers + ["triton_paged_decode"] * layers * (steps - 1)
    windows = {layer: model.model.layers[layer].self_attn.window for layer in range(layers)}
    assert [w for _, w in kernel_calls] == [windows[i % layers] for i in range(len(kernel_calls))]
    assert any(w is not None for w in windows.values())
    for seq, got in zip(seqs, logits):
        want = hf_logits(hf, seq[:-1])
        assert (got - want).abs().max() <= BF16_ATOL
