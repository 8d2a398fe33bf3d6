"""GGUF files: a tiny random Llama written with the gguf package the way llama.cpp's converter
writes one (q/k rows permuted, Q8_0 / Q4_0 linear layers, byte-level BPE tokenizer metadata),
served by vibee against transformers running the weights that gguf's own dequantize gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.runtime.hf_models import make_model, train_tokenizer
from vibee.runtime.attention import make_attention_batch
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.generated import load_generated
from vibee.runtime.loader import LoadError, load_model_dir
from vibee.runtime.model import build_model
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (its published form)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q6_k_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Q6_K data for a [rows, cols] weight (cols a multiple of 256), which gguf cannot quantize:
    random 6-bit values and int8 sub-block scales 1..4 under an fp16 d of 1e-3 per 256 weights
    (a block: 128 bytes of low bits, 64 of high bits, 16 scales, then d)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(1, 5, size=(rows, cols // 256, 16), dtype=np.uint8)
    blocks[..., 208:210] = np.array([1e-3], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def q4_k_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Q4_K data for a [rows, cols] weight (cols a multiple of 256), which gguf cannot quantize:
    random nibbles and 6-bit scales and minima under fp16 d = 2e-5 and dmin = 2e-4 per 256
    weights (a block: d, dmin, 12 bytes of scales and minima, 128 of nibbles)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.array([2e-5], dtype=np.float16).view(np.uint8)
    blocks[..., 2:4] = np.array([2e-4], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


K_QUANT_BLOCKS = {"Q4_K": q4_k_blocks, "Q6_K": q6_k_blocks}


def write_gguf(path, kind: str, seed: int = 0, pre: str = "default", hidden: int = 64,
               kinds: dict[str, str] | None = None, output: str | None = None):
    """A tiny Llama as a .gguf file with its linear layers in `kind` (Q8_0, Q4_0, Q4_1, F32, or a
    K-quant on a model 256 wide), those
    named in `kinds` (GGUF short name -> type) in theirs, and output.weight in `output` (a type
    gguf quantizes, or Q6_K) or F32; returns transformers' model with the weights gguf's
    dequantize gives for them."""
    from gguf import GGMLQuantizationType as T, GGUFWriter
    from gguf.quants import dequantize, quantize

    hf = make_model(path.parent / "hf", hidden=hidden, layers=2, seed=seed)
    c = hf.config
    tok = train_tokenizer()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") and len(t) > 2 else 1 for t in tokens])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_add_bos_token(True)
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if output is None:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    else:
        rows, cols = state["lm_head.weight"].shape
        blocks = (K_QUANT_BLOCKS[output](rows, cols, seed) if output in K_QUANT_BLOCKS
                  else quantize(state["lm_head.weight"], getattr(T, output)))
        writer.add_tensor("output.weight", blocks, raw_dtype=getattr(T, output))
        hf.lm_head.weight.data.copy_(torch.from_numpy(dequantize(blocks, getattr(T, output)).reshape(rows, cols).copy()))
    for i in range(c.num_hidden_layers):
        for name, short in GGUF_NAMES.items():
            w = state[f"model.layers.{i}.{name}.weight"]
            if name == "self_attn.q_proj":
                w = permute(w, c.num_attention_heads)
            elif name == "self_attn.k_proj":
                w = permute(w, c.num_key_value_heads)
            layer_kind = (kinds or {}).get(short, kind)
            if w.ndim == 2 and layer_kind != "F32":
                qtype = getattr(T, layer_kind)
                blocks = K_QUANT_BLOCKS[layer_kind](*w.shape, seed + i) if layer_kind in K_QUANT_BLOCKS else quantize(w, qtype)
                writer.add_tensor(f"blk.{i}.{short}.weight", blocks, raw_dtype=qtype)
                w = dequantize(blocks, qtype)  # what the file holds, by gguf's own reading
            else:
                writer.add_tensor(f"blk.{i}.{short}.weight", np.ascontiguousarray(w))
            if name in ("self_attn.q_proj", "self_attn.k_proj"):  # back to Hugging Face's row order
                heads = c.num_attention_heads if name == "self_attn.q_proj" else c.num_key_value_heads
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
            hf.get_submodule(f"model.layers.{i}.{name}").weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf, tok


def logits_of(path, ids):
    settings = EngineConfig(model=path).knob_settings("float32")
    settings.setdefault("quantization", {})["compute_dtype"] = "fp32"  # exact scales and sums: compare tightly
    gen = load_generated(knobs=settings)
    loaded = load_model_dir(path, dtype=torch.float32, progress=False)
    model = build_model(loaded, gen).eval()
    batch = make_attention_batch([len(ids)], [len(ids)], None, 16, "cpu")
    with torch.inference_mode():
        return model, gen, model.compute_logits(model(torch.tensor(ids), batch.positions(), batch, None))


@pytest.mark.parametrize("kind, bits", [("Q8_0", 8), ("Q4_0", 4), ("Q4_1", 4), ("F32", None)])
def test_gguf_logits_match_transformers_on_what_the_file_holds(tmp_path, kind, bits):
    path = tmp_path / "tiny.gguf"
    hf, _ = write_gguf(path, kind)
    ids = [3, 17, 42, 99, 5, 250, 7, 61, 12, 140]
    model, gen, got = logits_of(path, ids)
    layers = [m for m in model.modules() if isinstance(m, gen.quantization.QuantLinear)]
    assert len(layers) == (0 if bits is None else 8) and (bits is None or gen.quantization.BITS == bits)
    if kind == "Q4_1":  # asymmetric codes with the file's fractional zero points, not rounded ones
        assert not gen.quantization.SYMMETRIC
        assert all(m.zeros.dtype == torch.float32 and bool((m.zeros != m.zeros.round()).any()) for m in layers)
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gguf_tokenizer_encodes_like_the_models(tmp_path):
    path = tmp_path / "tiny.gguf"
    _, tok = write_gguf(path, "Q8_0")
    loaded = load_model_dir(path, progress=False)
    text = "def add(a, b):\n    return a + b  # Héllo wörld"
    assert loaded.tokenizer.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text, add_special_tokens=False)) == text
    assert loaded.tokenizer.bos_token_id == tok.token_to_id("<s>")


def test_engine_serves_a_gguf_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "Q4_0")
    engine = LLMEngine(EngineConfig(model=path, device="cpu"), progress=False)
    assert engine.applied_quantization() == {"method": "gguf", "bits": 4, "group_size": 32, "source": "gguf checkpoint",
                                             "layers_quantized": 8}
    (out,) = generate(engine, [[3, 17, 42]], SamplingParams(max_tokens=5, temperature=0))
    assert len(out.outputs[0].token_ids) == 5


def test_an_unsupported_tokenizer_is_named(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "Q8_0", pre="deepseek-llm")
    with pytest.raises(LoadError, match="pre-tokenizer 'deepseek-llm' is not supported yet"):
        load_model_dir(path, progress=False)


SPLIT_TEXT = "I'm 12345 ok\n\n  don'T x=1.5"
# Each pre-tokenizer's pieces of SPLIT_TEXT (in byte-level letters: Ġ a space, Ċ a newline), by
# hand from llama.cpp's patterns: GPT-2 keeps digit runs and attaches a space to the next piece;
# Llama 3 cuts digits in threes, keeps newlines apart and matches contractions in any case; Qwen2
# as Llama 3 with single digits; SmolLM single digits, then GPT-2.
SPLITS = {
    "gpt2": ["I", "'m", "Ġ12345", "Ġok", "ĊĊĠ", "Ġdon", "'", "T", "Ġx", "=", "1", ".", "5"],
    "llama-bpe": ["I", "'m", "Ġ", "123", "45", "Ġok", "ĊĊ", "Ġ", "Ġdon", "'T", "Ġx", "=", "1", ".", "5"],
    "qwen2": ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "Ġok", "ĊĊ", "Ġ", "Ġdon", "'T", "Ġx", "=", "1", ".", "5"],
    "smollm": ["I", "'m", "Ġ", "1", "2", "3", "4", "5", "Ġok", "ĊĊĠ", "Ġdon", "'", "T", "Ġx", "=", "1", ".", "5"],
}


@pytest.mark.parametrize("pre", sorted(SPLITS))
def test_each_pre_tokenizer_splits_as_llama_cpp_does(pre):
    from vibee.runtime.gguf_tokenizer import pre_tokenizer

    assert [piece for piece, _ in pre_tokenizer(pre).pre_tokenize_str(SPLIT_TEXT)] == SPLITS[pre]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_files_with_other_pre_tokenizers_load_and_round_trip(tmp_path, pre):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "Q8_0", pre=pre)
    tokenizer = load_model_dir(path, progress=False).tokenizer
    text = "def add(a, b):\n    return a + 12345  # Héllo"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    digits = tokenizer.encode("12345", add_special_tokens=False)
    assert len(digits) >= (2 if pre == "llama-bpe" else 5)  # digits never merge across the split


def test_other_gguf_types_load_dequantized_beside_the_codes(tmp_path, caplog):
    """A Q4_0 file with v_proj in Q4_1, down_proj in Q5_0 and its output.weight in Q5_1, as
    llama.cpp's mixes have: the Q4_0 and Q4_1 layers stay int4 codes (q/k/v one asymmetric layer,
    zero point 8 for the Q4_0 parts), the others load as floats (with a warning), and the logits
    are transformers' on what the file holds."""
    path = tmp_path / "mixed.gguf"
    hf, _ = write_gguf(path, "Q4_0", kinds={"attn_v": "Q4_1", "ffn_down": "Q5_0"}, output="Q5_1")
    ids = [3, 17, 42, 99, 5, 250, 7, 61, 12, 140]
    model, gen, got = logits_of(path, ids)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith(("qkv_proj", "down_proj", "up_proj"))}
    assert kinds and all((k == "QuantLinear") != name.endswith("down_proj") for name, k in kinds.items()), kinds
    assert "stored as Q5_0 load dequantized" in caplog.text and not gen.quantization.SYMMETRIC
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_q4_1_blocks_become_codes_scales_and_zero_points_exactly(tmp_path):
    """Every Q4_1 block as (code - zero) * scale gives what gguf's dequantize reads, including
    blocks whose scale d is 0 (a constant block: every weight is its minimum m)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    from vibee.runtime.gguf_file import _codes

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, size=(6, 128)).astype(np.float32) + rng.normal(0, 0.05, size=(6, 1)).astype(np.float32)
    w[1, 32:64] = 0.25  # d = 0, m = 0.25
    w[4, :32] = 0.0  # d = 0, m = 0
    blocks = quantize(w, T.Q4_1)
    codes, scales, zeros = _codes(blocks, "Q4_1", 6)
    assert zeros.dtype == torch.float32 and bool((scales[1, 1] == 0.25) & (zeros[1, 1] == 0))
    per_weight = lambda t: t.double().repeat_interleave(32, dim=1)  # noqa: E731
    got = (codes.double() - per_weight(zeros)) * per_weight(scales)
    expected = torch.from_numpy(dequantize(blocks, T.Q4_1).reshape(6, 128)).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_q4_k_blocks_become_codes_scales_and_zero_points_exactly():
    """Every Q4_K sub-block of 32 as (code - zero) * scale gives what gguf's dequantize reads,
    including sub-blocks whose 6-bit scale is 0 (constant: minus their minimum)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from vibee.runtime.gguf_file import _codes

    blocks = q4_k_blocks(4, 512, seed=3).reshape(4, 2, 144)
    blocks[1, 0, 4] &= 0xC0  # scale 0 of row 1's first super-block (byte 4 + 0, low 6 bits): 0
    blocks[2, 1, 12] &= 0xF0  # scale 4 of row 2's second super-block: its low bits (byte 4 + 8) ...
    blocks[2, 1, 4] &= 0x3F  # ... and its top bits (byte 4 + 0, top 2 bits)
    blocks = blocks.reshape(4, -1)
    codes, scales, zeros = _codes(blocks, "Q4_K", 4)
    assert codes.shape == (4, 512) and scales.shape == zeros.shape == (4, 16)
    assert scales[1, 0] < 0 and zeros[1, 0] == 0 and scales[2, 12] <= 0
    per_weight = lambda t: t.double().repeat_interleave(32, dim=1)  # noqa: E731
    got = (codes.double() - per_weight(zeros)) * per_weight(scales)
    expected = torch.from_numpy(dequantize(blocks, T.Q4_K).reshape(4, 512)).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)


