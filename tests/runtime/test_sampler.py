from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from vibee.runtime.sampler import SampleResult, Sampler, SamplingRow
from vibee.runtime.sampling_params import SamplingParams


def row(prompt=(), output=(), generator=None, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), generator)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------- references (plain python)


def ref_penalised(logits: list[float], prompt, output, rep=1.0, freq=0.0, pres=0.0) -> list[float]:
    x = list(logits)
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t, c in Counter(output).items():
        x[t] -= freq * c + pres
    return x


def ref_log_softmax(x: list[float]) -> list[float]:
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def ref_probs(logits: list[float], temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> list[float]:
    """The distribution a random row must sample from (temperature, top-k, top-p, min-p)."""
    z = [v / temperature for v in logits]
    keep = set(range(len(z)))
    if top_k >= 1:
        kth = sorted(z, reverse=True)[min(top_k, len(z)) - 1]
        keep = {i for i in keep if z[i] >= kth}

    def normalised(ids):
        m = max(z[i] for i in ids)
        w = {i: math.exp(z[i] - m) for i in ids}
        s = sum(w.values())
        return {i: w[i] / s for i in ids}

    p = normalised(keep)
    if top_p < 1.0:
        kept, mass = set(), 0.0
        for i in sorted(p, key=lambda i: -p[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += p[i]
        p = normalised(kept)
    if min_p > 0.0:
        top = max(p.values())
        p = normalised({i for i in p if p[i] >= min_p * top})
    return [p.get(i, 0.0) for i in range(len(logits))]


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * q) ** 2 / (total * q) for c, q in zip(counts, probs) if q > 0)


def draw_counts(sampler: Sampler, logits: list[float], draws: int, seeded: bool = False, **params) -> list[int]:
    sp = SamplingParams(**params)
    rows = [SamplingRow(sp, [], [], gen(1000 + i) if seeded else None) for i in range(draws)]
    x = torch.tensor([logits] * draws, dtype=torch.float32)
    tokens = [r.token_id for r in sampler.sample(x, rows)]
    c = Counter(tokens)
    return [c.get(i, 0) for i in range(len(logits))]


# ---------------------------------------------------------------- greedy and logprobs


def test_greedy_is_argmax_and_leaves_generator_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    g = gen(5)
    state = g.get_state().clone()
    rows = [row(temperature=0.0, generator=g), row(temperature=0.0), row(temperature=1e-7), row(temperature=0.0, top_k=3, top_p=0.1)]
    out = Sampler(seed=0).sample(logits, rows)
    assert [r.token_id for r in out] == logits.argmax(-1).tolist()
    assert torch.equal(g.get_state(), state)
    assert all(r.logprob is None and r.top_logprobs is None for r in out)


def test_logprobs_are_log_softmax_of_penalised_logits_before_temperature():
    torch.manual_seed(1)
    vocab = 20
    logits = torch.randn(3, vocab) * 3
    rows = [
        row(prompt=[1, 2, 3], output=[3, 4, 4, 5], temperature=0.0, logprobs=20, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25),
        row(prompt=[7], output=[7, 8], temperature=0.6, top_k=4, top_p=0.8, min_p=0.05, logprobs=20, repetition_penalty=0.8, presence_penalty=-1.0),
        row(prompt=[0], output=[], temperature=1.7, logprobs=20),
    ]
    out = Sampler(seed=0).sample(logits, rows)
    for r, res, lg in zip(rows, out, logits.tolist()):
        p = r.params
        want = ref_log_softmax(ref_penalised(lg, r.prompt_token_ids, r.output_token_ids, p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
        assert res.logprob == pytest.approx(want[res.token_id], abs=1e-5)
        assert len(res.top_logprobs) == vocab
        assert [t for t, _ in res.top_logprobs] == sorted(range(vocab), key=lambda i: -want[i])
        for t, v in res.top_logprobs:
            assert v == pytest.approx(want[t], abs=1e-5)
    # Greedy picks the best penalised token, so its logprob is the top one.
    assert out[0].token_id == out[0].top_logprobs[0][0]


def test_logprobs_counts():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]] * 3)
    out = Sampler(seed=0).sample(logits, [row(temperature=0, logprobs=0), row(temperature=0, logprobs=2), row(temperature=0)])
    assert out[0].top_logprobs == [] and out[0].logprob == pytest.approx(ref_log_softmax(logits[0].tolist())[1])
    assert [t for t, _ in out[1].top_logprobs] == [1, 3]
    assert out[2] == SampleResult(1, None, None)


