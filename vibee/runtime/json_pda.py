"""JSON mode on the device: OpenAI's `json_object` (any JSON object, nested to any depth up to
MAX_DEPTH) compiled against the vocabulary into a token-level pushdown automaton.

JSON is not regular (brackets nest), so a token DFA alone cannot hold it; but its only
non-regular part is the stack of open containers, each an object or an array. The automaton here
is a byte-level DFA whose states do not depend on that stack, plus, for each (state, token), the
token's effect on the stack: the types it needs at the top positions of the stack as the token
starts (a `}` needs an object there, a `,` any open container, a key after `,` an object), how
many entries it pops and what it pushes. A row's stack is a word of bits (1: object, 0: array,
bit p the entry p below the top) and a depth, packed with its table row into the one int64
state the grammar table keeps per row (grammar_table.py), so masking and advancing stay one
gather per token and run on the device inside decode rounds, as token DFAs do.

The language is llguidance's for `{"type": "object"}` without flexible whitespace (what the host
path constrains, and what the tests compare against step by step): compact separators, strings
of any character but `"`, `\\`, controls and DEL, escapes `\\" \\\\ \\b \\f \\n \\r \\t` and
`\\u00XX` for the controls and DEL, numbers as JSON writes them, `true`, `false`, `null`.
Tokens are walked byte by byte, so pieces of a UTF-8 character are allowed where the character is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MAX_DEPTH = 40  # stack bits kept in a row's state (grammar_table packs them above the row and depth)
MAX_SPAN = 31  # stack positions one token may touch (its requirements and pushes are int32 bit sets)

# Actions on the stack a byte can take, at the current level (the innermost open container).
NONE, PUSH_O, PUSH_A, POP_O, POP_A, NEED_OPEN, NEED_O, NEED_A = range(8)

# Effect fields (one row of `effects` per distinct effect; effect 0 changes and needs nothing).
POPS, PUSHES, PUSH_BITS, NEED_O_BITS, NEED_A_BITS, MIN_DEPTH, MAX_DEPTH_BEFORE, EXACT_DEPTH = range(8)
EFFECT_FIELDS = 8


class _States:
    """The byte-level DFA: named states, step[state, byte] -> (next state or -1, action)."""

    def __init__(self):
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self.index:
            self.index[name] = len(self.names)
            self.names.append(name)
        return self.index[name]


def _build() -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    s = _States()
    start, obj_open, arr_open, value, after_key, after_value, after_comma, after_either = (
        s(n) for n in ("start", "obj_open", "arr_open", "value", "after_key", "after_value", "after_comma",
                       "after_string_after_comma"))
    moves: list[tuple[int, bytes, int, int]] = []  # (state, bytes, next, action)

    def on(state: int, chars: bytes | range, to: int, action: int = NONE) -> None:
        moves.append((state, bytes(chars), to, action))

    digits, digits19 = b"0123456789", b"123456789"

    def string(family: str, close_to: int) -> int:
        """A string's body (its opening quote read), closing to `close_to`."""
        body, esc = s(family), s(family + ".escape")
        on(body, b'"', close_to)
        on(body, b"\\", esc)
        on(body, bytes(b for b in range(0x20, 0x7F) if b not in b'"\\'), body)
        on(esc, b'"\\bfnrt', body)
        # \u00XX for the controls and DEL only (the characters that may not be written as themselves).
        u = [s(f"{family}.u{i}") for i in range(4)] + [s(f"{family}.u7")]
        on(esc, b"u", u[0])
        on(u[0], b"0", u[1])
        on(u[1], b"0", u[2])
        on(u[2], b"01", u[3])
        on(u[3], b"0123456789abcdefABCDEF", body)
        on(u[2], b"7", u[4])
        on(u[4], b"fF", body)
        # UTF-8 past ASCII, as its standard DFA checks it (no overlongs, no surrogates, <= U+10FFFF).
        need1, need2, need3 = (s(f"{family}.utf8.{i}") for i in (1, 2, 3))
        e0, ed, f0, f4 = (s(f"{family}.utf8.{n}") for n in ("e0", "ed", "f0", "f4"))
        on(body, range(0xC2, 0xE0), need1)
        on(body, b"\xe0", e0)
        on(body, bytes([*range(0xE1, 0xED), 0xEE, 0xEF]), need2)
        on(body, b"\xed", ed)
        on(body, b"\xf0", f0)
        on(body, range(0xF1, 0xF4), need3)
        on(body, b"\xf4", f4)
        on(need1, range(0x80, 0xC0), body)
        on(need2, range(0x80, 0xC0), need1)
        on(need3, range(0x80, 0xC0), need2)
        on(e0, range(0xA0, 0xC0), need1)
        on(ed, range(0x80, 0xA0), need1)
        on(f0, range(0x90, 0xC0), need2)
        on(f4, range(0x80, 0x90), need2)
        return body

    key = string("key", after_key)
    vstring = string("string", after_value)
    either = string("string_after_comma", after_either)  # a key in an object, a value in an array

    def closes(state: int) -> None:
        """What follows a whole value in a container: `,` or its own closing bracket."""
        on(state, b",", after_comma, NEED_OPEN)
        on(state, b"}", after_value, POP_O)
        on(state, b"]", after_value, POP_A)

    def literal(word: bytes) -> int:
        first = s(f"lit.{word.decode()}.1")
        at = first
        for i, c in enumerate(word[1:], start=2):
            nxt = after_value if i == len(word) else s(f"lit.{word.decode()}.{i}")
            on(at, bytes([c]), nxt)
            at = nxt
        return first

    minus, zero, integer, frac0, frac, exp0, exp_sign, exp = (
        s(f"num.{n}") for n in ("minus", "zero", "int", "frac0", "frac", "exp0", "exp_sign", "exp"))
    true, false, null = literal(b"true"), literal(b"false"), literal(b"null")

    def value_start(state: int) -> None:
        on(state, b"{", obj_open, PUSH_O)
        on(state, b"[", arr_open, PUSH_A)
        on(state, b'"', vstring)
        on(state, b"-", minus)
        on(state, b"0", zero)
        on(state, digits19, integer)
        on(state, b"t", true)
        on(state, b"f", false)
        on(state, b"n", null)

    on(start, b"{", obj_open, PUSH_O)  # json_object: the root is an object
    on(obj_open, b'"', key)
    on(obj_open, b"}", after_value, POP_O)
    on(after_key, b":", value)
    value_start(value)
    value_start(arr_open)
    on(arr_open, b"]", after_value, POP_A)
    closes(after_value)
    # After `,`: a key if the container is an object, a value if an array; a string could be
    # either until what follows it says (`:` a key, `,` or `]` an array's value).
    on(after_comma, b'"', either)
    for c, to in ((b"{", obj_open), (b"[", arr_open), (b"-", minus), (b"0", zero), (b"t", true), (b"f", false),
                  (b"n", null)):
        on(after_comma, c, to, NEED_A)
    on(after_comma, digits19, integer, NEED_A)
    on(after_either, b":", value, NEED_O)
    on(after_either, b",", after_comma, NEED_A)
    on(after_either, b"]", after_value, POP_A)
    on(minus, b"0", zero)
    on(minus, digits19, integer)
    for state in (zero, integer, frac, exp):
        closes(state)
    on(integer, digits, integer)
    for state in (zero, integer):
        on(state, b".", frac0)
    for state in (zero, integer, frac):
        on(state, b"eE", exp0)
    on(frac0, digits, frac)
    on(frac, digits, frac)
    on(exp0, b"+-", exp_sign)
    on(exp0, digits, exp)
    on(exp_sign, digits, exp)
    on(exp, digits, exp)

    n = len(s.names)
    step = np.full((n, 256), -1, dtype=np.int32)
    action = np.zeros((n, 256), dtype=np.int8)
    for state, chars, to, act in moves:
        for b in chars:
            if step[state, b] != -1:
                raise AssertionError(f"{s.names[state]} has two moves on byte {b}")
            step[state, b], action[state, b] = to, act
    return step, action, s.index


