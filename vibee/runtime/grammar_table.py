"""The device half of token-DFA constraints (token_dfa.py compiles them): one GrammarTable per
engine holds every loaded DFA's next states and bitmasks on the device, row 0 the free state that
unconstrained rows sit in; a DFA is loaded once per pattern (LoadedDFA) and shared by every choice
that uses it, each choice (DFAConstraint) keeping its state in a slot of the table; TokenDFAs is an
engine's compiler and loader of patterns. Two kinds of pushdown automata live in the same table:
JSON mode's (json_pda.py, rows of its own) and Lark grammars whose rules nest in several ways
(lark_pda.py, lark_pda_tables.py: rows handed out as a DFA's are)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vibee.runtime import json_pda, lark_pda_tables
from vibee.runtime.json_pda import TokenPDA, compile_json_pda
from vibee.runtime.lark_pda_tables import PDATables, compile_lark_pda
from vibee.runtime.lark_regex import NESTED_LARK
from vibee.runtime.token_dfa import JSON_OBJECT, NotRegular, TokenDFA, compile_dfa

# A row's state is one int64: its table row, and for a pushdown automaton's rows its stack as a
# depth and a word of bits above it (JSON mode's: open containers, a bit each, json_pda.py; a Lark
# grammar's: return ids, the depth counted in bits, lark_pda.py).
ROW_BITS, DEPTH_BITS = 16, 6
DEPTH_SHIFT, STACK_SHIFT = ROW_BITS, ROW_BITS + DEPTH_BITS
assert json_pda.MAX_DEPTH < 2**DEPTH_BITS and STACK_SHIFT + json_pda.MAX_DEPTH < 63
assert lark_pda_tables.STACK_BITS < 2**DEPTH_BITS and STACK_SHIFT + lark_pda_tables.STACK_BITS == 63
assert lark_pda_tables.FINAL_ROW_BITS < ROW_BITS
# A Lark PDA's row is marked in GrammarTable.pda by PDA_ROW, with its entry bits and accepting return ids.
PDA_ROW, PDA_IDS_SHIFT = 1 << 16, 8


class _Runs:
    """Free runs (first, size) of a range of numbers, by first: rows of the table, effect rows."""

    def __init__(self, first: int, size: int):
        self.runs: list[tuple[int, int]] = [(first, size)] if size > 0 else []

    @property
    def longest(self) -> int:
        return max((n for _, n in self.runs), default=0)

    def take(self, n: int) -> int | None:
        for j, (first, size) in enumerate(self.runs):
            if size >= n:
                self.runs[j:j + 1] = [(first + n, size - n)] if size > n else []
                return first
        return None

    def give(self, first: int, n: int) -> None:
        merged: list[tuple[int, int]] = []
        for start, size in sorted(self.runs + [(first, n)]):
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((start, size))
        self.runs = merged


def _bitmask(allowed: np.ndarray) -> np.ndarray:
    """bool [S, V] -> int32 [S, ceil(V / 32)]: bit j of word w says whether token 32 w + j is allowed."""
    s, v = allowed.shape
    padded = np.zeros((s, -(-v // 32) * 32), dtype=bool)
    padded[:, :v] = allowed
    words = (padded.reshape(s, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=-1)
    return words.astype(np.uint32).view(np.int32)


class GrammarTable:
    """The device's tables of every loaded DFA: next [capacity, V] (int16: a row number) and bits
    [capacity, V / 32], row 0 the free state. Rows are handed out in runs, one run per loaded
    DFA, and taken back when its last choice is done. With json_mode, rows 1..JSON_ROWS are kept
    for JSON mode's pushdown automaton, whose stack effects (json_pda.py) sit beside them: effect
    [JSON_ROWS, V] (int16, a row of effects [MAX_EFFECTS, 8]). A Lark PDA's run of rows holds in
    `next` its tokens' effect ids, rows of pda_effects [pda_effects, lark_pda_tables.EFFECT_FIELDS] handed
    out in runs too, and is marked in `pda` (entry bits and accepting return ids, PDA_ROW). They are
    made with the table, at a fixed place, since decode rounds captured in CUDA graphs read them."""

    MAX_ROWS = 2**15 - 1  # next holds row numbers in int16
    JSON_ROWS = json_pda.NUM_STATES
    MAX_EFFECTS = 1024
    PDA_EFFECTS = 4096

    def __init__(self, capacity: int, vocab_size: int, device: str | torch.device, slots: int = 4096,
                 json_mode: bool = False, pda_effects: int = PDA_EFFECTS):
        """slots: the constrained choices that can run at once (each keeps its state on the device);
        pda_effects: the Lark PDAs' distinct effects that can be loaded at once."""
        reserved = self.JSON_ROWS if json_mode else 0
        if not 2 + reserved <= capacity <= self.MAX_ROWS:
            raise ValueError(f"a grammar table has {2 + reserved} to {self.MAX_ROWS} rows, got {capacity}")
        if not 1 <= pda_effects <= self.MAX_ROWS:  # next holds effect ids in int16 too
            raise ValueError(f"a grammar table has room for 1 to {self.MAX_ROWS} Lark PDA effects, got {pda_effects}")
        self.capacity, self.vocab_size, self.device = capacity, vocab_size, torch.device(device)
        self.words = -(-vocab_size // 32)
        self.next = torch.zeros(capacity, vocab_size, dtype=torch.int16, device=self.device)
        self.bits = torch.full((capacity, self.words), -1, dtype=torch.int32, device=self.device)
        self.json_rows = reserved
        self.effect = torch.zeros(max(reserved, 1), vocab_size if reserved else 1, dtype=torch.int16, device=self.device)
        self.effects = torch.zeros(self.MAX_EFFECTS if reserved else 1, json_pda.EFFECT_FIELDS, dtype=torch.long,
                                   device=self.device)
        self.effects[:, json_pda.MAX_DEPTH_BEFORE] = json_pda.MAX_DEPTH  # effect 0: none
        self.effects[:, json_pda.EXACT_DEPTH] = -1
        self.pda = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.pda_effects = torch.zeros(pda_effects + 1, lark_pda_tables.EFFECT_FIELDS, dtype=torch.long, device=self.device)
        self.rows = _Runs(1 + reserved, capacity - 1 - reserved)
        self.pda_effect_runs = _Runs(1, pda_effects)  # row 0: allows nothing
        self._pda_loaded: dict[int, tuple[int, int]] = {}  # a Lark PDA's first row -> its run of effects
        # Each constrained choice's state (a row of the table) in its slot, on the device: the
        # sampler and the decode rounds read and advance it there, so the host never needs a
        # choice's last token to mask its next one. Slot 0 is every unconstrained row's (state 0).
        self.states = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._free_slots = list(range(slots - 1, 0, -1))

    @classmethod
    def for_budget(cls, budget_bytes: int, vocab_size: int, device: str | torch.device) -> "GrammarTable":
        """As many rows as budget_bytes hold beside JSON mode's effects and the Lark PDAs' (at least
        JSON mode's rows, the free state and one)."""
        per_row = 2 * vocab_size + 4 * -(-vocab_size // 32) + 8
        fixed = 2 * cls.JSON_ROWS * vocab_size + 64 * cls.MAX_EFFECTS + 8 * lark_pda_tables.EFFECT_FIELDS * cls.PDA_EFFECTS
        rows = (budget_bytes - fixed) // per_row
        return cls(min(cls.MAX_ROWS, max(2 + cls.JSON_ROWS, rows)), vocab_size, device, json_mode=True)

    @property
    def free_rows(self) -> int:
        return self.rows.longest

    def load(self, dfa: TokenDFA | TokenPDA | PDATables) -> int:
        """Copy dfa into a free run of rows; returns its first row (state s is row first + s).
        NotRegular when no run is long enough. JSON mode's automaton goes to its own rows."""
        if isinstance(dfa, TokenPDA):
            return self._load_json(dfa)
        n = dfa.num_states
        first = self.rows.take(n)
        if first is None:
            raise NotRegular(f"its automaton has {n} states and the device's grammar table {self.free_rows} free rows")
        if isinstance(dfa, PDATables):
            try:
                self._load_pda(dfa, first)
            except NotRegular:
                self.rows.give(first, n)
                raise
            return first
        moved = np.where(dfa.next >= 0, dfa.next + first, -1).astype(np.int16)
        self.next[first:first + n] = torch.from_numpy(moved).to(self.device)
        self.bits[first:first + n] = torch.from_numpy(_bitmask(dfa.next >= 0)).to(self.device)
        self.pda[first:first + n] = 0
        return first

    def _load_pda(self, pda: PDATables, first: int) -> None:
        n, count = pda.num_states, len(pda.effects)
        at = self.pda_effect_runs.take(count)
        if at is None:
            raise NotRegular(f"its automaton has {count} stack effects and the device's table room for "
                             f"{self.pda_effect_runs.longest} more")
        self._pda_loaded[first] = (at, count)
        ids = np.where(pda.effect > 0, pda.effect - 1 + at, -1).astype(np.int16)
        effects = pda.effects.copy()
        final = effects[:, lark_pda_tables.FINAL:]
        valid = (effects[:, lark_pda_tables.VALID:lark_pda_tables.VALID + 1] >> np.arange(final.shape[1])) & 1 == 1
        final[valid] += first  # outcomes' rows in the table's numbering
        self.next[first:first + n] = torch.from_numpy(ids).to(self.device)
        self.bits[first:first + n] = torch.from_numpy(_bitmask(pda.effect > 0)).to(self.device)
        self.pda_effects[at:at + count] = torch.from_numpy(effects).to(self.device)
        self.pda[first:first + n] = PDA_ROW | pda.bits | pda.accepting_ids << PDA_IDS_SHIFT

    def _load_json(self, pda: TokenPDA) -> int:
        if not self.json_rows:
            raise NotRegular("this grammar table keeps no rows for JSON mode")
        if pda.num_states != self.json_rows or len(pda.effects) > self.MAX_EFFECTS:
            raise NotRegular(f"JSON mode's automaton has {pda.num_states} states and {len(pda.effects)} stack "
                             f"effects, the table room for {self.json_rows} and {self.MAX_EFFECTS}")
        first, n = 1, pda.num_states
        moved = np.where(pda.next >= 0, pda.next + first, -1).astype(np.int16)
        self.next[first:first + n] = torch.from_numpy(moved).to(self.device)
        self.bits[first:first + n] = torch.from_numpy(_bitmask(pda.next >= 0)).to(self.device)
        self.effect[:, : pda.effect.shape[1]] = torch.from_numpy(pda.effect.astype(np.int16)).to(self.device)
        self.effects[: len(pda.effects)] = torch.from_numpy(pda.effects).to(self.device)
        return first

    def take_slot(self, state: int) -> int:
        """A slot for a new choice, starting in `state` (NotRegular when every slot is taken)."""
        if not self._free_slots:
            raise NotRegular(f"all {len(self.states) - 1} slots of the device's grammar table are taken")
        slot = self._free_slots.pop()
        self.states[slot] = state
        return slot

    def give_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    def advance_slots(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """The states in these slots (on the device) after these tokens: states[slots] moves by
        next (slot 0 stays free)."""
        self.states[slots] = self.advance(self.states[slots], tokens)

    def unload(self, first: int, n: int) -> None:
        if first <= self.json_rows:  # JSON mode's rows stay its own (loaded again as they were)
            return
        if first in self._pda_loaded:
            self.pda[first:first + n] = 0
            self.pda_effect_runs.give(*self._pda_loaded.pop(first))
        self.rows.give(first, n)

    def mask(self, logits: torch.Tensor, states: torch.Tensor) -> None:
        """Set logits[i, t] to -inf where row i's state (a table row, with a stack in a pushdown
        automaton's rows; 0: free) does not allow token t, in place, on the device (rows in the
        free state are not touched)."""
        rows, width = logits.shape
        if rows == 0:
            return
        if logits.is_cuda:
            from vibee.runtime.token_mask_kernel import apply_token_bitmask

            apply_token_bitmask(logits, self, states)
            return
        row, depth, stack = unpack(states)
        cols = min(width, self.vocab_size)
        moves = self.next[row, :cols]  # next rows, or a Lark PDA's effect ids
        allowed = moves >= 0
        if self.json_rows:
            # Which of the few effects each row's stack allows, then each token's by its effect id.
            fits = json_pda.effect_allows(self.effects[None], depth[:, None], stack[:, None])  # [rows, effects]
            allowed &= fits.gather(1, self._effect_ids(row, slice(0, cols)))
        meta = self.pda[row]
        in_pda = (meta & PDA_ROW) != 0
        if bool(in_pda.any()):  # this path is the host's (no captured graph to keep the same)
            # Which of the loaded effects each row's stack allows, then each token's by its effect id.
            loaded = max(at + n for at, n in self._pda_loaded.values())
            fits = _pda_fits(self.pda_effects[None, :loaded].expand(len(row), -1, -1), depth[:, None], stack[:, None],
                             _stack_may_end(meta, stack)[:, None])  # [rows, effects]
            ids = torch.where(in_pda[:, None], moves.long(), 0).clamp(min=0)
            allowed &= fits.gather(1, ids) | ~in_pda[:, None]
        logits[:, :cols].masked_fill_(~allowed, float("-inf"))
        if width > self.vocab_size:
            logits[:, self.vocab_size:].masked_fill_((row != 0)[:, None], float("-inf"))

    def _effect_ids(self, row: torch.Tensor, cols: slice | torch.Tensor) -> torch.Tensor:
        """JSON mode's stack effects (ids) of these rows' tokens: cols a slice of the vocabulary
        ([rows, cols]) or one token a row ([rows]); 0, none, for every row outside JSON mode's."""
        in_json = (row >= 1) & (row <= self.json_rows)
        ids = self.effect[(row - 1).clamp(0, self.json_rows - 1), cols].long()
        return torch.where(in_json.view(-1, *([1] * (ids.dim() - 1))), ids, 0)

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's state after its token (tokens the state allows; the free state stays); in
        a pushdown automaton's rows the stack pops and pushes as the token does."""
        row, depth, stack = unpack(states)
        tokens = tokens.long().clamp(0, self.vocab_size - 1)
        moved = self.next[row, tokens].long()
        in_pda = (self.pda[row] & PDA_ROW) != 0
        e = self.pda_effects[torch.where(in_pda, moved, 0).clamp(min=0)]  # a Lark PDA's row: next holds effect ids
        if self.json_rows:
            j = self.effects[self._effect_ids(row, tokens)]
            pops, pushes = j[:, json_pda.POPS], j[:, json_pda.PUSHES]
            moved = pack(moved, depth - pops + pushes, ((stack >> pops) << pushes) | j[:, json_pda.PUSH_BITS])
        # A Lark PDA's row moves by its token's outcome for the top of the row's stack.
        combo = stack & ((1 << e[:, lark_pda_tables.WIDTH]) - 1)
        final = e.gather(1, (lark_pda_tables.FINAL + combo)[:, None])[:, 0]
        pops = (final >> lark_pda_tables.FINAL_POPS_SHIFT) & 63
        pushes = (final >> lark_pda_tables.FINAL_PUSHES_SHIFT) & 63
        after = pack(final & (2**lark_pda_tables.FINAL_ROW_BITS - 1), depth - pops + pushes,
                     ((stack >> pops) << pushes) | (final >> lark_pda_tables.FINAL_PUSHED_SHIFT))
        valid = ((e[:, lark_pda_tables.VALID] >> combo) & 1) == 1
        return torch.where(in_pda, torch.where(valid, after, -1), moved)


def _pda_fits(e: torch.Tensor, depth: torch.Tensor, stack: torch.Tensor, may_end: torch.Tensor) -> torch.Tensor:
    """Whether Lark PDA effects e [rows, effects, EFFECT_FIELDS] allow their token on each row's stack
    (depth in bits): its combo's bit is set, what the combo's outcome leaves can be finished within
    the stack's bits, and an end token has a stack that may end."""
    combo = stack & ((1 << e[..., lark_pda_tables.WIDTH]) - 1)
    final = e[..., lark_pda_tables.FINAL:].gather(-1, combo[..., None])[..., 0]
    need = ((final >> lark_pda_tables.FINAL_NEED_SHIFT) & 127) - lark_pda_tables.NEED_OFFSET
    return ((((e[..., lark_pda_tables.VALID] >> combo) & 1) == 1) & (depth + need <= lark_pda_tables.STACK_BITS)
            & ((e[..., lark_pda_tables.CHECKS_STACK] == 0) | may_end))


def _stack_may_end(meta: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """Per row: whether every entry of its stack (entries of meta's bits) is a return id whose caller
    may end there (at most meta's accepting ids)."""
    bits = meta & 0xFF
    shifts = bits[:, None] * torch.arange(lark_pda_tables.STACK_BITS, device=meta.device)
    entries = (stack[:, None] >> shifts.clamp(max=62)) & ((1 << bits[:, None]) - 1)
    accepting = (meta[:, None] >> PDA_IDS_SHIFT) & 0xFF
    return ((entries <= accepting) | (shifts >= lark_pda_tables.STACK_BITS)).all(dim=1)


def pack(row: torch.Tensor, depth: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """States from rows, depths and stacks (a disallowed move's row -1 stays negative)."""
    return torch.where(row < 0, row, row | (depth << DEPTH_SHIFT) | (stack << STACK_SHIFT))


def unpack(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    states = states.long()
    return (states & (2**ROW_BITS - 1), (states >> DEPTH_SHIFT) & (2**DEPTH_BITS - 1), states >> STACK_SHIFT)


class DFAConstraint:
    """One choice's place in its loaded DFA: a slot of the table, whose state lives on the device
    (masked and advanced there, per step and in decode rounds); the host only holds the slot."""

    def __init__(self, loaded: "LoadedDFA"):
        self.loaded = loaded
        self.slot = loaded.table.take_slot(loaded.first)

    def release(self) -> None:
        self.loaded.table.give_slot(self.slot)
        self.loaded.release()


class LoadedDFA:
    """A DFA loaded into the table, shared by every choice constrained by its pattern (across
    requests); unloaded when the last one is done."""

    def __init__(self, table: GrammarTable, dfa: TokenDFA, on_unload: Any = None):
        self.table, self.dfa, self.users, self._on_unload = table, dfa, 0, on_unload
        self.first = table.load(dfa)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.table.unload(self.first, self.dfa.num_states)
            if self._on_unload is not None:
                self._on_unload()


class TokenDFAs:
    """An engine's compiler of regular constraints: compiled DFAs kept by pattern (a few, most
    recent first), and loaded into its grammar table once per pattern while any choice uses it."""

    def __init__(self, table: GrammarTable, tokens: Sequence[bytes | None], eos_token_ids: Sequence[int],
                 keep: int = 16, encode: Callable[[str], list[int]] | None = None):
        self.table, self.tokens, self.eos_token_ids = table, tokens, sorted(eos_token_ids)
        self.encode = encode  # the tokenizer's: forced text kept to its canonical tokens
        self._compiled: OrderedDict[str, TokenDFA | TokenPDA | PDATables | NotRegular] = OrderedDict()  # NotRegular: why it has none
        self._loaded: dict[str, LoadedDFA] = {}
        self._keep = keep

    def compile(self, pattern: str) -> TokenDFA:
        """pattern's DFA, compiled once (and a pattern that has none refused again at once)."""
        dfa = self._compiled.get(pattern)
        if dfa is None:
            dfa = self.compile_apart(pattern)
            self.install(pattern, dfa)
        self._compiled.move_to_end(pattern)
        if isinstance(dfa, NotRegular):
            raise dfa
        return dfa

    def compiled(self, pattern: str) -> bool:
        return pattern in self._compiled

    def compile_apart(self, pattern: str | tuple) -> TokenDFA | TokenPDA | PDATables | NotRegular:
        """compile() without touching the cache (safe on another thread): the DFA, or why there is
        none. pattern JSON_OBJECT: JSON mode's pushdown automaton; a nested Lark grammar whose
        unrolled DFA is too large (several bracket types): its pushdown automaton (lark_pda.py)."""
        try:
            if pattern == JSON_OBJECT:
                if not self.table.json_rows:
                    raise NotRegular("this grammar table keeps no rows for JSON mode")
                return compile_json_pda(self.tokens, self.eos_token_ids, self.table.vocab_size, encode=self.encode)
            return compile_dfa(pattern, self.tokens, self.eos_token_ids, self.table.vocab_size, self.table.capacity - 1,
                               encode=self.encode)
        except NotRegular as exc:
            if not (isinstance(pattern, tuple) and pattern[0] == NESTED_LARK):
                return exc
            try:
                return compile_lark_pda(pattern[1], self.tokens, self.eos_token_ids, self.table.vocab_size,
                                        encode=self.encode)
            except NotRegular as not_pda:
                return NotRegular(f"{exc}; nor has it a pushdown automaton here: {not_pda}")

    def install(self, pattern: str, dfa: TokenDFA | NotRegular) -> None:
        """Keep compile_apart's result for pattern (the most recent `keep` patterns are kept)."""
        self._compiled[pattern] = dfa
        while len(self._compiled) > self._keep:
            self._compiled.popitem(last=False)

    def constraints(self, pattern: str, n: int) -> list[DFAConstraint]:
        """n choices' constraints on pattern's loaded DFA (NotRegular: it has none, or the table
        has no room for it now)."""
        loaded = self._loaded.get(pattern)
        if loaded is None:
            loaded = LoadedDFA(self.table, self.compile(pattern), lambda: self._loaded.pop(pattern, None))
            self._loaded[pattern] = loaded
        loaded.users += n
        made: list[DFAConstraint] = []
        try:
            for _ in range(n):
                made.append(DFAConstraint(loaded))
        except NotRegular:
            for c in made:
                c.loaded.table.give_slot(c.slot)
            loaded.users -= n - 1
            loaded.release()  # the last of the n: unloads it if no one else uses it
            raise
        return made
