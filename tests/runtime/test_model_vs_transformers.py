"""The runtime's Llama-family model against transformers on tiny random checkpoints: the same
logits (float32) for a flattened batch of sequences of different lengths, and the same greedy
continuations when every sequence decodes in one batch through the generated BlockManager and
PagedKVCache, over the generated flash attention, its reference, and with no KV cache."""

from __future__ import annotations

import copy

import pytest
import torch

from .hf_models import generated, model_cache
from vibee.runtime.attention import make_attention_batch
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model

ATOL = 1e-4
NEW_TOKENS = 32
PROMPT_LENS = [5, 17, 40, 1, 70]  # across block (16) and prefill tile (64) boundaries

VARIANTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "mistral": ("mistral", {"sliding_window": 8}),  # window smaller than the sequences: the mask matters
    "llama3_tied": ("llama", {"tie": True, "rope": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32}}),
    "qwen2_hd64_yarn": ("qwen2", {"hidden": 128, "heads": 2, "kv_heads": 1,
                                  "rope": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                           "original_max_position_embeddings": 128}}),
    "qwen2_window_layer1": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "llama_linear_bias": ("llama", {"attention_bias": True, "mlp_bias": True,
                                    "rope": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
}
GREEDY = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (loaded model dir, transformers model), built once per module."""
    return model_cache(tmp_path_factory, VARIANTS)


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in PROMPT_LENS]


def ours(model_dir, *, flash_attn: bool = True):
    loaded = load_model_dir(model_dir, dtype=torch.float32, device="cpu", progress=False)
    return build_model(loaded, generated(), flash_attn=flash_attn).eval()


def hf_logits(hf, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


class PagedRunner:
    """Drives the model the way the engine does: the generated BlockManager hands out blocks,
    the PagedKVCache holds K/V, every step is one flattened batch."""

    def __init__(self, model, num_blocks: int = 96):
        gen, cfg = generated(), model.config
        kv, kv_spec = gen.kv_cache, gen.config("kv_cache")
        self.model = model
        self.blocks = kv.BlockManager(num_blocks, kv_spec.block_size, kv_spec.enable_prefix_caching)
        self.cache = kv.PagedKVCache(cfg.num_layers, num_blocks, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float32,
                                     block_size=kv_spec.block_size)
        self.computed: dict[int, int] = {}

    def step(self, work: dict[int, tuple[list[int], int]]) -> list[torch.Tensor]:
        """work: seq id -> (all its tokens so far, how many to compute now). Returns the logits of
        the computed tokens per sequence. A new sequence skips what the prefix cache holds."""
        ids, q_lens, seq_lens, tables = [], [], [], []
        for seq_id, (tokens, count) in work.items():
            end = self.computed.get(seq_id, 0) + count
            cached = self.blocks.allocate(seq_id, tokens[:end])
            start = max(self.computed.get(seq_id, 0), min(cached, end - 1))  # keep >= 1 token to compute
            self.computed[seq_id] = end
            ids += tokens[start:end]
            q_lens.append(end - start)
            seq_lens.append(end)
            tables.append(self.blocks.block_table(seq_id))
        batch = make_attention_batch(q_lens, seq_lens, tables, self.cache.block_size)
        with torch.no_grad():
            logits = self.model.compute_logits(self.model(torch.tensor(ids), batch.positions(), batch, self.cache))
        return list(logits.split(q_lens))


def greedy(model, seqs: list[list[int]], *, kv_cache: bool) -> list[list[int]]:
    """NEW_TOKENS greedy tokens for every sequence, decoded together: with the paged cache one
    token per sequence per step (paged_decode), without it every token again (varlen)."""
    seqs = [list(s) for s in seqs]
    runner = PagedRunner(model) if kv_cache else None
    pending = {i: len(s) for i, s in enumerate(seqs)}  # tokens to compute in the next step
    for _ in range(NEW_TOKENS):
        if runner is not None:
            rows = runner.step({i: (seqs[i], n) for i, n in pending.items()})
        else:
            lens = [len(s) for s in seqs]
            batch = make_attention_batch(lens, lens, None, 16)
            with torch.no_grad():
                hidden = model(torch.tensor([t for s in seqs for t in s]), batch.positions(), batch, None)
                rows = list(model.compute_logits(hidden).split(lens))
        for s, row in zip(seqs, rows):
            s.append(int(row[-1].argmax()))
        pending = {i: 1 for i in range(len(seqs))}
    return [s[n:] for s, n in zip(seqs, PROMPT_LENS)]


def hf_greedy(hf, seqs: list[list[int]]) -> list[list[int]]:
    outs = []
    for s in seqs:
        ids = torch.tensor([s])
        # An explicit mask: generate would otherwise take pad_token_id tokens in the prompt for padding.
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        outs.append(out[0, len(s):].tolist())
    return outs


# ---- logits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_logits_match_transformers_in_one_flattened_batch(models, name):
    model_dir, hf = models(name)
    model = ours(model_dir)
    seqs = prompts()
    got = PagedRunner(model).step({i: (s, len(s)) for i, s in enumerate(seqs)})
    for s, logits in zip(seqs, got):
        torch.testing.assert_close(logits, hf_logits(hf, s), atol=ATOL, rtol=0)


@pytest.mark.parametrize("flash_attn", [True, False], ids=["flash", "reference"])
def test_no_kv_cache_logits_match_transformers(models, flash_attn):
    model_dir, hf = models("mistral")
    model = ours(model_dir, flash_attn=flash_attn)
    seqs = prompts(1)
    lens = [len(s) for s in seqs]
    batch = make_attention_batch(lens, lens, None, 16)
    with torch.no_grad():
        got = model.compute_logits(model(torch.tensor([t for s in seqs for t in s]), batch.positions(), batch, None))
    for s, logits in zip(seqs, got.split(lens)):
        torch.testing.assert_close(logits, hf_logits(hf, s), atol=ATOL, rtol=0)


def test_sliding_window_mask_is_what_makes_mistral_match(models):
    model_dir, hf = models("mistral")
    model = ours(model_dir)
    for layer in model.model.layers:
        layer.self_attn.window = None
    seq = prompts()[2]
    got = PagedRunner(model).step({0: (seq, len(seq))})[0]
    assert (got - hf_logits(hf, seq)).abs().max() > 1e-2


def test_chunked_prefill_and_prefix_cache_hits_mixed_with_decode(models):
    """Steps the engine makes: a prompt in two chunks next to a decoding sequence, and a new
    sequence whose first two blocks come from the prefix cache."""
    model_dir, hf = models("qwen2")
    runner = PagedRunner(ours(model_dir))
    a, b = prompts(2)[2], prompts(3)[4]  # 40 and 70 tokens
    runner.step({0: (a, len(a))})
    a = a + [7]
    got = runner.step({0: (a, 1), 1: (b, 30)})  # a decodes while b's first chunk prefills
    torch.testing.assert_close(got[0], hf_logits(hf, a)[-1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], hf_logits(hf, b)[:30], atol=ATOL, rtol=0)
    got = runner.step({1: (b, 40)})  # the rest of b, over its cached first chunk
    torch.testing.assert_close(got[0], hf_logits(hf, b)[30:], atol=ATOL, rtol=0)
    c = a[:32] + [3, 4, 5]  # shares two full blocks with a
    got = runner.step({2: (c, len(c))})
    assert got[0].shape[0] == 3  # only the tokens after the cached 32 were computed
    torch.testing.assert_close(got[0], hf_logits(hf, c)[32:], atol=ATOL, rtol=0)


# ---- greedy decoding --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_continuations(models):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf_greedy(models(name)[1], prompts())
        return cache[name]

    return get


@pytest.mark.parametrize("name", GREEDY)
@pytest.mark.parametrize("path", ["flash", "reference", "no_kv_cache"])
def test_batched_greedy_decoding_matches_transformers_generate(models, hf_continuations, name, path):
    model_dir, _ = models(name)
    model = ours(model_dir, flash_attn=path != "reference")
    fa = generated().flash_attention
    fa.reset_counters()
    got = greedy(model, prompts(), kv_cache=path != "no_kv_cache")
    assert got == hf_continuations(name)
    if path == "flash":  # the decode steps went through the split-KV decode kernel
        assert fa.COUNTERS.decode_calls == (NEW_TOKENS - 1) * model.config.num_layers


def test_quantize_model_swaps_the_projections(models):
    """The generated quantize_model finds the model's nn.Linear layers by their HF names."""
    model_dir, hf = models("qwen2_hd64_yarn")  # in_features 128 and 256: whole int4 groups
    model = ours(model_dir)
    quant = generated().quantization
    stats = quant.quantize_model(model, skip_modules=["lm_head"])
    assert stats.layers_quantized == 4 * model.config.num_layers and stats.layers_skipped == 1  # lm_head
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, quant.QuantLinear)
    # transformers with the same int4-rounded weights: equal up to the bf16 matmuls of QuantLinear.
    # A merged module's rows go back to its Hugging Face parts.
    merged = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    hf = copy.deepcopy(hf)
    hf_modules = dict(hf.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, quant.QuantLinear):
                weight = quant.dequantize(module.quantized_weight()).float()
                prefix, last = name.rsplit(".", 1)
                parts = [hf_modules[f"{prefix}.{part}"] for part in merged.get(last, (last,))]
                for part, rows in zip(parts, weight.split([p.out_features for p in parts])):
                    part.weight.copy_(rows)
    seq = prompts()[2]
    got = PagedRunner(model).step({0: (seq, len(seq))})[0]
    assert torch.nn.functional.cosine_similarity(got, hf_logits(hf, seq), dim=-1).min() > 0.999


