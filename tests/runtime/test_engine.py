"""The engine end to end on tiny random checkpoints saved by transformers: batching, chunked
prefill, preemption, prefix caching and the flags that turn optimizations off all give the same
greedy tokens, and those equal transformers' own greedy generation."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

from tests.runtime.eager_graphs import use_eager_graphs
from tests.runtime.hf_models import VOCAB_SIZE, make_model
from vibee.engine_flags import split_flags
from vibee.runtime.config import EngineConfig
from vibee.runtime.engine import LLMEngine
from vibee.runtime.offline import generate
from vibee.runtime.sampling_params import SamplingParams
from vibee.runtime.speed_gate import SpeedGate

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama (head_dim 16, GQA 4:2) and transformers' copy of it."""
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    hf = make_model(model_dir, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return model_dir, hf


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(5, VOCAB_SIZE) for _ in range(n)] for n in lengths]


def engine(model_dir, **flags) -> LLMEngine:
    settings, knobs = split_flags(flags)  # as `vibee serve` splits its flags
    return LLMEngine(EngineConfig(model=model_dir, device="cpu", **settings, knobs=knobs), progress=False)


def run(eng, prompt_list, **params):
    outs = generate(eng, prompt_list, SamplingParams(**params))
    return [[c.token_ids for c in out.outputs] for out in outs]


def run_tokens(eng, prompt_list, **params):
    return run(eng, prompt_list, **GREEDY, **params)


def test_greedy_batch_equals_transformers(tiny):
    model_dir, hf = tiny
    batch = prompts([3, 17, 40, 9])
    got = run(engine(model_dir), batch, max_tokens=32, **GREEDY)
    for prompt, (tokens,) in zip(batch, got):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                          min_new_tokens=32, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()


def test_prompt_logprobs_are_transformers_even_for_a_prefix_cache_hit(tiny):
    """Each prompt token's logprob given the ones before it, with its top alternatives; the second
    request finds the prompt in the prefix cache and still gets every position scored."""
    model_dir, hf = tiny
    eng = engine(model_dir, max_num_batched_tokens=16, max_num_seqs=4)  # the prompt prefills in chunks too
    (prompt,) = prompts([37], seed=5)
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    params = SamplingParams(max_tokens=2, prompt_logprobs=3, **GREEDY)
    for attempt in range(2):
        (out,) = generate(eng, [prompt], params)
        if attempt:
            assert out.outputs and eng.block_manager.prefix_cache_hits > 0
        first, *scored = out.prompt_logprobs
        assert first is None and len(scored) == len(prompt) - 1
        for i, entry in enumerate(scored):
            assert entry.token_id == prompt[i + 1]
            assert entry.logprob == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-5)
            top_ids = [t for t, _ in entry.top]
            assert top_ids == ref[i].topk(3).indices.tolist()


@pytest.fixture(scope="module")
def baseline(tiny):
    """Greedy tokens for a mixed batch with plenty of blocks and budget."""
    model_dir, _ = tiny
    batch = prompts([20, 33, 7, 26, 15, 40], seed=1)
    return batch, run(engine(model_dir), batch, max_tokens=24, **GREEDY)


def test_preemption_loses_nothing(tiny, baseline):
    model_dir, _ = tiny
    batch, expected = baseline
    # 6 blocks of 16 tokens: two sequences at most hold their whole KV at once.
    eng = engine(model_dir, num_kv_blocks=6)
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected
    assert eng.stats()["batching"]["preemptions"] > 0
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