STEP, ACTION, INDEX = _build()
# after_comma's `{` and `[` need an array (their action, NEED_A) and then push: a second action.
PUSH_AFTER = np.zeros_like(ACTION)
PUSH_AFTER[INDEX["after_comma"], ord("{")], PUSH_AFTER[INDEX["after_comma"], ord("[")] = PUSH_O, PUSH_A
NUM_STATES = STEP.shape[0] + 1  # and the end sink
AFTER_VALUE = INDEX["after_value"]
# Literals' forced rest after i letters (llguidance keeps forced text to its canonical tokens; so do we).
FORCED = {INDEX[f"lit.{w}.{i}"]: w[i:] for w in ("true", "false", "null") for i in range(1, len(w))}


@dataclass(frozen=True)
class TokenPDA:
    """States 0..S-1 (0 the start, S-1 the end sink): next[s, t] the state token t leads to (-1:
    never allowed from s), effect[s, t] its stack effect (a row of effects; 0: none)."""

    next: np.ndarray  # int32 [S, V]
    effect: np.ndarray  # int32 [S, V]
    effects: np.ndarray  # int64 [E, EFFECT_FIELDS]

    @property
    def num_states(self) -> int:
        return self.next.shape[0]

    def allowed(self, state: int, depth: int, stack: int) -> np.ndarray:
        """The tokens allowed from `state` with this stack (the host's reading of the mask)."""
        ok = self.next[state] >= 0
        e = self.effects[self.effect[state]]
        ok &= effect_allows(e, depth, stack)
        return np.flatnonzero(ok)

    def advance(self, state: int, depth: int, stack: int, token: int) -> tuple[int, int, int]:
        e = self.effects[self.effect[state, token]]
        return (int(self.next[state, token]), depth - int(e[POPS]) + int(e[PUSHES]),
                ((stack >> int(e[POPS])) << int(e[PUSHES])) | int(e[PUSH_BITS]))


