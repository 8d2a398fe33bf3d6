"""/tokenize and /detokenize (vLLM's extensions): the served model's tokenizer over HTTP."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from vibee.server.errors import bad_request
from vibee.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from vibee.server.request_params import chat_prompt
from vibee.server.state import State

router = APIRouter()


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: State) -> TokenizeResponse:
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send exactly one of 'prompt' and 'messages'.",
                          param="prompt" if req.prompt is None else "messages")
    if req.prompt is not None:
        ids = await state.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        text = await asyncio.to_thread(chat_prompt, state, req.messages, req.add_generation_prompt)
        ids = await state.encode(text, add_special_tokens=False)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len)


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, state: State) -> DetokenizeResponse:
    state.check_model(req.model)
    state.check_tokens(req.tokens, "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(req.tokens))