# ---------------------------------------------------------------- penalties


def test_repetition_penalty_flips_argmax_both_signs():
    # Token 0 (positive logit) is seen in the prompt: 2.0 / 2 = 1.0 < 1.5.
    logits = torch.tensor([[2.0, 1.5, -5.0]])
    assert Sampler().sample(logits, [row(prompt=[0], temperature=0)])[0].token_id == 0
    assert Sampler().sample(logits, [row(prompt=[0], temperature=0, repetition_penalty=2.0)])[0].token_id == 1
    # Negative logits are multiplied: a seen -1.0 falls below an unseen -1.5 with penalty 2.
    logits = torch.tensor([[-1.0, -1.5]])
    assert Sampler().sample(logits, [row(output=[0], temperature=0, repetition_penalty=2.0)])[0].token_id == 1
    # A penalty below 1 rewards repetition.
    logits = torch.tensor([[1.0, 1.5]])
    assert Sampler().sample(logits, [row(output=[0], temperature=0, repetition_penalty=0.5)])[0].token_id == 0


def test_frequency_and_presence_penalties_use_output_counts_only():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    # Token 0 appears in the prompt only: no frequency/presence penalty.
    assert Sampler().sample(logits, [row(prompt=[0, 0, 0], temperature=0, frequency_penalty=2.0, presence_penalty=2.0)])[0].token_id == 0
    # Once in the output: 3.0 - 0.3 = 2.7 still wins; three times: 3.0 - 0.9 = 2.1 loses to 2.5.
    assert Sampler().sample(logits, [row(output=[0], temperature=0, frequency_penalty=0.3)])[0].token_id == 0
    assert Sampler().sample(logits, [row(output=[0, 0, 0], temperature=0, frequency_penalty=0.3)])[0].token_id == 1
    # Presence is once, however often: 3.0 - 0.4 = 2.6 wins even after three repeats.
    assert Sampler().sample(logits, [row(output=[0, 0, 0], temperature=0, presence_penalty=0.4)])[0].token_id == 0
    assert Sampler().sample(logits, [row(output=[0], temperature=0, presence_penalty=0.6)])[0].token_id == 1
    # Negative penalties encourage repeats.
    assert Sampler().sample(logits, [row(output=[2], temperature=0, presence_penalty=-2.0, frequency_penalty=-1.5)])[0].token_id == 2


def test_penalties_in_a_mixed_batch_match_the_reference():
    torch.manual_seed(2)
    vocab = 20
    logits = torch.randn(5, vocab) * 2
    specs = [
        dict(prompt=[1, 1, 2], output=[2, 3, 3, 3], repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.1),
        dict(prompt=[], output=[], repetition_penalty=1.2),
        dict(prompt=[5], output=[6, 6, 19], frequency_penalty=-0.4),
        dict(prompt=[0, 19], output=[0], presence_penalty=1.0),
        dict(prompt=[4], output=[4]),
    ]
    rows = [row(temperature=0, logprobs=20, **s) for s in specs]
    out = Sampler().sample(logits, rows)
    for s, res, lg in zip(specs, out, logits.tolist()):
        pen = {k: v for k, v in s.items() if k not in ("prompt", "output")}
        want = ref_log_softmax(
            ref_penalised(lg, s["prompt"], s["output"], pen.get("repetition_penalty", 1.0), pen.get("frequency_penalty", 0.0), pen.get("presence_penalty", 0.0))
        )
        got = dict(res.top_logprobs)
        assert all(got[t] == pytest.approx(want[t], abs=1e-5) for t in range(vocab))
        assert res.token_id == max(range(vocab), key=lambda t: want[t])


def test_input_logits_untouched_and_other_dtypes_accepted():
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    before = logits.clone()
    Sampler().sample(logits, [row(prompt=[0], output=[0], temperature=0, repetition_penalty=3.0, frequency_penalty=1.0)])
    assert torch.equal(logits, before)
    out = Sampler().sample(logits.to(torch.bfloat16), [row(temperature=0, logprobs=1)])
    assert out[0].token_id == 0 and isinstance(out[0].logprob, float)


# ---------------------------------------------------------------- seeds


