"""Turn one step's logits into tokens, vLLM style.

Per row, in this order:

1. repetition penalty over the tokens seen in prompt + output (positive logits divided by it,
   negative ones multiplied), then frequency (x output count) and presence (once per distinct
   output token) penalties subtracted;
2. logprobs: ``log_softmax`` of these penalised logits, *before* temperature/top-k/top-p/min-p.
   This is the model's (penalised) distribution, the same for every sampling setting, like
   vLLM's "raw" logprobs except that penalties are already applied. Greedy picks its argmax, so
   a greedy token always has the highest reported logprob;
3. greedy rows (temperature < GREEDY_EPS) take the argmax and never touch a generator;
4. random rows: divide by temperature, keep the top-k logits (ties with the k-th kept), keep the
   smallest head of the sorted distribution whose mass reaches top_p (renormalised after top-k),
   drop tokens whose probability is below min_p x the top probability, then sample by the
   exponential race ``argmax(p / E)``, E ~ Exponential(1), which draws from p without a cumsum.

Noise for a row with its own ``generator`` comes only from that generator (exactly V draws per
sampled step), so a seeded request gives the same tokens whatever else is in the batch. Other
random rows share the sampler-wide generator.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vibee.runtime.host_copy import to_device
from vibee.runtime.sampling_kernel import gumbel_sample
from vibee.runtime.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    stop_token_ids: Collection[int] = ()  # what ends the sequence (EOS included): held back before min_tokens
    constraint: Any = None  # the choice's TokenConstraint (structured_output.py) when it has a grammar


@dataclass
class PendingSample:
    """A launched sample: the tokens on the device (the next step can read them there) and the
    copies on their way to the host that collect() turns into SampleResults."""

    tokens: torch.Tensor  # long [n], on the logits' device
    params: list[SamplingParams]
    host_tokens: torch.Tensor  # the copies below land in (pinned) host memory
    want: list[int]  # rows that asked for logprobs
    host_chosen: torch.Tensor | None  # float [len(want)]: the sampled token's logprob
    host_top: tuple[torch.Tensor, torch.Tensor] | None  # values and ids [len(want), k_max]
    copied: torch.cuda.Event | None  # recorded after the copies (None on a CPU)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None  # the sampled token's logprob when params.logprobs is not None
    top_logprobs: list[tuple[int, float]] | None  # best `logprobs` (token, logprob), best first


def _as_ids(seq: Sequence[int]) -> np.ndarray:
    return np.fromiter(seq, dtype=np.int64, count=len(seq))


def _check_range(ids: np.ndarray, vocab: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab})")


def _on(device: torch.device, values, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (a list or numpy array) as a tensor on `device`, queued without waiting for the
    forward pass still running (vibee/runtime/host_copy.py)."""
    return to_device(values, device, dtype)


