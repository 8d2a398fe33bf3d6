"""The draft model's own paged KV cache: its proposals equal the generated DraftModelDrafter's over
the whole context recomputed, while it feeds only the tokens it has not seen."""

from __future__ import annotations

import random

import pytest
import torch

from tests.runtime.hf_models import VOCAB_SIZE, generated, make_model
from vibee.runtime.attention import make_attention_batch
from vibee.runtime.draft_runner import DraftRunner
from vibee.runtime.loader import load_model_dir
from vibee.runtime.model import build_model

K = 4


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    directory = tmp_path_factory.mktemp("draft-llama")
    make_model(directory, "llama", hidden=64, heads=4, kv_heads=2, layers=2)
    return build_model(load_model_dir(directory, dtype=torch.float32), generated()).eval()


def full_context_logits(model):
    """The drafter's model_fn with no cache: every context recomputed from its first token."""
    def logits(contexts):
        lens = [len(c) for c in contexts]
        batch = make_attention_batch(lens, lens, None, 16, "cpu")
        ids = torch.tensor([t for c in contexts for t in c])
        with torch.inference_mode():
            hidden = model(ids, batch.positions(), batch, None)
            return model.compute_logits(hidden[torch.tensor(lens).cumsum(0) - 1])
    return logits


def test_cached_drafts_equal_recomputed_drafts_as_sequences_grow(draft, monkeypatch):
    gen = generated()
    reference = gen.speculative_decode.DraftModelDrafter(full_context_logits(draft), K)
    runner = DraftRunner(draft, gen.kv_cache, num_blocks=64, block_size=16, k=K, max_batched_tokens=60)
    fed_tokens = []
    real = runner.model.forward
    monkeypatch.setattr(runner.model, "forward", lambda ids, *a, **kw: fed_tokens.append(len(ids)) or real(ids, *a, **kw))
    rng = random.Random(0)
    seqs = {0: [rng.randrange(5, VOCAB_SIZE) for _ in range(23)], 1: [rng.randrange(5, VOCAB_SIZE) for _ in range(30)]}
    for step in range(6):
        ids = list(seqs)
        fed_tokens.clear()
        drafts = runner.propose([seqs[i] for i in ids], ids)
        mine = list(fed_tokens)  # the reference below runs the same model
        expected, _ = reference.propose([seqs[i] for i in ids], temperature=0.0)
        assert drafts == expected.tolist()
        # The catch-up feeds the tokens after the kept drafts only (everything, the first time).
        assert mine[0] == (53 if step == 0 else sum(unseen.values()))
        assert mine[1:] == [2] * (K - 1)  # then one token per sequence per draft
        unseen = {}
        for i, row in zip(ids, drafts):  # the target keeps some drafts, then says its own token
            kept = rng.randrange(K + 1)
            seqs[i] = seqs[i] + row[:kept] + [rng.randrange(5, VOCAB_SIZE)]
            # The draft fed itself row[:K - 1]: those it kept are seen, the rest and the new token are not.
            unseen[i] = 1 + kept - min(kept, K - 1)
    runner.forget(0)
    assert 0 not in runner.fed and 0 not in runner.blocks.block_tables


def test_catch_up_holds_at_most_max_batched_tokens_per_forward(draft, monkeypatch):
    """A sequence's first proposal feeds its whole prompt: sequences go in groups under the budget."""
    gen = generated()
    runner = DraftRunner(draft, gen.kv_cache, num_blocks=64, block_size=16, k=2, max_batched_tokens=50)
    forwards = []
    real = runner.model.forward

    def counting(ids, *args, **kwargs):
        forwards.append(len(ids))
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", counting)
    prompts = [[7] * 30, [8] * 30, [9] * 10]
    runner.propose(prompts, [0, 1, 2])
    catch_ups = [n for n in forwards if n > 3]
    assert catch_ups == [30, 40] and max(forwards) <= 50  # 30 | 30 + 10, then one-token steps


def test_a_sequence_without_draft_blocks_gets_no_drafts(draft):
    gen = generated()
    runner = DraftRunner(draft, gen.kv_cache, num_blocks=2, block_size=16, k=K, max_batched_tokens=100)
    drafts = runner.propose([[5] * 20, [6] * 20], [0, 1])
    assert len(drafts[0]) == K and drafts[1] == []  # the second does not fit in the blocks left
