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

LarkPDA holds the effects and is the host's reading of them (allowed / advance / complete, what
the tests compare with the character-level run); lark_pda_tables.py writes them as the device's
tables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from vibee.runtime.lark_rtn import RTN, START
from vibee.runtime.token_dfa import NotRegular

COMBO_BITS = 6  # the top entries an effect reads: its combos fit one int64 of validity bits
MAX_OWN_BITS = 60  # a token's own calls kept in one int64 by the vectorized walk (more: walked one by one)
DEAD, RETURN = -1, -2  # _char_table's entries that are not a state

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


def _reached(names: set[str], edges: dict[str, set[str]]) -> set[str]:
    """names and every name reached from them along edges."""
    reached, todo = set(names), list(names)
    while todo:
        for name in edges[todo.pop()] - reached:
            reached.add(name)
            todo.append(name)
    return reached
