"""A Lark grammar's recursive transition network (lark_rtn.py) compiled against a vocabulary into a
token pushdown automaton: for each state and token, what the token needs of the stack and what it
leaves there.

A row's stack is a word of entries of `bits` bits each, the top in the lowest bits, entry 0 meaning
"no entry" (so the bits below the stack's depth read as its bottom), return ids 1..R above it. A
token walked from a state may push return ids (its own calls) and pop them again, which the table
knows; it may also return below where it started, popping entries the row holds. What it does then
depends on those entries: so its effect is read by the top K entries of the row's stack, K * bits
<= COMBO_BITS, as one index ("combo") into its effect: whether the token is allowed with that top,
and if so the state, pops and pushes it leaves. A context that would need a deeper look does not
allow the token (a limit on tokenization, not on the language: the text stays reachable by shorter
tokens). The state after a token is the RTN's (machine, state) pair, numbered.

LarkPDA is the host's reading (allowed / advance / complete, what the tests compare with the
character-level run); its `tables` are what grammar_table.py loads onto the device: an effect id
per (state, token) and, per distinct effect, one row of EFFECT_FIELDS int64s (a validity bit per
combo, the combo's width, whether it is an end token, and per combo the row, pops and pushes it
leaves and the stack bits finishing after it needs, packed as FINAL_* say), so masking a row is a
few gathers and a bit test per token and advancing it a gather, on the device, inside decode rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vibee.runtime.lark_rtn import RTN, START, lark_rtn
from vibee.runtime.token_dfa import NotRegular

COMBO_BITS = 6  # the top entries an effect reads: its combos fit one int64 of validity bits
MAX_OWN_BITS = 60  # a token's own calls kept in one int64 by the vectorized walk (more: walked one by one)
DEAD, RETURN = -1, -2  # _char_table's entries that are not a state

# The device's effect rows (PDATables.effects): fields, then one packed outcome per combo.
VALID, WIDTH, CHECKS_STACK, FINAL = range(4)
EFFECT_FIELDS = FINAL + (1 << COMBO_BITS)
STACK_BITS = 41  # a row's stack on the device (grammar_table packs it above the row and depth, below the sign)
# An outcome as one int64: the row it leaves, the stack bits it pops and pushes, the stack bits
# above the row's depth that finishing after it needs (+ NEED_OFFSET), the pushed bits.
FINAL_ROW_BITS, FINAL_POPS_SHIFT, FINAL_PUSHES_SHIFT, FINAL_NEED_SHIFT, FINAL_PUSHED_SHIFT = 15, 15, 21, 27, 34
NEED_OFFSET = 64  # a need is -COMBO_BITS.. (pops below the start) to 63 (past STACK_BITS: never allowed)
MAX_PUSHED_BITS = 63 - FINAL_PUSHED_SHIFT


@dataclass(frozen=True)
class Outcome:
    """A token's end from a state, for one top of the stack: the state, the entries it popped below
    where it started, and the return ids it left pushed (bottom first)."""

    state: int
    pops: int
    pushes: tuple[int, ...]


@dataclass(frozen=True)
class Effect:
    """How a token reads the stack from a state: `looks` top entries, and per combo of them (top
    entry in the lowest bits) its outcome, absent where the token is not allowed."""

    looks: int
    outcomes: dict[int, Outcome]


class LarkPDA:
    """The token automaton of an RTN over a vocabulary (tokens[i]: token i's text, None for a
    special token): states (machine, DFA state) numbered from 0 (START's initial state), return ids
    1..R, `bits` bits an entry."""

    def __init__(self, rtn: RTN, tokens: Sequence[str | None]):
        self.rtn = rtn
        self.states = [(m, s) for m in rtn.names for s in sorted(rtn.machines[m].states)]
        start = (START, rtn.initial(START))
        self.states.remove(start)
        self.states.insert(0, start)
        self.number = {state: i for i, state in enumerate(self.states)}
        points: dict[tuple[str, int], set[str]] = {}  # return point -> the machines called before it
        for machine in rtn.names:
            for state in rtn.machines[machine].states:
                for callee, after in rtn.moves(machine, state)[1].items():
                    points.setdefault((machine, after), set()).add(callee)
        # A call in tail position (its return point may end and takes nothing but ignored text, which
        # the callee takes first) pushes nothing: the callee returns straight to its caller's caller.
        # So a list written `elements: value | value "," elements` keeps one entry, not one an element.
        tail = {point for point in points if self._is_tail(*point)}
        # Return points where the caller may end come first (ids 1..accepting_ids): a stack of them
        # only is one every machine on it can return from, which is when the end token is allowed.
        order = sorted(set(points) - tail, key=lambda point: (not rtn.accepting(*point), point))
        self.return_ids = {point: r for r, point in enumerate(order, start=1)}
        # The machines that may be running above entry r: its callees, and what they call in tail position.
        tail_callees = {name: set() for name in rtn.names}
        for point, callees in points.items():
            if point in tail:
                tail_callees[point[0]] |= callees
        self.callees = {self.return_ids[point]: _reached(callees, tail_callees) for point, callees in points.items()
                        if point not in tail}
        self.accepting_ids = sum(rtn.accepting(*point) for point in order)
        self.returns_to = {r: point for point, r in self.return_ids.items()}
        self.bits = max(1, len(self.return_ids).bit_length())
        self.finish = self._finish_bits()
        if self.finish[0] > STACK_BITS:
            raise NotRegular(f"its shortest sentence needs {self.finish[0]} bits of stack, more than the {STACK_BITS} a row has")
        self.max_looks = COMBO_BITS // self.bits
        if not self.max_looks:  # no token could return below where it starts: no closing bracket
            raise NotRegular(f"the grammar has {len(order)} return points, more than a token's look at the stack "
                             f"({COMBO_BITS} bits) tells apart")
        self.tokens = tokens
        self.effects: dict[tuple[int, int], Effect] = {}
        self.cut = 0  # (state, token) pairs some context of which needed a deeper look
        chars, lengths, order = self._encode(tokens)
        step, pushes = self._char_table(chars["alphabet"])
        for number, state in enumerate(self.states):
            ends, slow = self._walk_all(number, chars["codes"], lengths, step, pushes)
            for token, (end, own) in ends.items():
                self.effects[number, int(order[token])] = Effect(0, {0: Outcome(end, 0, own)})
            for token in slow:  # tokens that return below where they start: every stack top they could read
                effect = self._effect(state, tokens[int(order[token])])
                if effect is not None:
                    self.effects[number, int(order[token])] = effect

    def _finish_bits(self) -> list[int]:
        """Per state: the fewest stack bits above the row's depth that finishing its machine from
        there needs at its peak (0 where it may end; a call needs its entry's bits and its callee's
        own, then the state after it its own). A token is allowed only where what it leaves can be
        finished within the stack's bits, so no row is left with nothing to write."""
        rtn, never = self.rtn, 1 << 30
        finish = {state: 0 if rtn.accepting(*state) else never for state in self.states}
        changed = True
        while changed:
            changed = False
            for (machine, s), best in finish.items():
                local, calls = rtn.moves(machine, s)
                for to in local.values():
                    best = min(best, finish[(machine, to)])
                for callee, after in calls.items():
                    entry = self.bits if (machine, after) in self.return_ids else 0
                    best = min(best, max(entry + finish[(callee, rtn.initial(callee))], finish[(machine, after)]))
                if best < finish[(machine, s)]:
                    finish[(machine, s)] = best
                    changed = True
        return [finish[state] for state in self.states]

    def _is_tail(self, machine: str, after: int) -> bool:
        local, calls = self.rtn.moves(machine, after)
        return self.rtn.accepting(machine, after) and not calls and set(local) <= self.rtn.ignorable

    def _encode(self, tokens: Sequence[str | None]) -> tuple[dict, np.ndarray, np.ndarray]:
        """The tokens (specials and empty ones left out) longest first as rows of character codes
        into an alphabet of the characters they use; their lengths; each row's token id."""
        ids = [i for i, text in enumerate(tokens) if text]
        ids.sort(key=lambda i: -len(tokens[i]))
        alphabet = sorted({c for i in ids for c in tokens[i]})
        code = {c: j for j, c in enumerate(alphabet)}
        width = max((len(tokens[i]) for i in ids), default=1)
        codes = np.zeros((len(ids), width), dtype=np.int64)
        for row, i in enumerate(ids):
            codes[row, : len(tokens[i])] = [code[c] for c in tokens[i]]
        lengths = np.array([len(tokens[i]) for i in ids], dtype=np.int64)
        return {"alphabet": alphabet, "codes": codes}, lengths, np.array(ids, dtype=np.int64)

    def _char_table(self, alphabet: list[str]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """step[state, char]: the state the character leads to (a move, or calls then the callee's
        move: pushes[push[state, char]] the return ids it pushes), RETURN where the state returns
        on it, DEAD where nothing takes it. Returned as (step, push) stacked, and the push tuples."""
        rtn = self.rtn
        n = len(self.states)
        step = np.full((2, n, len(alphabet)), DEAD, dtype=np.int64)
        step[1] = 0
        pushes: list[tuple[int, ...]] = [()]
        index = {(): 0}
        for q, (machine, s) in enumerate(self.states):
            for j, char in enumerate(alphabet):
                at, own = (machine, s), ()
                while True:
                    local, calls = rtn.moves(*at)
                    if char in local:
                        step[0, q, j] = self.number[(at[0], local[char])]
                        step[1, q, j] = index.setdefault(own, len(pushes))
                        if step[1, q, j] == len(pushes):
                            pushes.append(own)
                        break
                    callee = next((c for c in calls if char in rtn.first[c]), None)
                    if callee is None:
                        if not own and rtn.accepting(*at) and char in rtn.follow[at[0]]:  # else no caller takes it
                            step[0, q, j] = RETURN
                        break
                    point = (at[0], calls[callee])
                    if point in self.return_ids:  # else a tail call
                        own = (*own, self.return_ids[point])
                    at = (callee, rtn.initial(callee))
        return step, pushes

    def _walk_all(self, start: int, codes: np.ndarray, lengths: np.ndarray, step: np.ndarray,
                  pushes: list[tuple[int, ...]]) -> tuple[dict[int, tuple[int, tuple[int, ...]]], list[int]]:
        """Every token (rows of codes) walked from state `start` at once, returns to its own calls
        included: {row: (end state, ids left pushed)} for tokens that end alive, and the rows that
        return below where they start (walked one by one, as they read the row's stack)."""
        bits, mask = self.bits, (1 << self.bits) - 1
        count = np.array([len(p) for p in pushes], dtype=np.int64)
        packed = np.zeros(len(pushes), dtype=np.int64)  # a push tuple's ids, the last (top) in the lowest bits
        for k, ids in enumerate(pushes):
            for r in ids:
                packed[k] = (packed[k] << bits) | r
        back = np.zeros(len(self.return_ids) + 1, dtype=np.int64)
        for r, point in self.returns_to.items():
            back[r] = self.number[point]
        rows = len(codes)
        cur = np.full(rows, start, dtype=np.int64)
        own = np.zeros(rows, dtype=np.int64)
        depth = np.zeros(rows, dtype=np.int64)
        slow = np.zeros(rows, dtype=bool)
        for pos in range(codes.shape[1]):
            todo = np.flatnonzero((lengths > pos) & (cur >= 0) & ~slow)
            while len(todo):
                c = codes[todo, pos]
                to, push = step[0, cur[todo], c], step[1, cur[todo], c]
                moved = to >= 0
                m = todo[moved]
                k = push[moved]
                own[m] = (own[m] << (count[k] * bits)) | packed[k]
                depth[m] += count[k]
                cur[m] = to[moved]
                slow[m[depth[m] * bits > MAX_OWN_BITS]] = True  # too many own calls to keep in a word
                cur[todo[to == DEAD]] = -1
                back_rows = todo[to == RETURN]
                below = back_rows[depth[back_rows] == 0]
                slow[below] = True
                mine = back_rows[depth[back_rows] > 0]
                cur[mine] = back[own[mine] & mask]
                own[mine] >>= bits
                depth[mine] -= 1
                todo = mine  # the returned rows take the same character again
        ends = {}
        for row in np.flatnonzero((cur >= 0) & ~slow):
            ids, word = [], int(own[row])
            for _ in range(int(depth[row])):
                ids.append(word & mask)
                word >>= bits
            ends[int(row)] = (int(cur[row]), tuple(reversed(ids)))
        return ends, [int(r) for r in np.flatnonzero(slow)]

    def _effect(self, state: tuple[str, int], text: str) -> Effect | None:
        ends = self._walk(state, text)
        deep = [e for e in ends if len(e[0]) > self.max_looks]
        if deep:
            self.cut += 1
            ends = [e for e in ends if len(e[0]) <= self.max_looks]
        if not ends:
            return None
        looks = max(len(popped) for popped, _, _ in ends)
        mask = (1 << self.bits) - 1
        outcomes = {}
        for combo in range(1 << (looks * self.bits)):
            tops = tuple((combo >> (j * self.bits)) & mask for j in range(looks))
            hits = [(popped, end, own) for popped, end, own in ends if popped == tops[:len(popped)]]
            if len(hits) > 1:  # the conflict check rules this out: a grammar's run is greedy
                raise AssertionError(f"two ends of {text!r} from {state} on the stack top {tops}")
            if hits:
                popped, end, own = hits[0]
                outcomes[combo] = Outcome(self.number[end], len(popped), own)
        return Effect(looks, outcomes)

    def _walk(self, state: tuple[str, int], text: str) -> list[tuple[tuple[int, ...], tuple[str, int], tuple[int, ...]]]:
        """Every end of text run from state on any stack: (return ids popped below the start, top
        first; the end state; the ids the token left pushed), one per stack top it can run on."""
        rtn, ends = self.rtn, []

        def run(i: int, at: tuple[str, int], own: tuple[int, ...], popped: tuple[int, ...]) -> None:
            while i < len(text):
                char = text[i]
                machine, s = at
                local, calls = rtn.moves(machine, s)
                if char in local:
                    at, i = (machine, local[char]), i + 1
                    continue
                callee = next((c for c in calls if char in rtn.first[c]), None)
                if callee is not None:
                    if (machine, calls[callee]) in self.return_ids:  # else a tail call
                        own = (*own, self.return_ids[(machine, calls[callee])])
                    at = (callee, rtn.initial(callee))
                    continue
                if not rtn.accepting(machine, s) or char not in rtn.follow[machine]:
                    return
                if own:  # returning from a call the token made
                    at, own = self.returns_to[own[-1]], own[:-1]
                    continue
                if len(popped) > self.max_looks:  # deeper than any effect looks: one end says so
                    ends.append(((*popped, 0), at, own))
                    return
                for r, callees in self.callees.items():  # below the start: each entry whose callee reaches this machine
                    if machine in callees:
                        run(i, self.returns_to[r], own, (*popped, r))
                return
            ends.append((popped, at, own))

        run(0, state, (), ())
        return ends

    def keep_canonical_forced_text(self, encode: Callable[[str], list[int]]) -> int:
        """Where a machine's next characters are forced (one character leads on: no call, no other
        move, not a state that may end or return) and the tokenizer writes them as two tokens or
        more, allow only the first of those, as token_dfa does for a DFA: the model reads the
        tokens it was trained on (a key of a Lark grammar, spelled one way). A tokenization that
        does not spell the text back leaves the state as it is. Returns the states restricted."""
        restricted = 0
        keys: dict[int, list[tuple[int, int]]] = {}
        for key in self.effects:
            keys.setdefault(key[0], []).append(key)
        for number, (machine, state) in enumerate(self.states):
            text, at, seen = "", state, set()
            while at not in seen and not self.rtn.accepting(machine, at):
                seen.add(at)
                local, calls = self.rtn.moves(machine, at)
                if calls or len(local) != 1:
                    break
                (char, at), = local.items()
                text += char
            if len(text) < 2:
                continue
            ids = encode(text)
            if (len(ids) < 2 or any(i >= len(self.tokens) or not self.tokens[i] for i in ids)
                    or "".join(self.tokens[i] for i in ids) != text or (number, ids[0]) not in self.effects):
                continue
            for key in keys[number]:
                if key[1] != ids[0]:
                    del self.effects[key]
            restricted += 1
        return restricted

    # ---- the device's tables ------------------------------------------------------------------

    def tables(self, eos_token_ids: Sequence[int], vocab_size: int) -> PDATables:
        """The effect id of every (state, token) and the distinct effects, for the device. A state
        past the RTN's, the sink, is where an end token leads: it allows end tokens only. Outcomes
        that push more than MAX_PUSHED_BITS are left out (counted in `cut`, as deep looks are)."""
        b = self.bits
        sink = len(self.states)
        effect = np.zeros((sink + 1, vocab_size), dtype=np.int32)
        rows: list[np.ndarray] = []
        ids: dict[tuple, int] = {}

        def effect_id(key: tuple, width: int, outcomes: dict[int, tuple[int, int, tuple[int, ...]]], checks: int) -> int:
            if key not in ids:
                row = np.zeros(EFFECT_FIELDS, dtype=np.int64)
                valid = 0
                for combo, (state, pops, pushes) in outcomes.items():
                    pushed = 0
                    for r in pushes:
                        pushed = (pushed << b) | r
                    need = min(self._need(state, pops, pushes), 127 - NEED_OFFSET) + NEED_OFFSET
                    row[FINAL + combo] = (state | pops * b << FINAL_POPS_SHIFT | len(pushes) * b << FINAL_PUSHES_SHIFT
                                          | need << FINAL_NEED_SHIFT | pushed << FINAL_PUSHED_SHIFT)
                    valid |= 1 << combo
                row[VALID] = valid - (1 << 64 if valid >> 63 else 0)  # combo 63 is the sign bit
                row[WIDTH], row[CHECKS_STACK] = width, checks
                rows.append(row)
                ids[key] = len(rows)  # 1..E: 0 is "not allowed"
            return ids[key]

        for (state, token), e in self.effects.items():
            outcomes = {combo: (o.state, o.pops, o.pushes) for combo, o in e.outcomes.items()
                        if len(o.pushes) * b <= MAX_PUSHED_BITS}
            self.cut += len(outcomes) < len(e.outcomes)
            if outcomes:
                key = (e.looks, tuple(sorted(outcomes.items())))
                effect[state, token] = effect_id(key, e.looks * b, outcomes, 0)
        # An end token: where the state may end and every return point on the stack may too.
        end = effect_id(("end",), 0, {0: (sink, 0, ())}, 1)
        eos = [t for t in eos_token_ids if t < vocab_size]
        for number, state in enumerate(self.states):
            if self.rtn.accepting(*state):
                effect[number, eos] = end
        effect[sink, eos] = end
        return PDATables(effect, np.stack(rows), b, self.accepting_ids)

    def _need(self, state: int, pops: int, pushes: tuple[int, ...]) -> int:
        """The most stack bits above the row's depth before a token that finishing after it needs:
        the end state's machine at the depth it leaves, then each machine the token's entries return
        to, each at its entry's height (entries below were checked when they were pushed)."""
        if state == len(self.states):  # the sink after an end token
            return 0
        b, base = self.bits, -pops * self.bits
        need = base + len(pushes) * b + self.finish[state]
        for height, r in enumerate(pushes):
            need = max(need, base + height * b + self.finish[self.number[self.returns_to[r]]])
        return need

    # ---- the host's reading of the tables -----------------------------------------------------

    def start(self) -> tuple[int, int, int]:
        """(state, stack, depth) before any token."""
        return 0, 0, 0

    def advance(self, state: int, stack: int, depth: int, token: int) -> tuple[int, int, int] | None:
        """The row after token (None: the token is not allowed there)."""
        effect = self.effects.get((state, token))
        if effect is None:
            return None
        combo = stack & ((1 << (effect.looks * self.bits)) - 1)
        outcome = effect.outcomes.get(combo)
        if outcome is None:
            return None
        stack >>= outcome.pops * self.bits
        for r in outcome.pushes:
            stack = (stack << self.bits) | r
        return outcome.state, stack, depth - outcome.pops + len(outcome.pushes)

    def allowed(self, state: int, stack: int, depth: int) -> list[int]:
        return [t for t in range(len(self.tokens)) if self.advance(state, stack, depth, t) is not None]

    def complete(self, state: int, stack: int, depth: int) -> bool:
        """Whether the text so far is a whole sentence: every machine on the stack can return."""
        machine, s = self.states[state]
        mask = (1 << self.bits) - 1
        for _ in range(depth + 1):
            if not self.rtn.accepting(machine, s):
                return False
            machine, s = self.returns_to.get(stack & mask, (START, -1))
            stack >>= self.bits
        return machine == START


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
    character level, or has a rule that never ends. A token that is not whole UTF-8 text is never
    allowed. With `encode` (text -> the tokenizer's ids), forced text keeps to its canonical tokens."""
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
    return pda.tables(eos_token_ids, vocab_size)


def _reached(names: set[str], edges: dict[str, set[str]]) -> set[str]:
    """names and every name reached from them along edges."""
    reached, todo = set(names), list(names)
    while todo:
        for name in edges[todo.pop()] - reached:
            reached.add(name)
            todo.append(name)
    return reached


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
