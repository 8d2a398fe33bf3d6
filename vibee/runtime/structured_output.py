"""Constrained decoding: a choice that asks for structured output samples only tokens its grammar
allows (a JSON schema, any JSON object, a Lark grammar or a regex).

llguidance compiles the grammar against the tokenizer's vocabulary (a byte trie of every token,
built once per tokenizer) and, for each step, computes the bitmask of the tokens that keep the
output inside the grammar: an Earley parser over the lexer's states, tens of microseconds a row
at this vocabulary. The engine reads a constrained row's tokens before its next step, as it does
for penalties; the masks of the step's rows are computed in one parallel call while the step's
forward runs on the device, copied there, and the sampler sets every other logit to -inf before
logprobs, greedy or random sampling. When the grammar is complete only EOS is allowed, so the
choice ends with finish_reason "stop".

A regular grammar (a regex, a JSON schema with a regular form, a Lark grammar, its nested rules up
to a depth, a tool plan) is not masked this way: its
token DFA (token_dfa.py) is loaded into a table on the device, whose rows mask and advance the
choice on the device, in decode rounds too, with no host round trip per token. So is JSON mode,
as a token automaton with a stack of open containers (json_pda.py), and a Lark grammar with
several bracket types, as one with a stack of return points (lark_pda.py).

Grammars are llguidance's JSON grammar text (``grammar_for_*``); requests carry it in
SamplingParams.structured_output so the engine process needs nothing else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vibee.runtime.host_copy import to_device
from vibee.runtime.grammar_table import DFAConstraint, GrammarTable, TokenDFAs
from vibee.runtime.token_dfa import NotRegular, device_pattern, token_bytes


log = logging.getLogger("vibee.engine")


class GrammarError(ValueError):
    """A grammar or schema that can't constrain decoding; the message says where and why."""


def grammar_for_json_schema(schema: Any) -> str:
    """A grammar for JSON text valid under `schema` (a dict, or its JSON text)."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"the schema is not JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as exc:
        raise GrammarError(f"not a usable JSON schema: {exc}") from None


def grammar_for_json_object() -> str:
    """OpenAI's JSON mode: any JSON object."""
    return grammar_for_json_schema({"type": "object"})


