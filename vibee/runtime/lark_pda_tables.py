"""A Lark grammar's token pushdown automaton (lark_pda.py) on the device's terms: the tables
grammar_table.py loads and token_mask_kernel.py reads.

For each (state, token) an effect id, and per distinct effect one row of EFFECT_FIELDS int64s: a
validity bit per combo of the stack's top entries, the combo's width, whether it is an end token,
and per combo one packed outcome (FINAL_*): the row it leaves, the stack bits it pops and pushes,
the pushed bits, and the stack bits finishing after it needs. Masking a row is a few gathers and
a bit test per token, advancing it a gather, on the device, inside decode rounds.

A row's stack has STACK_BITS. A token is allowed only where what it leaves can still be finished
within them: per state, `finish_bits` is the fewest bits above the row's depth that finishing its
machine needs at its peak, and an outcome's need is its end state's at the depth it leaves, then
each entry it pushed at that entry's height. So no row is ever left with nothing to write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vibee.runtime.lark_pda import COMBO_BITS, LarkPDA
from vibee.runtime.lark_rtn import RTN, lark_rtn
from vibee.runtime.token_dfa import NotRegular

# The effect rows: fields, then one packed outcome per combo.
VALID, WIDTH, CHECKS_STACK, FINAL = range(4)
EFFECT_FIELDS = FINAL + (1 << COMBO_BITS)
STACK_BITS = 41  # a row's stack on the device (grammar_table packs it above the row and depth, below the sign)
# An outcome as one int64: the row it leaves, the stack bits it pops and pushes, the stack bits
# above the row's depth that finishing after it needs (+ NEED_OFFSET), the pushed bits.
FINAL_ROW_BITS, FINAL_POPS_SHIFT, FINAL_PUSHES_SHIFT, FINAL_NEED_SHIFT, FINAL_PUSHED_SHIFT = 15, 15, 21, 27, 34
NEED_OFFSET = 64  # a need is -COMBO_BITS.. (pops below the start) to 63 (past STACK_BITS: never allowed)
MAX_PUSHED_BITS = 63 - FINAL_PUSHED_SHIFT


@dataclass(frozen=True)
class PDATables:
    """A LarkPDA on the device's terms: effect [states, vocab] (int32: 1 + a row of effects, 0 where
    the token is not allowed), effects [E, EFFECT_FIELDS] (outcomes' rows count from the PDA's state
    0), entry bits, and the return ids 1..accepting_ids whose callers may end there."""

    effect: np.ndarray
    effects: np.ndarray
    bits: int
    accepting_ids: int

    @property
    def num_states(self) -> int:
        return self.effect.shape[0]


def compile_lark_pda(text: str, tokens: Sequence[bytes | None], eos_token_ids: Sequence[int],
                     vocab_size: int, encode: Callable[[str], list[int]] | None = None) -> PDATables:
    """The device tables of Lark grammar `text` over a vocabulary (tokens[i]: token i's bytes, None
    for a special token); NotRegular where the grammar has no RTN here, is not LL(1) at the
    character level, has a rule that never ends, or needs more stack than a row has. A token that
    is not whole UTF-8 text is never allowed. With `encode` (text -> the tokenizer's ids), forced
    text keeps to its canonical tokens."""
    if not eos_token_ids:
        raise NotRegular("the model has no end-of-sequence token")
    rtn = lark_rtn(text)
    if rtn is None:
        raise NotRegular("the grammar has no recursive transition network here (a construct the device can't take)")
    conflicts = rtn.conflicts()
    if conflicts:
        raise NotRegular(f"the grammar is not LL(1) at the character level: {conflicts[0]}")
    endless = _endless(rtn)
    if endless:
        raise NotRegular(f"rule {endless[0]} never ends (every way through it calls it again)")
    texts: list[str | None] = []
    for b in tokens:
        try:
            texts.append(b.decode("utf-8") if b else None)
        except UnicodeDecodeError:  # a piece of a character
            texts.append(None)
    pda = LarkPDA(rtn, texts)
    if encode is not None:
        pda.keep_canonical_forced_text(encode)
    return device_tables(pda, eos_token_ids, vocab_size)


def device_tables(pda: LarkPDA, eos_token_ids: Sequence[int], vocab_size: int) -> PDATables:
    """The effect id of every (state, token) and the distinct effects. A state past the RTN's, the
    sink, is where an end token leads: it allows end tokens only. Outcomes that push more than
    MAX_PUSHED_BITS are left out (counted in pda.cut, as deep looks are)."""
    finish = finish_bits(pda)
    if finish[0] > STACK_BITS:
        raise NotRegular(f"its shortest sentence needs {finish[0]} bits of stack, more than the {STACK_BITS} a row has")
    b = pda.bits
    sink = len(pda.states)
    effect = np.zeros((sink + 1, vocab_size), dtype=np.int32)
    rows: list[np.ndarray] = []
    ids: dict[tuple, int] = {}

    def need_of(state: int, pops: int, pushes: tuple[int, ...]) -> int:
        """The most stack bits above the row's depth before the token that finishing after it needs."""
        if state == sink:
            return 0
        base = -pops * b
        need = base + len(pushes) * b + finish[state]
        for height, r in enumerate(pushes):  # each entry it pushed, at its height (those below were checked)
            need = max(need, base + height * b + finish[pda.number[pda.returns_to[r]]])
        return need

    def effect_id(key: tuple, width: int, outcomes: dict[int, tuple[int, int, tuple[int, ...]]], checks: int) -> int:
        if key not in ids:
            row = np.zeros(EFFECT_FIELDS, dtype=np.int64)
            valid = 0
            for combo, (state, pops, pushes) in outcomes.items():
                pushed = 0
                for r in pushes:
                    pushed = (pushed << b) | r
                need = min(need_of(state, pops, pushes), 127 - NEED_OFFSET) + NEED_OFFSET
                row[FINAL + combo] = (state | pops * b << FINAL_POPS_SHIFT | len(pushes) * b << FINAL_PUSHES_SHIFT
                                      | need << FINAL_NEED_SHIFT | pushed << FINAL_PUSHED_SHIFT)
                valid |= 1 << combo
            row[VALID] = valid - (1 << 64 if valid >> 63 else 0)  # combo 63 is the sign bit
            row[WIDTH], row[CHECKS_STACK] = width, checks
            rows.append(row)
            ids[key] = len(rows)  # 1..E: 0 is "not allowed"
        return ids[key]

    for (state, token), e in pda.effects.items():
        outcomes = {combo: (o.state, o.pops, o.pushes) for combo, o in e.outcomes.items()
                    if len(o.pushes) * b <= MAX_PUSHED_BITS}
        pda.cut += len(outcomes) < len(e.outcomes)
        if outcomes:
            key = (e.looks, tuple(sorted(outcomes.items())))
            effect[state, token] = effect_id(key, e.looks * b, outcomes, 0)
    # An end token: where the state may end and every return point on the stack may too.
    end = effect_id(("end",), 0, {0: (sink, 0, ())}, 1)
    eos = [t for t in eos_token_ids if t < vocab_size]
    for number, state in enumerate(pda.states):
        if pda.rtn.accepting(*state):
            effect[number, eos] = end
    effect[sink, eos] = end
    return PDATables(effect, np.stack(rows), b, pda.accepting_ids)


def finish_bits(pda: LarkPDA) -> list[int]:
    """Per state: the fewest stack bits above the row's depth that finishing its machine from there
    needs at its peak (0 where it may end; a call needs its entry's bits, none in tail position,
    and its callee's own, then the state after it its own): a fixed point over the states."""
    rtn, never = pda.rtn, 1 << 30
    finish = {state: 0 if rtn.accepting(*state) else never for state in pda.states}
    changed = True
    while changed:
        changed = False
        for (machine, s), best in finish.items():
            local, calls = rtn.moves(machine, s)
            for to in local.values():
                best = min(best, finish[(machine, to)])
            for callee, after in calls.items():
                entry = pda.bits if (machine, after) in pda.return_ids else 0
                best = min(best, max(entry + finish[(callee, rtn.initial(callee))], finish[(machine, after)]))
            if best < finish[(machine, s)]:
                finish[(machine, s)] = best
                changed = True
    return [finish[state] for state in pda.states]


def _endless(rtn: RTN) -> list[str]:
    """The machines that can't reach an accepting state (calls count as moves once their callee can)."""
    ends: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name in rtn.names:
            if name in ends:
                continue
            seen, todo = set(), [rtn.initial(name)]
            while todo:
                state = todo.pop()
                if state in seen:
                    continue
                seen.add(state)
                if rtn.accepting(name, state):
                    ends.add(name)
                    changed = True
                    break
                local, calls = rtn.moves(name, state)
                todo.extend(local.values())
                todo.extend(after for callee, after in calls.items() if callee in ends)
    return [name for name in rtn.names if name not in ends]