def test_q4_k_layers_load_as_int4_codes(tmp_path):
    path = tmp_path / "q4k.gguf"
    hf, _ = write_gguf(path, "Q4_K", hidden=256, output="Q6_K")
    ids = [3, 17, 42, 99, 5]
    model, gen, got = logits_of(path, ids)
    layers = [m for m in model.modules() if isinstance(m, gen.quantization.QuantLinear)]
    assert len(layers) == 8 and gen.quantization.BITS == 4 and all(m.zeros.dtype == torch.float32 for m in layers)
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_file_with_both_bit_widths_keeps_the_commoner_as_codes(tmp_path, caplog):
    """One generated module holds one bit width: a Q4_0 file with Q8_0 down_proj layers keeps the
    Q4_0 layers as int4 codes and loads the Q8_0 ones dequantized, with a warning."""
    path = tmp_path / "widths.gguf"
    hf, _ = write_gguf(path, "Q4_0", kinds={"ffn_down": "Q8_0"})
    ids = [3, 17, 42, 99, 5]
    model, gen, got = logits_of(path, ids)
    quantized = {name for name, m in model.named_modules() if isinstance(m, gen.quantization.QuantLinear)}
    assert gen.quantization.BITS == 4 and quantized and not any(name.endswith("down_proj") for name in quantized)
    assert "stored as Q8_0 load dequantized" in caplog.text
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_k_quant_output_weight_loads_dequantized(tmp_path):
    """A Q4_0 file's output.weight is usually Q6_K (written here from raw blocks: gguf does not
    quantize K-quants), on a 256-wide model (K-quant rows are 256 weights)."""
    path = tmp_path / "q6k.gguf"
    hf, _ = write_gguf(path, "Q4_0", hidden=256, output="Q6_K")
    ids = [3, 17, 42, 99, 5]
    _, _, got = logits_of(path, ids)
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