def grammar_for_lark(text: str) -> str:
    """A Lark grammar (llguidance's dialect: Lark's syntax, `start` the top rule, `%json {...}` for
    a JSON-schema-shaped part)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(text)


def grammar_for_regex(pattern: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_regex(pattern)


class StructuredOutputs:
    """One tokenizer's view for llguidance, made on first use (the token trie takes about a
    second on a large vocabulary; masks are cheap after it)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_token_ids: Sequence[int], device: str = "cpu",
                 table_bytes: int | None = None):
        """table_bytes: the device memory of the token-DFA table (its rows are the states of the
        regular constraints running at once; a DFA that finds no room is masked on the host).
        Default: 256 MB on a GPU, 841 free rows at a 128k vocabulary (two small tools' plan takes
        326-370 states), 64 MB elsewhere."""
        if table_bytes is None:
            table_bytes = (256 if str(device).startswith("cuda") else 64) << 20
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)  # the logits may be wider than the vocabulary
        self.eos_token_ids = sorted(eos_token_ids)
        # Made now, not on first use: decode rounds captured in CUDA graphs read its buffers.
        # None (table_bytes 0): a checker of grammars only (the server's), every grammar on llguidance.
        self.table = GrammarTable.for_budget(table_bytes, self.vocab_size, device) if table_bytes else None
        self._dfas: TokenDFAs | None = None
        self._ll: Any = None
        self._executor: Any = None
        # Host time of the masks (advancing the matchers, computing and queueing the bitmasks):
        # what `vibee bench throughput --structured-output` reports per step and per row.
        self.mask_seconds = 0.0
        self.mask_steps = 0
        self.mask_rows = 0
        self.requests_by_path = {"device": 0, "host": 0}  # constrained requests by where their masks run
        self._told_host: set = set()  # device patterns logged as going to the host

    @property
    def ll_tokenizer(self) -> Any:
        if self._ll is None:
            import llguidance

            if not self.eos_token_ids:
                raise GrammarError("this model has no end-of-sequence token, so a constrained output could not end")
            if not hasattr(self._tokenizer, "tokenizer_json"):
                raise GrammarError("structured output needs the model's tokenizer.json; this tokenizer has none")
            try:
                self._ll = llguidance.LLTokenizer(self._tokenizer.tokenizer_json(), n_vocab=self.vocab_size,
                                                  eos_token=self.eos_token_ids)
            except TypeError:  # llguidance 1.6 (the GPU machine's) takes one end token, 1.9 a list: the tokenizer's own
                own = sorted(getattr(self._tokenizer, "eos_token_ids", ()) or self.eos_token_ids)
                self._ll = llguidance.LLTokenizer(self._tokenizer.tokenizer_json(), n_vocab=self.vocab_size,
                                                  eos_token=own[0])
            self._executor = llguidance.LLExecutor()
        return self._ll

    def check(self, grammar: str) -> None:
        """Raise GrammarError (one message, with the grammar's line and a caret where llguidance
        gives them) unless `grammar` can constrain this tokenizer's output."""
        import llguidance

        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if failed:
            raise GrammarError(f"the grammar is not usable: {messages[0].rstrip()}")

    def constraints(self, grammar: str, n: int) -> list[Any]:
        """n choices' constraints: on the device's token-DFA table when the grammar is regular and
        its DFA fits, else llguidance's host masks."""
        pattern = device_pattern(grammar) if self.table is not None else None
        if pattern is not None:
            try:
                constraints = self.dfas.constraints(pattern, n)
                self.requests_by_path["device"] += 1
                return constraints
            except NotRegular as exc:
                # a grammar the device could take but did not: why (once a pattern, the cause of a slower run)
                if pattern not in self._told_host:
                    self._told_host.add(pattern)
                    log.info("structured output on the host (llguidance's masks): %s", exc)
        constraints = [self.constraint(grammar) for _ in range(n)]
        self.requests_by_path["host"] += 1
        return constraints

    def pattern_to_compile(self, grammar: str | None) -> str | None:
        """The regex of a grammar whose token DFA is not compiled yet (None: no grammar, not a
        regular one, already compiled, or no table): the engine process compiles it on a thread
        of its own (TokenDFAs.compile_apart) before it adds the request, so that no step waits on it."""
        if grammar is None or self.table is None:
            return None
        pattern = device_pattern(grammar)
        return pattern if pattern is not None and not self.dfas.compiled(pattern) else None

    @property
    def dfas(self) -> TokenDFAs:
        if self._dfas is None:
            tokens = token_bytes(self.ll_tokenizer, min(self._tokenizer.vocab_size, self.vocab_size))
            self._dfas = TokenDFAs(self.table, tokens, self.eos_token_ids,
                                   encode=lambda text: self._tokenizer.encode(text, add_special_tokens=False))
        return self._dfas

    def constraint(self, grammar: str) -> "TokenConstraint":
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar is not usable: {matcher.get_error().rstrip()}")
        return TokenConstraint(matcher)

    def mask(self, x: torch.Tensor, rows: Sequence[tuple[int, Any, Sequence[int]]]) -> None:
        """Set the logits of x [N, vocab] that the grammar forbids to -inf: rows are (row of x,
        its constraint, the choice's output tokens so far, which the constraint catches up on).
        Token-DFA rows are masked on the device from their states (kept there, in their slots:
        their tokens so far are not needed); the rest by llguidance's bitmasks, computed on the host."""
        started = time.perf_counter()
        dfa_rows = [row for row in rows if isinstance(row[1], DFAConstraint)]
        if dfa_rows:
            slots = [0] * len(x)
            for r, constraint, _ in dfa_rows:
                slots[r] = constraint.slot
            self.table.mask(x, self.table.states[to_device(slots, x.device, torch.long)])
        rows = [row for row in rows if not isinstance(row[1], DFAConstraint)]
        if rows:
            self._mask_on_host(x, rows)
        self.mask_seconds += time.perf_counter() - started
        self.mask_steps += 1
        self.mask_rows += len(rows) + len(dfa_rows)

    def advance(self, constraints: Sequence[Any], tokens: torch.Tensor) -> None:
        """After a step's sampling: each token-DFA choice's state moves by its token, on the
        device (constraints[i] is row i's, None for a free row; llguidance's catch up lazily)."""
        rows = [i for i, c in enumerate(constraints) if isinstance(c, DFAConstraint)]
        if rows:
            index = to_device(rows, tokens.device, torch.long)
            slots = to_device([constraints[i].slot for i in rows], tokens.device, torch.long)
            self.table.advance_slots(slots, tokens[index])

    def _mask_on_host(self, x: torch.Tensor, rows: Sequence[tuple[int, "TokenConstraint", Sequence[int]]]) -> None:
        words = (self.vocab_size + 31) // 32
        bits = torch.zeros(len(rows), words, dtype=torch.int32, pin_memory=x.is_cuda)
        for _, constraint, output in rows:
            constraint.advance(output)
        self._executor.unsafe_compute_mask_ptr([(c.matcher, j) for j, (_, c, _) in enumerate(rows)],
                                               bits.data_ptr(), words * 4, len(rows))
        for j, (_, constraint, _) in enumerate(rows):
            if constraint.failed:  # cannot happen for masked samples; end the choice rather than emit junk
                words_j = bits[j].numpy().view(np.uint32)
                words_j[:] = 0
                for eos in self.eos_token_ids:
                    words_j[eos // 32] |= np.uint32(1 << (eos % 32))
        device_bits = bits.to(x.device, non_blocking=True)
        shifts = torch.arange(32, device=x.device, dtype=torch.int32)
        allowed = ((device_bits[:, :, None] >> shifts) & 1).view(len(rows), words * 32)[:, : x.shape[1]].bool()
        index = to_device([r for r, _, _ in rows], x.device, torch.long)
        x[index] = x[index].masked_fill(~allowed, float("-inf"))


class TokenConstraint:
    """One choice's place in its grammar. Tokens are consumed lazily, from the choice's output,
    just before the next mask, so the engine records tokens in one place only."""

    def __init__(self, matcher: Any):
        self.matcher = matcher
        self.consumed = 0

    @property
    def failed(self) -> bool:
        return self.matcher.is_error()

    @property
    def complete(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()

    def release(self) -> None:
        """Nothing to give back (a token DFA gives back its table rows)."""

    def advance(self, output_token_ids: Sequence[int]) -> None:
        new = list(output_token_ids[self.consumed:])
        self.consumed = len(output_token_ids)
        if new and not self.matcher.is_stopped():
            self.matcher.consume_tokens(new)