@pytest.mark.parametrize("kv_dtype, stored, bound", [("int8", torch.int8, 0.05), ("fp8", torch.float8_e4m3fn, 0.2)])
def test_quantized_kv_cache_pages_keep_logits_close(models, tmp_path, monkeypatch, kv_dtype, stored, bound):
    """A kv_cache generated with kv_dtype int8 (attention reads dequantized pages: one int8 step
    of error per value) or fp8 (pages go to attention as they are and are widened there: 3
    mantissa bits per value): prefill and decode logits stay close to float32 ones."""
    from vibee.runtime.generated import load_generated

    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    gen = load_generated(knobs={"kv_cache": {"kv_dtype": kv_dtype}})
    assert gen.kv_cache.KV_DTYPE == kv_dtype
    model_dir, hf = models("llama")
    model = ours(model_dir)
    runner = PagedRunner(model)
    cfg = model.config
    runner.cache = gen.kv_cache.PagedKVCache(cfg.num_layers, 96, cfg.num_kv_heads, cfg.head_dim, dtype=torch.float32,
                                             block_size=gen.config("kv_cache").block_size)
    assert runner.cache.k_pages[0].data.dtype == stored
    seqs = prompts()
    got = runner.step({i: (s, len(s)) for i, s in enumerate(seqs)})
    seqs = [s + [int(g[-1].argmax())] for s, g in zip(seqs, got)]
    decoded = runner.step({i: (s, 1) for i, s in enumerate(seqs)})  # the decode path reads the stored pages
    errors = [(logits - hf_logits(hf, s)[-1:]).abs().max().item() for s, logits in zip(seqs, decoded)]
    assert 0 < min(errors) and max(errors) < bound
