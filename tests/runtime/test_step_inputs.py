"""A step's inputs built on the host with numpy: make_attention_batch against a plain per-token
reference on ragged batches, the engine's block-table rows against the block manager's tables,
and DecodeGraphs.pack against what each decode row must hold."""

from __future__ import annotations

import dataclasses

import random

import numpy as np
import pytest
import torch

from vibee.runtime.attention import make_attention_batch
from vibee.runtime.cuda_graphs import HEAD_ROWS, DecodeGraphs
from vibee.runtime.block_table_rows import BlockTableRows


def reference_batch(query_lens, seq_lens, tables, block_size):
    """(cu_seqlens_q, block table rows padded with 0, positions, slots), token by token."""
    cu, positions, slots = [0], [], []
    for q, n, table in zip(query_lens, seq_lens, tables):
        cu.append(cu[-1] + q)
        for p in range(n - q, n):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
    width = max((len(t) for t in tables), default=0) or 1
    rows = [list(t) + [0] * (width - len(t)) for t in tables]
    return cu, rows, positions, slots


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("as_array", [False, True])
def test_attention_batch_matches_token_by_token(seed, as_array):
    rng = random.Random(seed)
    bs = 4
    seq_lens = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
    query_lens = [rng.choice([1, n, rng.randint(1, n)]) for n in seq_lens]
    tables = [rng.sample(range(100), -(-n // bs) + rng.randint(0, 2)) for n in seq_lens]  # lookahead blocks too
    cu, rows, positions, slots = reference_batch(query_lens, seq_lens, tables, bs)
    given = np.array(rows, dtype=np.int32) if as_array else tables
    batch = make_attention_batch(query_lens, seq_lens, given, bs)
    assert batch.cu_seqlens_q.dtype == batch.seq_lens.dtype == batch.block_tables.dtype == torch.int32
    assert batch.slot_mapping.dtype == torch.long
    assert batch.cu_seqlens_q.tolist() == cu
    assert batch.seq_lens.tolist() == seq_lens
    assert batch.block_tables.tolist() == rows
    assert batch.slot_mapping.tolist() == slots
    assert batch.positions().tolist() == positions
    assert batch.is_decode == all(q == 1 for q in query_lens)
    # The same lengths on the host (attention then reads nothing back), and the positions sent
    # with the rest rather than derived on the device.
    assert batch.cu_seqlens_q_host == cu and batch.seq_lens_host == seq_lens
    assert batch.positions_tensor is not None
    derived = dataclasses.replace(batch, positions_tensor=None)
    assert derived.positions().tolist() == positions


@pytest.mark.parametrize("query_lens", [[1], [2], [3, 1], [1, 1, 1], [5, 2, 7]])
def test_slots_and_positions_start_16_bytes_in_whatever_the_batch(query_lens):
    # Triton specializes pointers on 16-byte alignment: RoPE's kernel compiled anew mid-serving
    # for batches whose token count had the other parity than every warm-up batch's.
    seq_lens = [q + 3 for q in query_lens]
    batch = make_attention_batch(query_lens, seq_lens, [[0, 1, 2]] * len(query_lens), 4)
    base = batch.positions_tensor.untyped_storage().data_ptr()
    for view in (batch.slot_mapping, batch.positions()):
        assert (view.data_ptr() - base) % 16 == 0


def test_attention_batch_without_kv_cache_and_empty():
    batch = make_attention_batch([3, 5], [3, 5], None, 16)
    assert batch.cu_seqlens_q.tolist() == [0, 3, 8] and batch.seq_lens.tolist() == [3, 5]
    assert batch.cu_seqlens_q_host == [0, 3, 8] and batch.seq_lens_host == [3, 5]
    assert batch.block_tables is None and batch.slot_mapping is None and not batch.is_decode
    with pytest.raises(ValueError, match="whole sequences"):
        make_attention_batch([1, 5], [3, 5], None, 16)
    with pytest.raises(ValueError, match="entries"):
        make_attention_batch([1], [3, 5], [[0], [1]], 16)
    empty = make_attention_batch([], [], [], 16)
    assert empty.block_tables.shape == (0, 1) and empty.slot_mapping.numel() == 0


def test_block_table_rows_follow_growth_release_and_retaking():
    tables: dict[int, list[int]] = {}
    rows = BlockTableRows(tables)
    rng = random.Random(0)
    for _ in range(400):
        seq_id = rng.randrange(40)
        action = rng.random()
        if seq_id in tables and action < 0.1:
            del tables[seq_id]
            rows.release(seq_id)
        elif seq_id in tables and action < 0.2:
            tables[seq_id] = [rng.randrange(1000) for _ in range(rng.randint(1, 5))]  # freed and taken afresh
        elif seq_id in tables:
            tables[seq_id].extend(rng.randrange(1000) for _ in range(rng.choice([0, 0, 1, 3, 40])))
        else:
            tables[seq_id] = [rng.randrange(1000) for _ in range(rng.randint(1, 5))]
        ids = rng.sample(sorted(tables), min(len(tables), 8))
        got = rows.gather([rows.row(s) for s in ids])
        width = max(len(tables[s]) for s in ids)
        assert got.dtype == np.int32 and got.shape == (len(ids), width)
        assert got.tolist() == [tables[s] + [0] * (width - len(tables[s])) for s in ids]


def test_decode_graph_inputs_are_packed_as_the_graphs_read_them():
    class Model(torch.nn.Module):
        device = torch.device("cpu")
        config = type("Config", (), {"num_kv_heads": 2})

    bs, padding_slot = 4, 999
    graphs = DecodeGraphs(Model(), None, max_batch=16, max_model_len=64, block_size=bs, padding_slot=padding_slot,
                          num_splits=2, sampled=torch.zeros(16, dtype=torch.long))
    n_max, rows = graphs.sizes[-1], HEAD_ROWS
    rng = random.Random(1)
    for n in (1, 3, 5, 16, 9):
        seq_lens = [rng.randint(1, 64) for _ in range(n)]
        tables = [rng.sample(range(200), -(-length // bs)) for length in seq_lens]
        width = max(len(t) for t in tables)
        padded = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int32)
        ids = [rng.randrange(1000) for _ in range(n)]
        sources = [rng.choice([-1, rng.randrange(16)]) for _ in range(n)]
        b, w = graphs.pack(ids, seq_lens, padded, sources)
        assert b == min(s for s in graphs.sizes if s >= n) and w == width
        used = rows * n_max + b * width
        head = graphs.host[: rows * n_max].view(rows, n_max)[:, :b].tolist()
        pad = b - n
        assert head[0] == ids + [0] * pad
        assert head[1] == [length - 1 for length in seq_lens] + [0] * pad
        assert head[2] == [t[(length - 1) // bs] * bs + (length - 1) % bs for t, length in zip(tables, seq_lens)] + \
            [padding_slot] * pad
        assert head[3] == seq_lens + [1] * pad
        assert head[4] == sources + [-1] * pad  # padding rows take their staged token
        assert graphs.host[rows * n_max: used].view(b, width).tolist() == padded.tolist() + [[0] * width] * pad


class _Spy:
    """The generated attention module, recording which entry point each call takes."""

    def __init__(self, fa):
        self.fa, self.calls = fa, []

    def __getattr__(self, name):
        fn = getattr(self.fa, name)
        if name in ("varlen_attention", "paged_prefill", "paged_decode"):
            def record(*args, **kwargs):
                self.calls.append(name)
                return fn(*args, **kwargs)
            return record
        return fn


def test_fresh_prompts_attend_over_their_own_kv_and_match_the_paged_path():
    """A step of whole prompts runs varlen_attention on the step's K/V (no read-back of pages);
    its output equals paged_prefill's over the pages just written. A step after a cached prefix
    is not fresh and reads the pages."""
    from dataclasses import replace

    from tests.runtime.hf_models import generated
    from vibee.runtime.attention import AttentionBackend

    gen = generated()
    bs, heads, kv_heads, dim = gen.config("kv_cache").block_size, 4, 2, 64
    spy = _Spy(gen.flash_attention)
    backend = AttentionBackend(spy, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim)
    cache = gen.kv_cache.PagedKVCache(1, 16, kv_heads, dim, dtype=torch.float32, device="cpu", block_size=bs)
    g = torch.Generator().manual_seed(0)
    lens = [5, bs + 3]
    tables = [[0], [1, 2]]
    q = torch.randn(sum(lens), heads, dim, generator=g)
    k, v = torch.randn(2, sum(lens), kv_heads, dim, generator=g)
    batch = make_attention_batch(lens, lens, tables, bs)
    assert batch.fresh and not batch.is_decode
    fresh = backend(0, q, k, v, batch, cache)
    assert spy.calls == ["varlen_attention"]
    paged = backend(0, q, k, v, replace(batch, fresh=False), cache)
    assert spy.calls[-1] == "paged_prefill"
    torch.testing.assert_close(fresh, paged, rtol=1e-5, atol=1e-5)
    # The last 2 tokens of each sequence again, after their cached prefix: the pages are read.
    later = make_attention_batch([2, 2], lens, tables, bs)
    assert not later.fresh
    backend(0, q[:4], k[:4], v[:4], later, cache)
    assert spy.calls[-1] == "paged_prefill"