@pytest.mark.parametrize("num_kv_blocks", [None, 6])
def test_decode_graph_inputs_keep_tokens_on_cpu(tiny, baseline, monkeypatch, num_kv_blocks):
    """The host side of the CUDA-graph decode step on the CPU: "graphs" that run the model
    eagerly on DecodeGraphs' static buffers (what a captured graph reads) give the eager tokens,
    padding rows and preemptions (tables taken afresh) included. One scheduler step per host
    round trip: every decode step replays a graph (rounds are test_multi_step.py's)."""
    replayed = use_eager_graphs(monkeypatch)
    model_dir, _ = tiny
    batch, expected = baseline
    eng = engine(model_dir, max_num_seqs=8, num_kv_blocks=num_kv_blocks, num_scheduler_steps=1)
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected
    preempted = eng.stats()["batching"]["preemptions"] > 0
    assert preempted == (num_kv_blocks is not None)
    assert set(replayed) == ({1, 2, 4} if preempted else {8})  # 6 sequences padded to 8; or 3 to 4
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_speculative_verification_runs_as_graph_rows(tiny, baseline, monkeypatch):
    """A sequence verifying k n-gram drafts is k + 1 one-token rows of a decode graph (on the CPU:
    eager replays of DecodeGraphs' buffers), checked on the host against the graph's argmax:
    the greedy tokens of plain decoding, with drafts accepted."""
    from vibee.runtime.cuda_graphs import DecodeGraphs

    rows = []

    def run(self, input_ids, *args, **kwargs):
        rows.append(len(input_ids))
        return real_run(self, input_ids, *args, **kwargs)

    real_run = DecodeGraphs.run
    use_eager_graphs(monkeypatch)
    monkeypatch.setattr(DecodeGraphs, "run", run)
    model_dir, _ = tiny
    batch, expected = baseline
    eng = engine(model_dir, max_num_seqs=32, speculative=True)
    eng.speed_gate = SpeedGate.held()  # speculating throughout
    eng.speculator.rounds = None  # drafts from the host (rounds on the device: test_ngram_rounds.py)
    assert run_tokens(eng, batch[:4], max_tokens=24) == expected[:4]  # some sequences draft, some do not
    figures = eng.stats()["speculative_decoding"]
    assert figures["num_accepted_tokens"] > 0  # drafts were verified and kept
    assert max(rows) > 2  # more rows than sequences: the drafts' rows


def test_chunked_prefill_same_tokens(tiny, baseline):
    model_dir, _ = tiny
    batch, expected = baseline
    eng = engine(model_dir, max_num_batched_tokens=8, max_num_seqs=4)
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected
    assert eng.stats()["batching"]["last_step_batched_tokens"] <= 8


@pytest.mark.parametrize("flags", [dict(kv_cache=False), dict(flash_attn=False), dict(block_size=32),
                                   dict(enable_prefix_caching=False)])
def test_switches_keep_tokens(tiny, baseline, flags, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    model_dir, _ = tiny
    batch, expected = baseline
    eng = engine(model_dir, **flags)
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected
    if "block_size" in flags:
        assert eng.block_size == 32 and eng.kv_cache.k_pages[0].data.shape[1] == 32


def test_prefix_cache_hit_reuses_kv(tiny):
    model_dir, _ = tiny
    eng = engine(model_dir)
    prompt = prompts([40], seed=3)
    first = generate(eng, prompt, SamplingParams(max_tokens=8, **GREEDY))[0]
    eng.add_request("again", prompt[0], SamplingParams(max_tokens=8, **GREEDY))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].num_cached_tokens == 32  # two full blocks of 16 of the 40-token prompt
    assert outs[-1].outputs[0].token_ids == first.outputs[0].token_ids
    assert eng.stats()["kv_cache"]["prefix_cache_hit_rate"] > 0


def test_seeded_sampling_is_reproducible_and_choices_differ(tiny):
    model_dir, _ = tiny
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    alone = generate(engine(model_dir), prompts([12], seed=4), params)[0]
    # The same request in a busier batch, next to unseeded requests, draws the same tokens.
    crowd = generate(engine(model_dir), prompts([12], seed=4) + prompts([30, 5], seed=5),
                     [params, SamplingParams(temperature=1.0, max_tokens=16), SamplingParams(temperature=1.0, max_tokens=9)])[0]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowd.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) == 3
    other = generate(engine(model_dir), prompts([12], seed=4), params.model_copy(update={"seed": 8}))[0]
    assert [c.token_ids for c in other.outputs] != [c.token_ids for c in alone.outputs]


