"""/v1/inference/info describes the model the server runs, not an example from the specs.

The served model is a tiny random Llama whose every dimension differs from the specs' example
shapes (16 layers, 8 KV heads, head_dim 64, bf16, Llama-3.2-1B's widths) and from the default
model, quantized to int8, with its own block size and block count, so a value taken from
anywhere but the running engine shows up as a mismatch."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Iterator

import httpx
import pytest

from .harness import serve

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, HEADS, KV_HEADS = 3, 192, 12, 3  # head_dim 16: one the generated attention has
HEAD_DIM = HIDDEN // HEADS
BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN = 8, 37, 96


@pytest.fixture(scope="module", params=["int8", "none"])
def served(request, tmp_path_factory):
    """(info JSON, the AsyncEngine, the transformers model the weights came from, an LLMEngine
    built here from the same config: the served one runs in its own process), int8 or not."""
    pytest.importorskip("transformers")
    from tests.runtime.hf_models import make_model
    from vibee.runtime.async_engine import AsyncEngine
    from vibee.runtime.config import EngineConfig
    from vibee.runtime.engine import LLMEngine
    from vibee.server.app import create_app

    root = tmp_path_factory.mktemp("info")
    hf = make_model(root / "tiny", "llama", hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, layers=LAYERS)
    config = EngineConfig(model=root / "tiny", device="cpu", quant=request.param, knobs={"kv_cache": {"block_size": BLOCK_SIZE}},
                          num_kv_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VIBEE_CACHE_DIR", str(root / "cache"))  # modules generated for these flags go here
        engine = AsyncEngine.from_config(config, progress=False)
        direct = LLMEngine(config, progress=False)
    try:
        with serve(create_app(engine)) as url:
            yield httpx.get(url + "/v1/inference/info").json(), engine, hf, direct
    finally:
        asyncio.run(engine.shutdown(timeout=0.0))


def _served_values(hf) -> dict[str, Any]:
    """What the served model is, from the checkpoint written and the flags given."""
    c = hf.config
    return {"num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "num_heads": c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads, "head_dim": HEAD_DIM, "vocab_size": c.vocab_size,
            "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "kv_block_size": BLOCK_SIZE,
            "num_kv_blocks": NUM_BLOCKS}


def test_info_model_is_the_served_model(served):
    info, engine, hf, direct = served
    model = info["model"]
    assert {k: model[k] for k in _served_values(hf)} == _served_values(hf)
    assert model["name"] == engine.served_model_name == "tiny"
    assert info == json.loads(json.dumps(direct.info()))  # the engine's own account, unchanged by the pipe


def test_info_model_matches_the_running_modules(served):
    info, _, _, running = served
    model = info["model"]
    decoder = running.model.model
    attn = decoder.layers[0].self_attn
    assert model["num_layers"] == len(decoder.layers)
    assert (model["vocab_size"], model["hidden_size"]) == tuple(decoder.embed_tokens.weight.shape)
    assert (model["num_heads"] + 2 * model["num_kv_heads"]) * model["head_dim"] == attn.qkv_proj.out_features
    assert model["num_heads"] * model["head_dim"] == attn.o_proj.in_features
    assert model["dtype"] == str(decoder.norm.weight.dtype).removeprefix("torch.")
    assert model["kv_block_size"] == running.block_manager.block_size
    assert model["num_kv_blocks"] == running.block_manager.num_free_blocks()


def test_info_quantization_is_what_was_applied(served):
    info, engine, _, running = served
    quantized = sum(type(m).__name__ == "QuantLinear" for m in running.model.modules())
    if engine.config.quant == "none":
        assert quantized == 0 and info["model"]["quantization"] is None
        return
    # Fused qkv and gate/up projections, o and down per layer, and the LM head; int8 is per
    # output channel (group_size -1).
    assert quantized == 4 * LAYERS + 1
    assert info["model"]["quantization"] == {"method": "rtn", "bits": 8, "group_size": -1,
                                             "source": "quantized at load", "layers_quantized": quantized}


def _model_facts(doc: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(where, key, value) of every model-shape key anywhere in the document."""
    keys = {"num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "dtype"}
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in keys:
                yield path, key, value
            yield from _model_facts(value, f"{path}.{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _model_facts(value, f"{path}[{i}]")


def test_info_shows_no_model_shape_but_the_served_one(served):
    info, _, hf, _ = served
    truth = _served_values(hf)
    wrong = [(f"{where}.{key}", value) for where, key, value in _model_facts(info) if value != truth[key]]
    assert wrong == []