def sample_steps(seed: int, steps: int = 8, vocab: int = 1000, **kw) -> list[int]:
    g = gen(seed)
    logits = torch.zeros(1, vocab)
    s = Sampler()
    return [s.sample(logits, [row(generator=g, **kw)])[0].token_id for _ in range(steps)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    a, b, c = sample_steps(42), sample_steps(42), sample_steps(43)
    assert a == b
    assert a != c
    assert len(set(a)) > 1  # the generator advances between steps


def test_seeded_row_does_not_depend_on_batch():
    torch.manual_seed(3)
    vocab = 300
    mine = torch.randn(vocab)
    params = dict(temperature=0.9, top_k=50, top_p=0.95)

    alone_gen = gen(7)
    alone = [Sampler().sample(mine[None], [row(generator=alone_gen, **params)])[0].token_id for _ in range(6)]

    g_mine, g_other = gen(7), gen(99)
    s = Sampler(seed=123)
    batched = []
    for step in range(6):
        others = [
            row(generator=g_other, temperature=1.3, min_p=0.1),
            row(temperature=0.5),  # shared generator
            row(temperature=0.0),
            row(output=[1, 2], temperature=1.0, top_p=0.5, repetition_penalty=1.3),
        ]
        rows = others[: step % 4] + [row(generator=g_mine, **params)] + others[step % 4 :]
        logits = torch.randn(len(rows), vocab)
        logits[step % 4] = mine
        batched.append(s.sample(logits, rows)[step % 4].token_id)
    assert batched == alone


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(4, 1000)
    rows = [row() for _ in range(4)]
    a = [r.token_id for r in Sampler(seed=5).sample(logits, rows)]
    b = [r.token_id for r in Sampler(seed=5).sample(logits, rows)]
    c = [r.token_id for r in Sampler(seed=6).sample(logits, rows)]
    d = [r.token_id for r in Sampler(seed=5, device="cpu").sample(logits, rows)]
    assert a == b == d and a != c


# ---------------------------------------------------------------- distributions

LOGITS = [2.0, 1.6, 1.1, 0.7, 0.2, -0.4, -1.0, -2.2]
DRAWS = 20000
# chi-square with <= 7 degrees of freedom exceeds 40 with probability < 1e-6.
CHI2_LIMIT = 40.0


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=0.4),
        dict(temperature=1.8),
        dict(top_k=3),
        dict(top_p=0.6),
        dict(top_p=0.95, temperature=0.7),
        dict(min_p=0.15),
        dict(temperature=1.5, top_k=6, top_p=0.9, min_p=0.1),
        dict(temperature=0.8, top_k=5, repetition_penalty=1.0),
    ],
)
def test_sampling_distribution(params):
    want = ref_probs(LOGITS, **{k: v for k, v in params.items() if k != "repetition_penalty"})
    counts = draw_counts(Sampler(seed=11), LOGITS, DRAWS, **params)
    for c, q in zip(counts, want):
        if q == 0.0:
            assert c == 0  # truncated tokens are never drawn
    assert chi_square(counts, want) < CHI2_LIMIT, (counts, want)


def test_reference_truncations_are_not_trivial():
    # Guards the distribution test: each truncation really removes tokens here.
    assert sum(q > 0 for q in ref_probs(LOGITS, top_k=3)) == 3
    assert sum(q > 0 for q in ref_probs(LOGITS, top_p=0.6)) == 2
    assert sum(q > 0 for q in ref_probs(LOGITS, min_p=0.15)) == 5
    assert sum(q > 0 for q in ref_probs(LOGITS, temperature=1.5, top_k=6, top_p=0.9, min_p=0.1)) == 5


def test_seeded_rows_sample_the_same_distribution():
    params = dict(temperature=0.7, top_k=6)
    counts = draw_counts(Sampler(), LOGITS, 5000, seeded=True, **params)
    assert chi_square(counts, ref_probs(LOGITS, **params)) < CHI2_LIMIT


def test_top_k_keeps_ties_and_large_k_is_off():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5]] * 4000)
    counts = Counter(r.token_id for r in Sampler(seed=0).sample(logits, [row(top_k=1)] * 4000))
    assert set(counts) == {1, 2}  # both tied best tokens stay
    counts = Counter(r.token_id for r in Sampler(seed=0).sample(logits, [row(top_k=10**6)] * 4000))
    assert set(counts) == {0, 1, 2, 3}


@pytest.mark.parametrize("other", [dict(), dict(top_p=0.5)])  # top-k alone, and top-k beside top-p (sort path)
def test_top_k_rows_beside_unrestricted_rows(other):
    logits = torch.tensor([LOGITS] * 6000)
    rows = [row(top_k=2), row(**other)] * 3000
    tokens = [r.token_id for r in Sampler(seed=2).sample(logits, rows)]
    assert set(tokens[0::2]) == {0, 1}
    assert set(tokens[1::2]) == ({0, 1} if other else set(range(len(LOGITS))))