def test_stop_string_cuts_text(tiny):
    model_dir, _ = tiny
    prompt = prompts([10], seed=6)
    full = generate(engine(model_dir), prompt, SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    text = full.text
    assert len(text) > 12
    stop = text[6:9]
    cut = generate(engine(model_dir), prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY))[0].outputs[0]
    assert cut.text == text[:text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = generate(engine(model_dir), prompt, SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True,
                                                              **GREEDY))[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_stop_token_and_length(tiny):
    model_dir, _ = tiny
    prompt = prompts([10], seed=6)
    full = generate(engine(model_dir), prompt, SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    assert (full.finish_reason, len(full.token_ids)) == ("length", 24)
    stop_id = full.token_ids[5]
    cut = generate(engine(model_dir), prompt, SamplingParams(max_tokens=24, stop_token_ids=[stop_id], **GREEDY))[0].outputs[0]
    assert cut.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop_id)


def test_eos_stops_unless_ignored(tiny):
    model_dir, _ = tiny
    eng = engine(model_dir)
    prompt = prompts([10], seed=6)
    full = generate(eng, prompt, SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    eng.eos_token_ids = {full.token_ids[3]}  # pretend that token is EOS
    cut = generate(eng, prompt, SamplingParams(max_tokens=24, temperature=0.0))[0].outputs[0]
    assert cut.token_ids == full.token_ids[:full.token_ids.index(full.token_ids[3]) + 1]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", None)


def test_logprobs(tiny):
    model_dir, _ = tiny
    out = generate(engine(model_dir), prompts([10]), SamplingParams(max_tokens=6, logprobs=3, **GREEDY))[0].outputs[0]
    assert len(out.logprobs) == 6
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == token  # greedy: the sampled token is the most likely
        assert lp.top[0][1] == pytest.approx(lp.logprob)


def test_abort_frees_blocks(tiny):
    model_dir, _ = tiny
    eng = engine(model_dir)
    eng.add_request("gone", prompts([50])[0], SamplingParams(max_tokens=100, **GREEDY))
    eng.step()
    eng.step()
    assert eng.block_manager.num_free_blocks() < eng.num_blocks
    final = eng.abort_request("gone")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert eng.block_manager.num_free_blocks() == eng.num_blocks and not eng.has_unfinished()


def test_int8_weights_serve(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    model_dir, _ = tiny
    eng = engine(model_dir, quant="int8")
    info = eng.info()["quantization"]
    assert info["enabled"] and info["bits"] == 8
    assert info["weight_bytes"] < info["weight_bytes_loaded"]
    (tokens,), = run(eng, prompts([10]), max_tokens=8, **GREEDY)
    assert len(tokens) == 8


def test_fp8_weights_serve(tiny, tmp_path, monkeypatch):
    """`--quant fp8`: e4m3 weights with one scale per output channel (on a CPU the weight alone is
    fp8: dequantized, multiplied in the spec's compute dtype), reported as method fp8."""
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    model_dir, _ = tiny
    eng = engine(model_dir, quant="fp8")
    assert eng.applied_quantization()["method"] == "fp8" and eng.applied_quantization()["group_size"] == -1
    layers = [m for m in eng.model.modules() if type(m).__name__ == "QuantLinear"]
    assert layers and all(m.qweight.dtype == torch.float8_e4m3fn for m in layers)
    (tokens,), = run(eng, prompts([10]), max_tokens=8, **GREEDY)
    assert len(tokens) == 8
    with pytest.raises(ValueError, match="--quant fp8 has one format"):
        engine(model_dir, quant="fp8", group_size=64)


def test_fp8_kv_cache_serves_with_half_the_bytes_per_block(tiny, tmp_path, monkeypatch):
    """`--kv-cache-dtype fp8`: float8 pages, half a float16 cache's bytes per block (a float32
    model's would be a quarter), and decoding runs through them."""
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    model_dir, _ = tiny
    eng = engine(model_dir, kv_cache_dtype="fp8")
    assert eng.runner.kv_cache.k_pages[0].data.dtype == torch.float8_e4m3fn
    assert eng.runner.kv_cache.bytes_per_block() * 4 == engine(model_dir).runner.kv_cache.bytes_per_block()
    (tokens,), = run(eng, prompts([10]), max_tokens=8, **GREEDY)
    assert len(tokens) == 8


def test_bad_requests_are_refused(tiny):
    model_dir, _ = tiny
    eng = engine(model_dir, max_model_len=64)
    with pytest.raises(ValueError, match="maximum context length is 64"):
        eng.add_request("long", prompts([60])[0], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request("oov", [VOCAB_SIZE + 5], SamplingParams())
    assert not eng.has_unfinished()


def test_speculative_tokens_without_speculation_are_refused(tiny):
    model_dir, _ = tiny
    with pytest.raises(ValueError, match="needs --speculative"):
        engine(model_dir, num_speculative_tokens=3)


# --- speculative decoding ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A smaller random model with the same tokenizer and vocabulary."""
    path = tmp_path_factory.mktemp("draft")
    make_model(path, "llama", seed=5, hidden=32, heads=2, kv_heads=1, layers=1)
    return path


@pytest.mark.parametrize("how", ["ngram", "draft_model", "draft_is_target"])
def test_speculative_greedy_keeps_tokens(tiny, baseline, draft_dir, how, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBEE_CACHE_DIR", str(tmp_path))
    model_dir, _ = tiny
    batch, expected = baseline
    flags = {"ngram": dict(speculative=True),
             "draft_model": dict(draft_model=draft_dir),
             "draft_is_target": dict(draft_model=model_dir, num_speculative_tokens=3)}[how]
    eng = engine(model_dir, **flags)
    eng.speed_gate = SpeedGate.held()  # speculating throughout (the gate would measure plain decoding first)
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected
    spec = eng.stats()["speculative_decoding"]
    assert spec["enabled"] and spec["num_drafts"] > 0 and spec["num_draft_tokens"] > 0
    if how == "draft_is_target":
        # Greedy drafts from the target itself are always right: every draft token is kept, and
        # each verification emits k + 1 tokens (fewer only where max_tokens cut the draft).
        assert spec["acceptance_rate"] == 1.0
        assert eng.info()["speculative_decoding"]["num_speculative_tokens"] == 3
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_speculative_with_preemption_and_sampling(tiny, baseline, draft_dir):
    model_dir, _ = tiny
    batch, expected = baseline
    eng = engine(model_dir, draft_model=draft_dir, num_kv_blocks=7)
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected
    assert eng.stats()["batching"]["preemptions"] > 0
    # Sampled requests: exact lengths, stop tokens honoured, logprobs for every emitted token.
    outs = generate(eng, batch, SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True, logprobs=1, seed=3))
    for out in outs:
        c = out.outputs[0]
        assert len(c.token_ids) == 20 and c.finish_reason == "length"
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
    assert eng.stats()["speculative_decoding"]["num_drafts"] > 0
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_speculative_stop_string_inside_accepted_drafts(tiny, baseline, draft_dir):
    model_dir, _ = tiny
    batch, expected = baseline
    plain = generate(engine(model_dir), batch[:1], SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    stop = plain.text[9:12]
    eng = engine(model_dir, draft_model=model_dir)  # every draft accepted: stops land inside drafts
    cut = generate(eng, batch[:1], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))[0].outputs[0]
    assert cut.text == plain.text[:plain.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.token_ids == plain.token_ids[:len(cut.token_ids)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("flash_attn", [True, False])
def test_engine_on_gpu_keeps_cpu_tokens(tiny, baseline, flash_attn):
    """The same engine on CUDA in float32: the generated modules and the reference run there too."""
    model_dir, _ = tiny
    batch, expected = baseline
    eng = LLMEngine(EngineConfig(model=model_dir, device="cuda", dtype="float32", flash_attn=flash_attn), progress=False)
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_capture_decode_and_keep_tokens(tiny, baseline):
    """Decode steps replay captured CUDA graphs (padding rows included) and give the eager tokens."""
    model_dir, _ = tiny
    batch, expected = baseline
    eng = LLMEngine(EngineConfig(model=model_dir, device="cuda", dtype="float32",
                                 knobs={"continuous_batch": {"max_num_seqs": 8}}), progress=False)
    info = eng.info()["cuda_graphs"]
    assert info["enabled"], info
    assert info["batch_sizes"] == [1, 2, 4, 8]
    assert set(info["num_splits"]) == {1, 2, 4, 8}  # a split count per captured size
    assert run(eng, batch, max_tokens=24, **GREEDY) == expected  # 6 sequences: replayed at size 8
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_shape_runs_with_random_weights_and_no_files(monkeypatch):
    """--shape: a known model shape with random weights and a text-free tokenizer, for
    measurements (here a tiny stand-in shape, as the real ones are too big for a CPU test)."""
    from vibee.runtime import shapes

    monkeypatch.setitem(shapes.SHAPES, "test-tiny", dict(hidden_size=64, intermediate_size=128, num_layers=2,
                                                         num_heads=4, num_kv_heads=2, head_dim=16,
                                                         tie_word_embeddings=True, rope_scaling=None))
    eng = LLMEngine(EngineConfig(shape="test-tiny", device="cpu", max_model_len=128, num_kv_blocks=32), progress=False)
    assert eng.model_config.vocab_size == 128256 and eng.info()["model"]["name"] == "test-tiny"
    outs = generate(eng, prompts([5, 9]), SamplingParams(max_tokens=7, temperature=1.0))
    assert [len(o.outputs[0].token_ids) for o in outs] == [7, 7]  # no EOS: every request runs to max_tokens
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    # Every token has text (bench serve times the gaps between streamed tokens by it).
    first = outs[0].outputs[0]
    assert first.text == "".join(eng.tokenizer.decode([t]) for t in first.token_ids) and len(first.text) >= 7
    with pytest.raises(ValueError, match="--shape and --model"):
        LLMEngine(EngineConfig(shape="test-tiny", model=Path("."), device="cpu"), progress=False)


def test_logit_bias_steers_and_bans_tokens(tiny):
    model_dir, _ = tiny
    eng = engine(model_dir)
    (prompt,) = prompts([9], seed=7)
    (plain,) = run_tokens(eng, [prompt], max_tokens=6)
    (forced,) = run_tokens(eng, [prompt], max_tokens=6, logit_bias={"42": 100})  # as JSON spells the key
    assert forced[0] == [42] * 6
    (banned,) = run_tokens(eng, [prompt], max_tokens=6, logit_bias={plain[0][0]: -100})
    assert banned[0][0] != plain[0][0]
    with pytest.raises(ValueError, match=f"logit_bias names token id {VOCAB_SIZE}, outside the vocabulary"):
        eng.add_request("bad", prompt, SamplingParams(logit_bias={VOCAB_SIZE: 1.0}))


def test_min_tokens_holds_back_the_stop_tokens(tiny):
    """The greedy continuation's first token made a stop token: it ends the request at once, unless
    min_tokens keeps it from being sampled that early."""
    model_dir, _ = tiny
    eng = engine(model_dir)
    (prompt,) = prompts([9], seed=7)
    (plain,) = run_tokens(eng, [prompt], max_tokens=8)
    stop = plain[0][0]
    (stopped,) = run_tokens(eng, [prompt], max_tokens=8, stop_token_ids=[stop])
    assert stopped[0] == [stop]
    (held,) = run_tokens(eng, [prompt], max_tokens=8, stop_token_ids=[stop], min_tokens=4)
    assert len(held[0]) >= 4 and stop not in held[0][:4]
    assert held[0][-1] == stop or len(held[0]) == 8
    with pytest.raises(ValueError, match=r"min_tokens \(9\) must be at most max_tokens \(8\)"):
        SamplingParams(max_tokens=8, min_tokens=9)
