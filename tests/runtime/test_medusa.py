"""Medusa drafting through the real engine: heads on the target's last hidden state propose, the
target verifies, and greedy text never changes. On a tiny random model with random heads (the
bookkeeping: which hidden row each sequence drafts from) and on the built-in model with its
trained heads (they are accepted, and beat a unigram guess on held-out text)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.runtime.eager_graphs import use_eager_graphs
from tests.runtime.hf_models import make_model
from tests.runtime.test_engine import GREEDY, engine, prompts, run_tokens
from vibee.runtime.config import DEFAULT_MODEL_DIR
from vibee.runtime.generated import load_generated
from vibee.runtime.medusa_drafter import HEADS_FILE, MedusaDrafter
from vibee.runtime.speed_gate import SpeedGate

K = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama, transformers' copy of it, and random Medusa heads for it in a file."""
    from safetensors.torch import save_file

    model_dir = tmp_path_factory.mktemp("tiny-medusa")
    hf = make_model(model_dir, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    generator = torch.Generator().manual_seed(4)
    heads = {"weight": torch.randn(K + 1, 64, 64, generator=generator) / 8, "bias": torch.randn(K + 1, 64, generator=generator)}
    save_file(heads, str(model_dir / HEADS_FILE))
    return model_dir, hf


@pytest.fixture(scope="module")
def expected(tiny):
    model_dir, _ = tiny
    batch = prompts([20, 33, 7, 26, 15, 40], seed=1)
    return batch, run_tokens(engine(model_dir), batch, max_tokens=24)


def medusa_engine(model_dir, **flags):
    eng = engine(model_dir, speculative_method="medusa", num_speculative_tokens=K, **flags)
    eng.speed_gate = SpeedGate.held()  # speculating throughout
    return eng


def test_medusa_greedy_equals_plain_decoding_for_a_concurrent_batch(tiny, expected):
    model_dir, _ = tiny
    batch, tokens = expected
    eng = medusa_engine(model_dir, speculative_acceptance_threshold=0)
    assert run_tokens(eng, batch, max_tokens=24) == tokens
    figures = eng.stats()["speculative_decoding"]
    assert figures["num_drafts"] > 0 and 0 < figures["num_draft_tokens"] <= K * figures["num_drafts"]  # fewer near max_tokens
    assert eng.block_manager.num_free_blocks() == eng.num_blocks


def test_medusa_drafts_from_the_hidden_state_of_the_last_verified_token(tiny, expected, monkeypatch):
    """Every draft comes from the target's final hidden state at the position whose logits gave
    the sequence's last token (a full forward of transformers' copy over its tokens but the last),
    whatever the previous step accepted."""
    model_dir, hf = tiny
    batch, tokens = expected
    eng = medusa_engine(model_dir, speculative_acceptance_threshold=0)
    drafter = eng.speculator.medusa
    seen = []

    def propose(hidden, lm_head, k):
        seen.append(hidden.clone())
        return real_propose(hidden, lm_head, k)

    def drafter_propose(runner, candidates):
        contexts.append([list(seq.token_prefix(seq.num_tokens)) for seq, _ in candidates])
        return real_drafter_propose(runner, candidates)

    contexts = []
    real_propose, real_drafter_propose = drafter.heads.propose, drafter.propose
    monkeypatch.setattr(drafter.heads, "propose", propose)
    monkeypatch.setattr(drafter, "propose", drafter_propose)
    assert run_tokens(eng, batch[:3], max_tokens=24) == tokens[:3]
    assert eng.stats()["speculative_decoding"]["num_drafts"] > 0
    assert len(seen) == len(contexts)
    with torch.no_grad():
        for hidden, step_contexts in zip(seen, contexts):
            assert len(hidden) == len(step_contexts)  # every candidate had its state from the last step
            for row, context in zip(hidden, step_contexts):
                ids = torch.tensor([context[:-1]])
                reference = hf.model(input_ids=ids).last_hidden_state[0, -1]
                torch.testing.assert_close(row, reference, rtol=1e-4, atol=1e-4)


def test_medusa_verification_as_graph_rows(tiny, expected, monkeypatch):
    """The decode-graph path (on the CPU: eager replays of DecodeGraphs' buffers) keeps the graph's
    hidden states for the heads: same tokens, drafts verified as k + 1 rows."""
    use_eager_graphs(monkeypatch)
    model_dir, _ = tiny
    batch, tokens = expected
    eng = medusa_engine(model_dir, max_num_seqs=8, speculative_acceptance_threshold=0)
    assert eng.graphs is not None
    assert run_tokens(eng, batch[:4], max_tokens=24) == tokens[:4]
    assert eng.stats()["speculative_decoding"]["num_drafts"] > 0


def test_medusa_keeps_the_batch_size_limit_and_the_acceptance_gate(tiny, expected):
    model_dir, _ = tiny
    batch, tokens = expected
    # Four sequences of equal length run together to the end: above a limit of 2 nothing drafts.
    same = prompts([12, 12, 12, 12], seed=3)
    limited = medusa_engine(model_dir, speculative_disable_by_batch_size=2)
    assert run_tokens(limited, same, max_tokens=16) == run_tokens(engine(model_dir), same, max_tokens=16)
    assert limited.stats()["speculative_decoding"]["num_drafts"] == 0
    # Random heads miss: a strict threshold pauses drafting, so fewer drafts than with none.
    drafts = {}
    for threshold in (0.0, 0.9):
        eng = medusa_engine(model_dir, speculative_acceptance_threshold=threshold)
        assert run_tokens(eng, batch, max_tokens=24) == tokens
        drafts[threshold] = eng.stats()["speculative_decoding"]["num_drafts"]
    assert 0 < drafts[0.9] < drafts[0.0]


def test_medusa_heads_file_problems_are_reported(tiny, tmp_path):
    model_dir, _ = tiny
    with pytest.raises(ValueError, match="no heads file"):
        engine(model_dir, speculative_method="medusa", medusa_heads=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="needs as many heads"):
        engine(model_dir, speculative_method="medusa", num_speculative_tokens=K + 2)
    with pytest.raises(ValueError, match="can't go with --speculative-method medusa"):
        engine(model_dir, draft_model=model_dir, speculative_method="medusa")


def test_medusa_heads_flag_implies_medusa(tiny):
    model_dir, _ = tiny
    eng = engine(model_dir, medusa_heads=str(model_dir / HEADS_FILE), num_speculative_tokens=K)
    assert eng.speculative and eng.gen.configs.speculative_decode.method == "medusa"
    assert isinstance(eng.speculator.medusa, MedusaDrafter)


# --- the built-in model's trained heads ------------------------------------------------------------


def stdlib_text(rel: str) -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / rel
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def held_out_texts() -> list[str]:
    stats = json.loads((DEFAULT_MODEL_DIR / "training_stats.json").read_text())
    return [text for text in map(stdlib_text, stats["data"]["held_out_files"]) if len(text) > 2000]


def test_trained_heads_beat_chance_on_held_out_text():
    """Each head's top-1 guess of the token 1 + i after the target's next one, over held-out stdlib
    text (the target's hidden states from transformers): better than a uniform guess, and the
    first head better than always guessing the text's most frequent token (the later heads
    guess further ahead, where the card's figures come close to that)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    texts = held_out_texts()
    assert texts, "none of the card's held-out files is in this machine's stdlib"
    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    ids = torch.tensor([[0] + tokenizer.encode("".join(texts[:3])).ids[:1023]])
    target = LlamaForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR)).float().eval()
    gen = load_generated(None, {})
    heads = gen.speculative_decode.MedusaHeads.from_state_dict(
        load_file(str(DEFAULT_MODEL_DIR / HEADS_FILE)), hidden_size=target.config.hidden_size)
    with torch.no_grad():
        hidden = target.model(input_ids=ids).last_hidden_state[0]
        guesses = heads.propose(hidden, target.lm_head, heads.num_heads)
    tokens = ids[0]
    unigram = torch.bincount(tokens).max().item() / len(tokens)
    accuracy = []
    for i in range(heads.num_heads):
        later = tokens[2 + i:]  # head i + 1 at position t guesses token t + 2 + i
        accuracy.append((guesses[: len(later), i] == later).float().mean().item())
    assert min(accuracy) > 1 / target.config.vocab_size, accuracy
    assert accuracy[0] > unigram, (accuracy, unigram)


@pytest.fixture(scope="module")
def builtin_prompts():
    texts = held_out_texts()
    return [text[start: start + 300] for text in texts[:2] for start in (0, 1500)]


def test_trained_heads_are_accepted_and_keep_the_built_in_models_greedy_text(builtin_prompts):
    plain = engine(None)
    batch = [plain.tokenizer.encode(text) for text in builtin_prompts]
    tokens = run_tokens(plain, batch, max_tokens=40)
    eng = medusa_engine(None)
    for prompt, expected_tokens in zip(batch, tokens):  # one at a time, then all at once
        assert run_tokens(eng, [prompt], max_tokens=40) == [expected_tokens]
    assert run_tokens(eng, batch, max_tokens=40) == tokens
    figures = eng.stats()["speculative_decoding"]
    assert figures["num_accepted_tokens"] > 0 and figures["accepted_at_position"][0] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_medusa_on_the_gpu_keeps_greedy_text_in_cuda_graphs(builtin_prompts):
    from vibee.runtime.config import EngineConfig
    from vibee.runtime.engine import LLMEngine

    def gpu_engine(**flags):
        # float32: in bf16 a step of k + 1 rows per sequence may round differently from a step of
        # one row, which could flip a near tie; the equality checked here is the bookkeeping's.
        return LLMEngine(EngineConfig(device="cuda", dtype="float32", **flags), progress=False)

    plain = gpu_engine()
    batch = [plain.tokenizer.encode(text) for text in builtin_prompts]
    tokens = run_tokens(plain, batch, max_tokens=64)
    eng = gpu_engine(speculative=True, knobs={"speculative_decode": {"method": "medusa"}})
    eng.speed_gate = SpeedGate.held()
    assert eng.graphs is not None
    assert run_tokens(eng, batch, max_tokens=64) == tokens
    assert eng.stats()["speculative_decoding"]["num_accepted_tokens"] > 0