def test_prompt_ids_cached_by_identity_but_changes_respected():
    s = Sampler()
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    prompt = [0]
    assert s.sample(logits, [row(prompt=prompt, temperature=0, repetition_penalty=2.0)])[0].token_id == 1
    r = SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), [0], [], None)
    assert s.sample(logits, [r])[0].token_id == 1
    assert s.sample(logits, [r])[0].token_id == 1  # cached
    r.prompt_token_ids = [1]  # a different prompt list: not mistaken for the cached one
    assert s.sample(logits, [r])[0].token_id == 0
    r.prompt_token_ids.append(0)  # grown in place to [1, 0]: the length check notices
    assert s.sample(torch.tensor([[2.0, 1.9, 1.5]]), [r])[0].token_id == 2  # 1.0, 0.95, 1.5
    for _ in range(200):
        s.sample(logits, [row(temperature=0)])
    assert len(s._prompt_ids._entries) == 0  # unused entries are dropped


def test_top_p_one_keeps_tiny_tail():
    # float32 cumsum can overshoot 1; top_p = 1 must still keep every token.
    logits = torch.tensor([[10.0, 10.0, -5.0]] * 20000)
    rows = [row(top_p=1.0, top_k=3, temperature=2.0)] * 20000
    counts = Counter(r.token_id for r in Sampler(seed=1).sample(logits, rows))
    assert counts[2] > 0


# ---------------------------------------------------------------- errors


def test_shape_errors():
    with pytest.raises(ValueError, match="rows"):
        Sampler().sample(torch.zeros(2, 5), [row()])
    with pytest.raises(ValueError, match="num_rows, vocab"):
        Sampler().sample(torch.zeros(5), [row()])
    assert Sampler().sample(torch.zeros(0, 5), []) == []


def test_token_id_outside_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="token id 9 is outside the vocabulary"):
        Sampler().sample(torch.zeros(1, 5), [row(output=[9], repetition_penalty=1.2)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_for_seeded_rows():
    torch.manual_seed(4)
    logits = torch.randn(3, 500)
    kw = dict(temperature=0.8, top_k=40, top_p=0.9, output=[1, 2, 2], repetition_penalty=1.2, frequency_penalty=0.3, logprobs=3)
    cpu = Sampler().sample(logits, [row(generator=gen(i), **kw) for i in range(3)])
    cuda = Sampler().sample(logits.cuda(), [row(generator=gen(i), **kw) for i in range(3)])
    assert [r.token_id for r in cpu] == [r.token_id for r in cuda]
    for a, b in zip(cpu, cuda):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generators_are_batch_independent():
    def cuda_gen(seed):
        g = torch.Generator(device="cuda")
        g.manual_seed(seed)
        return g

    torch.manual_seed(5)
    mine = torch.randn(2000, device="cuda")
    kw = dict(temperature=1.0, top_p=0.9, min_p=0.01)
    g = cuda_gen(3)
    alone = [Sampler(device="cuda").sample(mine[None], [row(generator=g, **kw)])[0].token_id for _ in range(4)]
    g, s = cuda_gen(3), Sampler(seed=0, device="cuda")
    batched = []
    for step in range(4):
        rows = [row(temperature=0.7) for _ in range(step)] + [row(generator=g, **kw), row(temperature=0)]
        logits = torch.randn(len(rows), 2000, device="cuda")
        logits[step] = mine
        batched.append(s.sample(logits, rows)[step].token_id)
    assert batched == alone


def test_probabilities_are_the_truncated_distribution_sampling_uses():
    """What speculative verification checks drafts against: softmax(x / T) over the top-k, renormalised."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 3.0, 1.0, 1.0, -2.0]])
    params = SamplingParams(temperature=0.5, top_k=3)
    probs = Sampler(seed=0).probabilities(logits, params)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(2))
    for row in range(2):
        keep = logits[row].topk(3).indices
        expected = torch.zeros(5)
        expected[keep] = torch.softmax(logits[row, keep] / 0.5, dim=-1)
        assert torch.allclose(probs[row], expected, atol=1e-6)
    # min_p drops tokens below min_p x the top probability.
    probs = Sampler(seed=0).probabilities(logits[:1], SamplingParams(temperature=1.0, min_p=0.3))
    full = torch.softmax(logits[0], dim=-1)
    assert torch.equal(probs[0] > 0, full >= 0.3 * full.max())