def effect_allows(e: np.ndarray, depth, stack):
    """Whether effects e (rows of `effects`, any leading shape) allow a row of this depth and
    stack: every needed type where it is needed, enough entries, no more than MAX_DEPTH after."""
    f = lambda k: e[..., k]  # noqa: E731
    return ((depth >= f(MIN_DEPTH)) & ((stack & f(NEED_O_BITS)) == f(NEED_O_BITS)) & ((stack & f(NEED_A_BITS)) == 0)
            & (depth <= f(MAX_DEPTH_BEFORE)) & ((f(EXACT_DEPTH) < 0) | (depth == f(EXACT_DEPTH))))


def _walk(start: int, data: np.ndarray, lengths: np.ndarray, longer: list[int]) -> dict[str, np.ndarray]:
    """Every token (rows of data, longest first) walked from `start`: its end state (-1 dead) and
    the stack effect it accumulated."""
    v = data.shape[0]
    z = lambda: np.zeros(v, dtype=np.int64)  # noqa: E731
    st = np.where(lengths > 0, start, -1).astype(np.int64)
    pops, pushes, bits, need_o, need_a, min_depth = z(), z(), z(), z(), z(), z()
    for pos, n in enumerate(longer):
        live = np.flatnonzero(st[:n] >= 0)
        if not len(live):
            break
        byte = data[live, pos]
        cur = st[live]
        to, act = STEP[cur, byte].astype(np.int64), ACTION[cur, byte]
        second = PUSH_AFTER[cur, byte]
        for a in (act, second):
            present = np.flatnonzero(np.bincount(a, minlength=8)[1:]) + 1  # most bytes take no action
            if len(present):
                _apply(a, present, live, pops, pushes, bits, need_o, need_a, min_depth, to)
        st[live] = to
    dead = (pops > MAX_SPAN) | (pushes > MAX_SPAN) | (min_depth > MAX_SPAN)
    st[dead] = -1
    return {"next": st, "pops": pops, "pushes": pushes, "bits": bits, "need_o": need_o, "need_a": need_a,
            "min_depth": min_depth}


def _apply(act, present, live, pops, pushes, bits, need_o, need_a, min_depth, to) -> None:
    """One byte's stack action for the live tokens, at the current level: the token's own top
    push when it has pushed (known type), else the entry `pops` below the row's top (a need).
    present: the actions that occur in act."""
    for kind in (PUSH_O, PUSH_A):
        if kind not in present:
            continue
        sel = live[act == kind]
        bits[sel] = (bits[sel] << 1) | (1 if kind == PUSH_O else 0)
        pushes[sel] += 1
    for kind, want in ((POP_O, 1), (POP_A, 0), (NEED_O, 1), (NEED_A, 0), (NEED_OPEN, -1)):
        if kind not in present:
            continue
        at = act == kind
        sel = live[at]
        if not len(sel):
            continue
        own = pushes[sel] > 0
        mine, theirs = sel[own], sel[~own]
        if want >= 0:  # the token's own entry: its type is known here
            wrong = (bits[mine] & 1) != want
            to[np.flatnonzero(at)[own][wrong]] = -1
        p = np.minimum(pops[theirs], 62)
        if want == 1:
            clash = (need_a[theirs] >> p) & 1 == 1
            need_o[theirs] |= 1 << p
        elif want == 0:
            clash = (need_o[theirs] >> p) & 1 == 1
            need_a[theirs] |= 1 << p
        else:
            clash = np.zeros(len(theirs), dtype=bool)
        to[np.flatnonzero(at)[~own][clash]] = -1
        min_depth[theirs] = np.maximum(min_depth[theirs], p + 1)
        if kind in (POP_O, POP_A):
            bits[mine] >>= 1
            pushes[mine] -= 1
            pops[theirs] += 1


