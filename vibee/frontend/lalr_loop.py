"""The LALR loop for texts without syntax errors: Lark's parse table and callbacks driven by a
tighter loop than Lark's own (reduce actions are looked up once per grammar, not per token).
A syntax error raises Lark's UnexpectedToken; recovery.py then parses the text again."""

from __future__ import annotations

from lark import Lark, Token
from lark.exceptions import UnexpectedToken
from lark.lexer import LexerThread
from lark.parsers.lalr_analysis import Shift


class _Position:
    """What the contextual lexer asks the parser: the current state (the top of the stack)."""

    __slots__ = ("stack",)

    def __init__(self, stack: list[int]):
        self.stack = stack

    @property
    def position(self) -> int:
        return self.stack[-1]


class LALRLoop:
    def __init__(self, lark: Lark):
        frontend = lark.parser
        table = frontend.parser.parser.parse_table
        callbacks = frontend.parser.parser.callbacks
        self.lexer = frontend.lexer  # the contextual lexer behind the post-lexer
        self.start = table.start_states["start"]
        self.end = table.end_states["start"]
        # state -> token type -> (next state, None) for a shift, or (rule size, rule name, callback).
        self.actions: dict[int, dict[str, tuple]] = {
            state: {kind: ((arg, None, None) if action is Shift else
                           (len(arg.expansion), arg.origin.name, callbacks[arg]))
                    for kind, (action, arg) in row.items()}
            for state, row in table.states.items()
        }

    def parse(self, text: str):
        actions, end = self.actions, self.end
        states = [self.start]
        values: list = []
        tokens = self.lexer.lex(LexerThread.from_text(self.lexer, text).state, _Position(states))
        for token in _then_end(tokens):
            kind = token.type
            while True:  # reduce until the token can be shifted
                try:
                    target, name, callback = actions[states[-1]][kind]
                except KeyError:
                    raise UnexpectedToken(token, set(actions[states[-1]])) from None
                if name is None:
                    states.append(target)
                    values.append(token)
                    break
                if target:
                    children = values[-target:]
                    del states[-target:]
                    del values[-target:]
                else:
                    children = []
                values.append(callback(children))
                states.append(actions[states[-1]][name][0])
                if kind == "$END" and states[-1] == end:
                    return values[-1]
        raise AssertionError("the parse table accepts only at $END")


def _then_end(tokens):
    token = None
    for token in tokens:
        yield token
    yield Token.new_borrow_pos("$END", "", token) if token is not None else Token("$END", "", 0, 1, 1)
