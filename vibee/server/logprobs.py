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
                        prompt_ids: list[int] | None = None, prompt_entries: list[Any] | None = None,
                        skip_special_tokens: bool = True) -> CompletionLogProbs:
    """Advances `choice.text_offset` past every token listed. prompt_ids: echo's prompt tokens,
    with their logprobs in prompt_entries (the engine's prompt_logprobs: None for the first).
    Offsets index the text sent: a special token the text leaves out takes no characters."""
    out = CompletionLogProbs()
    special = state.engine.tokenizer.all_special_ids if skip_special_tokens else ()

    def add(token_id: int, logprob: float | None, top: dict[str, float] | None) -> None:
        text = state.token_text(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(choice.text_offset)
        if token_id not in special:
            choice.text_offset += len(text)

    for i, t in enumerate(prompt_ids or []):
        e = prompt_entries[i] if prompt_entries else None
        if e is None:  # the first token (nothing precedes it), or no prompt logprobs asked for
            add(t, None, None)
        else:
            add(t, _clean(e.logprob), _tops(state, e, top_n))
    for e in entries:
        add(e.token_id, _clean(e.logprob), _tops(state, e, top_n))
    return out


def vllm_prompt_logprobs(state: ServerState, entries: list[Any] | None,
                         top_n: int | None) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's prompt_logprobs of one prompt (None unless asked for): None at the first position,
    then {token id: {logprob, rank, decoded_token}} for the prompt token and the top_n likeliest."""
    if top_n is None or entries is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        position = {str(t): {"logprob": _clean(lp), "rank": r + 1, "decoded_token": state.token_text(t)}
                    for r, (t, lp) in enumerate(list(e.top)[:top_n])}
        position.setdefault(str(e.token_id), {"logprob": _clean(e.logprob), "rank": e.rank,
                                              "decoded_token": state.token_text(e.token_id)})
        out.append(position)
    return out


def _tops(state: ServerState, e: Any, top_n: int) -> dict[str, float]:
    top = {state.token_text(t): _clean(lp) for t, lp in list(e.top)[:top_n]}
    top.setdefault(state.token_text(e.token_id), _clean(e.logprob))  # the token itself is always listed (as vLLM does)
    return top


def chat_logprobs(state: ServerState, entries: list[Any], top_n: int) -> ChatLogProbs:
    content = []
    for e in entries:
        text = state.token_text(e.token_id)
        tops = [TopLogprob(token=state.token_text(t), logprob=_clean(lp), bytes=list(state.token_text(t).encode()))
                for t, lp in list(e.top)[:top_n]]
        content.append(ChatTokenLogprob(token=text, logprob=_clean(e.logprob), bytes=list(text.encode()),
                                        top_logprobs=tops))
    return ChatLogProbs(content=content)