def compile_json_pda(tokens: Sequence[bytes | None], eos_token_ids: Sequence[int], vocab_size: int,
                     encode: Callable[[str], list[int]] | None = None) -> TokenPDA:
    """json_object's token automaton over a vocabulary whose token i is tokens[i] (None: special)."""
    eos = sorted(eos_token_ids)
    v = len(tokens)
    lengths = np.array([len(b) if b and i not in eos else 0 for i, b in enumerate(tokens)], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    width = int(lengths.max(initial=1)) or 1
    data = np.zeros((v, width), dtype=np.int64)
    for row, i in enumerate(order):
        if lengths[i]:
            data[row, : lengths[i]] = np.frombuffer(tokens[i], dtype=np.uint8)
    sorted_lengths = lengths[order]
    longer = [int(np.count_nonzero(sorted_lengths > p)) for p in range(width)]
    n = STEP.shape[0]
    sink = n
    nxt = np.full((n + 1, vocab_size), -1, dtype=np.int32)
    effect = np.zeros((n + 1, vocab_size), dtype=np.int32)
    identity = (0, 0, 0, 0, 0, 0, MAX_DEPTH, -1)
    ids: dict[tuple[int, ...], int] = {identity: 0}
    walks = []
    for state in range(n):
        w = _walk(state, data, sorted_lengths, longer)
        nxt[state, order] = w["next"]
        walks.append(w)
    if encode is not None:
        _canonical_literals(nxt, tokens, encode)
    for state, w in enumerate(walks):
        f = np.zeros((vocab_size, EFFECT_FIELDS), dtype=np.int64)
        f[:, MAX_DEPTH_BEFORE], f[:, EXACT_DEPTH] = MAX_DEPTH, -1
        rows = f[order]
        rows[:, POPS], rows[:, PUSHES], rows[:, PUSH_BITS] = w["pops"], w["pushes"], w["bits"]
        rows[:, NEED_O_BITS], rows[:, NEED_A_BITS], rows[:, MIN_DEPTH] = w["need_o"], w["need_a"], w["min_depth"]
        rows[:, MAX_DEPTH_BEFORE] = MAX_DEPTH + w["pops"] - w["pushes"]
        f[order] = rows
        if state == AFTER_VALUE:  # end tokens: after a whole value with no container open
            nxt[state, eos] = sink
            f[eos] = identity
            f[eos, EXACT_DEPTH] = 0
        f[nxt[state] < 0] = identity  # a token never allowed here has no effect to keep
        changes = np.flatnonzero((f != np.array(identity)).any(axis=1))  # the few tokens that touch the stack
        if len(changes):
            unique, inverse = np.unique(f[changes], axis=0, return_inverse=True)
            numbers = np.array([ids.setdefault(tuple(int(x) for x in row), len(ids)) for row in unique], dtype=np.int32)
            effect[state, changes] = numbers[inverse.reshape(-1)]
    nxt[sink, eos] = sink
    effects = np.array(list(ids), dtype=np.int64)
    return TokenPDA(nxt, effect, effects)


def _canonical_literals(nxt: np.ndarray, tokens: Sequence[bytes | None], encode: Callable[[str], list[int]]) -> None:
    """In a literal's forced rest (`rue` of true, ...), only the first of the tokens the tokenizer
    writes it with (llguidance's masks allow just that one, even where the rest is one token and
    a longer token would run on into what follows)."""
    for state, text in FORCED.items():
        ids = encode(text)
        if not ids or any(i >= len(tokens) or tokens[i] is None for i in ids) \
                or b"".join(tokens[i] for i in ids) != text.encode() or nxt[state, ids[0]] < 0:
            continue
        keep = nxt[state, ids[0]]
        nxt[state] = -1
        nxt[state, ids[0]] = keep
