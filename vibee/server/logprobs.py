"""Engine logprobs in OpenAI's two shapes: completions' parallel lists and chat's per-token objects."""

from __future__ import annotations

import math
from typing import Any

from vibee.server.generation import Choice
from vibee.server.protocol import ChatLogProbs, ChatTokenLogprob, CompletionLogProbs, TopLogprob
from vibee.server.state import ServerState

# JSON has no -inf; vLLM sends this for impossible tokens' logprobs too.
_NEG_INF_LOGPROB = -9999.0


def _clean(x: float) -> float:
    return _NEG_INF_LOGPROB if math.isinf(x) and x < 0 else float(x)


def completion_logprobs(state: ServerState, entries: list[Any], top_n: int, choice: Choice,
                        prompt_ids: list[int] | None = None) -> CompletionLogProbs:
    """Advances `choice.text_offset` past every token listed."""
    out = CompletionLogProbs()
    if prompt_ids:  # echo: prompt tokens, whose logprobs the engine doesn't compute
        for t in prompt_ids:
            text = state.token_text(t)
            out.tokens.append(text)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            out.text_offset.append(choice.text_offset)
            choice.text_offset += len(text)
    for e in entries:
        text = state.token_text(e.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(_clean(e.logprob))
        top = {state.token_text(t): _clean(lp) for t, lp in list(e.top)[:top_n]}
        top.setdefault(text, _clean(e.logprob))  # the sampled token is always listed (as vLLM does)
        out.top_logprobs.append(top)
        out.text_offset.append(choice.text_offset)
        choice.text_offset += len(text)
    return out


def chat_logprobs(state: ServerState, entries: list[Any], top_n: int) -> ChatLogProbs:
    content = []
    for e in entries:
        text = state.token_text(e.token_id)
        tops = [TopLogprob(token=state.token_text(t), logprob=_clean(lp), bytes=list(state.token_text(t).encode()))
                for t, lp in list(e.top)[:top_n]]
        content.append(ChatTokenLogprob(token=text, logprob=_clean(e.logprob), bytes=list(text.encode()),
                                        top_logprobs=tops))
    return ChatLogProbs(content=content)
