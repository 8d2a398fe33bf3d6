"""Mistral's and Qwen2's sliding windows (config.json) reach the generated attention as its
`window` argument, layer by layer, and the runtime then matches transformers with windows
shorter than the prompts, on any KV block size (the kernels read the page size from the cache)."""

from __future__ import annotations

import pytest
import torch

from .hf_models import model_cache
from .window_models import (SLIDING_LAYERS, WINDOW, WINDOW_MODELS, AttentionSpy, PagedRunner, greedy_with_logits,
                            hf_logits, our_model, prompts)

ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return model_cache(tmp_path_factory, WINDOW_MODELS)


@pytest.mark.parametrize("name", list(WINDOW_MODELS))
def test_each_layer_passes_its_own_window_and_no_variant(models, name):
    model_dir, _ = models(name)
    model = our_model(model_dir)
    spy = AttentionSpy(model.attention.fa)
    model.attention.fa = spy
    PagedRunner(model).step(prompts())
    layers = model.config.num_layers
    assert len(spy.calls) == layers
    windows = [window for _, window, _ in spy.calls]
    assert windows == [WINDOW if layer in SLIDING_LAYERS[name] else None for layer in range(layers)]
    assert all(variants == () for _, _, variants in spy.calls)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("name", list(WINDOW_MODELS))
def test_windowed_models_match_transformers_on_any_block_size(models, name, block_size):
    model_dir, hf = models(name)
    seqs, logits = greedy_with_logits(our_model(model_dir), block_size)
    for seq, got in zip(seqs, logits):
        want = hf_logits(hf, seq[:-1])  # the last token was sampled, not computed
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(WINDOW_MODELS))
def test_without_the_window_the_models_would_not_match(models, name):
    model_dir, hf = models(name)
    model = our_model(model_dir)
    for layer in model.model.layers:
        layer.self_attn.window = None
    seq = prompts()[2]
    got = PagedRunner(model).step([seq])[0]
    assert (got - hf_logits(hf, seq)).abs().max() > 1e-2