def _pairs(per_row: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) tensors for scatter/index_put from one id array per row."""
    lengths = np.fromiter((len(a) for a in per_row), dtype=np.int64, count=len(per_row))
    ids = np.concatenate(per_row) if per_row else np.zeros(0, dtype=np.int64)
    row = np.repeat(np.arange(len(per_row), dtype=np.int64), lengths)
    return _on(device, row), _on(device, ids)


class _PromptIdCache:
    """Distinct prompt token ids per prompt list, so a long prompt is converted once, not every
    step. Keyed by the list's identity; the entry keeps the list alive (so its id can't be
    reused) and is checked against the length. Prompts are not expected to change in place."""

    KEEP_CALLS = 64  # entries unused for this many sample() calls are dropped

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Sequence[int], int, np.ndarray, int]] = {}
        self._calls = 0

    def get(self, seq: Sequence[int], vocab: int) -> np.ndarray:
        hit = self._entries.get(id(seq))
        if hit is not None and hit[0] is seq and hit[1] == len(seq):
            ids = hit[2]
        else:
            ids = np.unique(_as_ids(seq))
        _check_range(ids, vocab)
        self._entries[id(seq)] = (seq, len(seq), ids, self._calls)
        return ids

    def end_call(self) -> None:
        self._calls += 1
        if self._calls % self.KEEP_CALLS == 0:
            old = self._calls - self.KEEP_CALLS
            self._entries = {k: e for k, e in self._entries.items() if e[3] >= old}


class Sampler:
    def __init__(self, seed: int | None = None, device: torch.device | str | None = None,
                 kernels: bool | None = None, structured: Any = None):
        """``seed`` seeds the shared generator used by rows without their own (None: random).
        ``device`` creates that generator up front; others are made on first use per device.
        ``kernels``: sample plain batches (temperature only, shared generator) in one Triton
        kernel (vibee/runtime/sampling_kernel.py); None: on a CUDA device (on a CPU the kernel
        needs TRITON_INTERPRET=1). ``structured``: the StructuredOutputs that masks the rows
        with a grammar."""
        self._seed = seed
        self._structured = structured
        self._kernels = kernels
        self._generators: dict[torch.device, torch.Generator] = {}
        self._prompt_ids = _PromptIdCache()
        if device is not None:
            self._shared_generator(torch.device(device))

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # tensors report cuda:N
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampleResult]:
        """The tokens of rows (and their logprobs where asked), on the host."""
        return self.collect(self.launch(logits, rows))

    @torch.no_grad()
    def launch(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> PendingSample:
        """Queue the sampling of rows on the logits' device without waiting for it: the tokens stay
        on the device for the next step, their copies to the host finish in the background."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [num_rows, vocab], got shape {tuple(logits.shape)}")
        n, vocab = logits.shape
        if n != len(rows):
            raise ValueError(f"got {n} rows of logits for {len(rows)} sampling rows")
        device = logits.device
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return PendingSample(empty.to(device), [], empty, [], None, None, None)
        params = [r.params for r in rows]
        if self._fused(logits, rows):
            temps = _on(device, [0.0 if p.is_greedy else p.temperature for p in params], torch.float32)
            seed = torch.randint(2**62, (1,), device=device, generator=self._shared_generator(device))
            return self._launch_results(logits, gumbel_sample(logits, temps, seed), params)
        # Penalties write in place, on a copy (callers may reuse logits); nothing else writes to x.
        x = logits.to(torch.float32, copy=any(p.has_penalties for p in params))

        self._apply_penalties(x, rows, vocab)
        self._prompt_ids.end_call()

        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        if len(greedy) == n:  # one kind of row (the usual batch): no row selection
            tokens = x.argmax(dim=-1)
        elif not greedy:
            tokens = self._sample_random(x, rows)
        else:
            rand = [i for i, p in enumerate(params) if not p.is_greedy]
            tokens = torch.empty(n, dtype=torch.long, device=device)
            gi, ri = _on(device, greedy), _on(device, rand)
            tokens[gi] = x[gi].argmax(dim=-1)
            tokens[ri] = self._sample_random(x[ri], [rows[i] for i in rand])

        if self._structured is not None and any(r.constraint is not None for r in rows):
            self._structured.advance([r.constraint for r in rows], tokens)  # token-DFA states, on the device
        return self._launch_results(x, tokens, params)

    def _fused(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> bool:
        """Whether the rows sample in the one-pass kernel: some random row, every one plain
        (temperature only, the shared generator; greedy rows are its temperature 0)."""
        if not (logits.is_cuda if self._kernels is None else self._kernels):
            return False
        plain = all(r.generator is None and not r.params.has_penalties and r.params.top_p >= 1.0
                    and not 1 <= r.params.top_k < logits.shape[1] and r.params.min_p <= 0.0 for r in rows)
        return plain and not all(r.params.is_greedy for r in rows) and logits.numel() < 2**31

    # ---- penalties ----

    def _apply_penalties(self, x: torch.Tensor, rows: Sequence[SamplingRow], vocab: int) -> None:
        device = x.device
        self._bias_and_hold(x, rows)
        self._apply_grammars(x, rows)
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        add = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
        if not rep and not add:
            return
        outputs = {i: _as_ids(rows[i].output_token_ids) for i in {*rep, *add}}
        for ids in outputs.values():
            _check_range(ids, vocab)

        if rep:
            ri = _on(device, rep)
            per_row = [np.concatenate([self._prompt_ids.get(rows[i].prompt_token_ids, vocab), outputs[i]]) for i in rep]
            row, ids = _pairs(per_row, device)
            seen = torch.zeros(len(rep), vocab, dtype=torch.bool, device=device)
            seen[row, ids] = True
            pen = _on(device, [rows[i].params.repetition_penalty for i in rep], torch.float32)[:, None]
            sub = x[ri]
            x[ri] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)

        if add:
            ai = _on(device, add)
            row, ids = _pairs([outputs[i] for i in add], device)
            counts = torch.zeros(len(add), vocab, dtype=torch.float32, device=device)
            # scatter_add on the flat view: much faster on GPU than index_put_(accumulate=True).
            counts.view(-1).scatter_add_(0, row * vocab + ids, torch.ones_like(ids, dtype=torch.float32))
            freq = _on(device, [rows[i].params.frequency_penalty for i in add], torch.float32)[:, None]
            pres = _on(device, [rows[i].params.presence_penalty for i in add], torch.float32)[:, None]
            x[ai] -= freq * counts + pres * (counts > 0).float()

    def _apply_grammars(self, x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        """Tokens outside a row's grammar made impossible. Before the penalties: a penalty
        divides or subtracts, and -inf stays -inf."""
        constrained = [(i, r.constraint, r.output_token_ids) for i, r in enumerate(rows) if r.constraint is not None]
        if constrained:
            self._structured.mask(x, constrained)

    @staticmethod
    def _bias_and_hold(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        """logit_bias added; the stop tokens of rows short of min_tokens made impossible."""
        row_ids, token_ids, values = [], [], []
        for i, r in enumerate(rows):
            for token, bias in r.params.logit_bias.items():
                row_ids.append(i), token_ids.append(token), values.append(bias)
            if len(r.output_token_ids) < r.params.min_tokens:
                for token in r.stop_token_ids:
                    row_ids.append(i), token_ids.append(token), values.append(-math.inf)
        if row_ids:  # one index_put: a bias then a hold on the same token sums to -inf, as it should
            x.index_put_((_on(x.device, row_ids), _on(x.device, token_ids)), _on(x.device, values, torch.float32),
                         accumulate=True)

    # ---- random sampling ----

    def _sample_random(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = x.device
        vocab = x.shape[1]
        probs = self._truncated_probs(x, [row.params for row in rows])
        # No renormalisation needed: argmax(p / E) is unchanged by scaling a row.

        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if len(shared) == len(rows):  # every row: the same draws as the scatter below, without it
            noise = torch.empty(len(rows), vocab, device=device).exponential_(generator=self._shared_generator(device))
        else:
            noise = torch.empty_like(probs)
            if shared:
                gen = self._shared_generator(device)
                noise[_on(device, shared)] = torch.empty(len(shared), vocab, device=device).exponential_(generator=gen)
        for i, row in enumerate(rows):
            if row.generator is not None:
                g = row.generator
                if g.device == device:
                    noise[i].exponential_(generator=g)
                else:
                    noise[i] = torch.empty(vocab, device=g.device).exponential_(generator=g).to(device)
        # A zero draw would turn a zero-probability token into 0/0 = nan, which argmax picks.
        noise.clamp_min_(torch.finfo(torch.float32).tiny)
        return (probs / noise).argmax(dim=-1)

    def probabilities(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """The distribution one request samples from at each row of logits [N, V] (no penalties):
        softmax after temperature, top-k, top-p and min-p, renormalised. Speculative decoding
        verifies drafts against it."""
        probs = self._truncated_probs(logits.to(torch.float32), [params] * logits.shape[0])
        return probs / probs.sum(dim=-1, keepdim=True)

    def _truncated_probs(self, x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Per row: softmax(x / temperature) with top-k, top-p and min-p applied (not renormalised)."""
        device = x.device
        vocab = x.shape[1]
        temp = _on(device, [p.temperature for p in params], torch.float32)
        x = x / temp[:, None]

        # Top-k alone needs only a partial topk; with top-p both share one sort. Rows with neither
        # get no mask.
        ks = [p.top_k if 1 <= p.top_k < vocab else vocab for p in params]
        ps = [p.top_p for p in params]
        use_k = any(k < vocab for k in ks)
        use_p = any(p < 1.0 for p in ps)
        if use_k and not use_p:
            # Only top-k: a partial topk is much cheaper than sorting the whole vocabulary.
            k_max = max(k for k in ks if k < vocab)
            top = x.topk(k_max, dim=-1).values
            k = _on(device, [min(k, k_max) for k in ks])[:, None]
            off = _on(device, [k >= vocab for k in ks], torch.bool)[:, None]
            kth = top.gather(1, k - 1).masked_fill(off, float("-inf"))  # rows without top-k keep all
            x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th logit stay
        elif use_k or use_p:
            sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
            drop = torch.zeros_like(sorted_x, dtype=torch.bool)
            if use_k:
                k = _on(device, ks)[:, None]
                kth = sorted_x.gather(1, k - 1)
                drop |= sorted_x < kth  # ties with the k-th logit stay: the cut doesn't depend on sort order
            if use_p:
                # top_p == 1 must keep everything even when float cumsum overshoots 1.
                p = _on(device, [q if q < 1.0 else float("inf") for q in ps], torch.float32)[:, None]
                probs_sorted = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)
                before = probs_sorted.cumsum(dim=-1) - probs_sorted  # mass of the better tokens
                drop |= before >= p  # the first token has before == 0 and always stays
            x = x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))

        probs = x.softmax(dim=-1)
        min_ps = [p.min_p for p in params]
        if any(m > 0.0 for m in min_ps):
            m = _on(device, min_ps, torch.float32)[:, None]
            probs = probs.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs

    def shared_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator rows without their own draw from (speculative verification uses it too)."""
        return self._shared_generator(torch.device(device))

    def results_for(self, logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[SampleResult]:
        """SampleResults (with logprobs where asked) for tokens chosen elsewhere, e.g. by a
        speculative verifier, from the logits [N, V] they were chosen at."""
        return self.collect(self.launch_for(logits, tokens, params))

    @torch.no_grad()
    def launch_for(self, logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> PendingSample:
        """launch() for tokens chosen elsewhere (a CUDA graph's argmax of greedy rows without
        penalties, the tokens sample() would pick): only the logprobs and the copies are queued."""
        return self._launch_results(logits, tokens, params)

    # ---- logprobs and results ----

    def _launch_results(self, x: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> PendingSample:
        """Logprobs of the rows that want them, and every figure's copy to the host started."""
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        chosen = top = None
        if want:
            wi = _on(x.device, want)
            lp = x[wi].to(torch.float32).log_softmax(dim=-1)
            chosen = lp.gather(1, tokens[wi][:, None]).squeeze(1)
            k_max = max(params[i].logprobs for i in want)
            if k_max > 0:
                top = lp.topk(min(k_max, lp.shape[1]), dim=-1)
        if x.device.type != "cuda":  # a copy all the same: tokens may be a buffer the next step overwrites
            return PendingSample(tokens, params, tokens.clone(), want, chosen,
                                 None if top is None else (top.values, top.indices), None)
        host_tokens = _to_host(tokens)
        host_chosen = None if chosen is None else _to_host(chosen)
        host_top = None if top is None else (_to_host(top.values), _to_host(top.indices))
        copied = torch.cuda.Event()
        copied.record()
        return PendingSample(tokens, params, host_tokens, want, host_chosen, host_top, copied)

    @staticmethod
    def collect(pending: PendingSample) -> list[SampleResult]:
        """Wait for a launched sample's copies (not for anything queued after them) and read them."""
        if pending.copied is not None:
            pending.copied.synchronize()
        token_list = pending.host_tokens.tolist()
        if not pending.want:
            return [SampleResult(t, None, None) for t in token_list]
        chosen = pending.host_chosen.tolist()
        top_vals, top_ids = ([v.tolist() for v in pending.host_top] if pending.host_top is not None
                             else ([[] for _ in pending.want], [[] for _ in pending.want]))
        results = [SampleResult(t, None, None) for t in token_list]
        for j, i in enumerate(pending.want):
            k = pending.params[i].logprobs
            results[i] = SampleResult(token_list[i], chosen[j], list(zip(top_ids[j][:k], top_vals[j][:k])))
        return results


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A copy of a CUDA tensor into new pinned host memory, queued without waiting."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host
