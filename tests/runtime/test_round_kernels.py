"""The n-gram round's two Triton kernels (vibee/runtime/round_kernels.py) against its torch ops, on
random rounds: padding sequences, sequences the gate paused, sequences at their limit, drafts of
every length, matches and mismatches, rows holding whole sequences and rows as rings. On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from vibee.runtime.round_kernels import finish_round, prepare_round

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels on the CPU")


def random_round(seed: int, batch: int = 6, k: int = 4, width: int = 80, block_size: int = 4, ring: int | None = None):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, width - k - 2, (batch,), generator=g)
    lens[1] = 0  # a padding sequence
    limits = lens + torch.randint(1, 2 * k + 2, (batch,), generator=g)
    limits[4] = lens[4]  # done: at its limit
    state = {
        "work": torch.randint(0, 9, (batch, ring or width), generator=g, dtype=torch.int32),
        "lens": lens,
        "limits": limits,
        "allow": torch.tensor([1, 1, 0] + [1] * (batch - 3)),  # the third is paused by the gate
        "drafts": torch.randint(0, 3, (batch, k), generator=g),
        "num_drafts": torch.randint(0, k + 1, (batch,), generator=g),
        "tables": torch.randint(0, 50, (batch * (k + 1) + 3, width // block_size + 1), generator=g, dtype=torch.int32),
        "input_ids": torch.full((batch * (k + 1) + 3,), -7),
        "positions": torch.full((batch * (k + 1) + 3,), -7),
        "slot_mapping": torch.full((batch * (k + 1) + 3,), -7),
        "seq_lens": torch.full((batch * (k + 1) + 3,), -7, dtype=torch.int32),
        "sampled": torch.randint(0, 3, (batch * (k + 1) + 3,), generator=g),
        "last": torch.zeros(batch, k + 3, dtype=torch.long),
    }
    return {name: t.to(DEVICE) for name, t in state.items()}


def run_round(state, kernels: bool, block_size: int = 4, padding_slot: int = 999) -> dict:
    s = {name: t.clone() for name, t in state.items()}
    prepare_round(s["work"], s["lens"], s["limits"], s["allow"], s["drafts"], s["num_drafts"], s["tables"],
                  block_size=block_size, padding_slot=padding_slot, input_ids=s["input_ids"],
                  positions=s["positions"], slot_mapping=s["slot_mapping"], seq_lens=s["seq_lens"], kernels=kernels)
    finish_round(s["drafts"], s["num_drafts"], s["sampled"], s["work"], s["lens"], s["limits"], s["last"],
                 kernels=kernels)
    return s


@pytest.mark.parametrize("seed", range(8))
def test_the_kernels_do_what_the_torch_ops_do(seed):
    state = random_round(seed, k=4 if seed < 6 else 0, ring=None if seed % 3 else 7)
    if seed % 2:  # drafts the target agrees with, so whole drafts are accepted too
        k = state["drafts"].shape[1]
        if k:
            state["sampled"][: state["drafts"].numel() + len(state["drafts"])].view(-1, k + 1)[:, :k] = state["drafts"]
    expected, got = run_round(state, kernels=False), run_round(state, kernels=True)
    for name in expected:
        assert torch.equal(got[name].cpu(), expected[name].cpu()), name


def test_a_round_accepts_the_leading_agreement_and_grows_the_sequence():
    """The torch ops themselves, by hand: one sequence of 5 tokens drafting [3, 4, 5] (k = 3)."""
    k, bs = 3, 4
    work = torch.zeros(1, 16, dtype=torch.int32)
    work[0, :5] = torch.tensor([1, 2, 3, 4, 9])
    lens, allow = torch.tensor([5]), torch.tensor([1])
    drafts, num_drafts = torch.tensor([[3, 4, 5]]), torch.tensor([3])
    tables = torch.tensor([[7, 8, 0, 0]] * 4, dtype=torch.int32)
    ids, pos, slots, seq_lens = (torch.zeros(4, dtype=torch.long) for _ in range(4))
    limits = torch.tensor([9])
    prepare_round(work, lens, limits, allow, drafts, num_drafts, tables, block_size=bs, padding_slot=99, input_ids=ids,
                  positions=pos, slot_mapping=slots, seq_lens=seq_lens, kernels=False)
    assert ids.tolist() == [9, 3, 4, 5] and pos.tolist() == [4, 5, 6, 7]
    assert slots.tolist() == [8 * 4 + 0, 8 * 4 + 1, 8 * 4 + 2, 8 * 4 + 3] and seq_lens.tolist() == [5, 6, 7, 8]
    last = torch.zeros(1, k + 3, dtype=torch.long)
    finish_round(drafts, num_drafts, torch.tensor([3, 4, 6, 1]), work, lens, limits, last, kernels=False)
    assert last.tolist() == [[3, 4, 6, 1, 3, 2]]  # targets, drafted 3, accepted 2
    assert lens.tolist() == [8] and work[0, :8].tolist() == [1, 2, 3, 4, 9, 3, 4, 6]


def test_plain_rounds_on_a_ring_stop_at_the_limit():
    """k = 0 (plain decoding) on rows of 2 tokens: each round appends the sampled token until the
    sequence reaches its limit; from then on its rounds record accepted -1 and change nothing."""
    work = torch.tensor([[5, 6]], dtype=torch.int32)  # tokens 0..3 were [.., .., 5, 6]: length 4
    lens, limits, allow = torch.tensor([4]), torch.tensor([6]), torch.tensor([1])
    drafts, num_drafts = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    tables = torch.tensor([[3, 4]], dtype=torch.int32)
    ids, pos, slots, seq_lens = (torch.zeros(1, dtype=torch.long) for _ in range(4))
    emitted = []
    for token in (11, 12, 13):
        prepare_round(work, lens, limits, allow, drafts, num_drafts, tables, block_size=4, padding_slot=99,
                      input_ids=ids, positions=pos, slot_mapping=slots, seq_lens=seq_lens, kernels=False)
        last = torch.zeros(1, 3, dtype=torch.long)
        finish_round(drafts, num_drafts, torch.tensor([token]), work, lens, limits, last, kernels=False)
        emitted.append((ids.item(), slots.item(), int(last[0, 2])))
    assert emitted == [(6, 3 * 4 + 3, 0), (11, 4 * 4 + 0, 0), (12, 99, -1)]
    assert lens.tolist() == [6] and work.tolist() == [[11, 12]]


@pytest.mark.parametrize("kernels", [False, True])
def test_drafts_are_cut_to_what_the_limit_leaves(kernels):
    """A sequence of 5 tokens with limit 7 drafting [3, 4, 5] (k = 3): one draft is kept (its
    decode token and one draft fill the slots up to position 5 = limit - 2); the other rows write
    K/V to the padding slot, and agreeing with all three drafts grows it to exactly its limit."""
    k, bs = 3, 4
    work = torch.zeros(1, 16, dtype=torch.int32, device=DEVICE)
    work[0, :5] = torch.tensor([1, 2, 3, 4, 9])
    lens, limits, allow = (torch.tensor([v], device=DEVICE) for v in (5, 7, 1))
    drafts, num_drafts = torch.tensor([[3, 4, 5]], device=DEVICE), torch.tensor([3], device=DEVICE)
    tables = torch.tensor([[7, 8, 0, 0]] * 4, dtype=torch.int32, device=DEVICE)
    ids, pos, slots = (torch.zeros(4, dtype=torch.long, device=DEVICE) for _ in range(3))
    seq_lens = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    prepare_round(work, lens, limits, allow, drafts, num_drafts, tables, block_size=bs, padding_slot=99, input_ids=ids,
                  positions=pos, slot_mapping=slots, seq_lens=seq_lens, kernels=kernels)
    assert num_drafts.tolist() == [1]
    assert pos.tolist() == [4, 5, 0, 0] and slots.tolist() == [8 * 4 + 0, 8 * 4 + 1, 99, 99]
    last = torch.zeros(1, k + 3, dtype=torch.long, device=DEVICE)
    finish_round(drafts, num_drafts, torch.tensor([3, 4, 5, 6], device=DEVICE), work, lens, limits, last,
                 kernels=kernels)
    assert last[0, k + 1:].tolist() == [1, 1]  # drafted 1 (after the cut), accepted 1
    assert lens.tolist() == [7] and work[0, :7].tolist() == [1, 2, 3, 4, 9, 3, 4]
