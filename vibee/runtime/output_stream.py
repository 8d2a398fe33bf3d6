"""One request's outputs on the server's side of the engine process: the engine's per-step news
(OutputDelta) is added as it arrives, and the consumer takes everything new at once. When a
client reads slower than the engine steps, several steps become one RequestOutput (one streamed
chunk with several tokens) instead of a queue that grows: the engine's pace is kept whatever
the HTTP side's."""

from __future__ import annotations

import asyncio
from typing import Any

from vibee.runtime.outputs import CompletionOutput, RequestOutput


class _ChoiceState:
    __slots__ = ("text", "token_ids", "logprobs", "finish_reason", "stop_reason", "sent_text", "sent_tokens")

    def __init__(self, want_logprobs: bool):
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[Any] | None = [] if want_logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.sent_text = 0  # characters of text already handed out
        self.sent_tokens = 0


class OutputStream:
    """Lives on one event loop; `add` and `fail` are called there (the reader thread schedules them)."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], n: int, want_logprobs: bool):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.choices = [_ChoiceState(want_logprobs) for _ in range(n)]
        self.changed: set[int] = set()
        self.finished = False
        self.finish_sent = False
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[Any] | None = None
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def add(self, finished: bool, num_cached_tokens: int, items: list[tuple], prompt_logprobs: Any = None) -> None:
        if prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs
        for index, delta_text, delta_ids, delta_logprobs, finish_reason, stop_reason in items:
            c = self.choices[index]
            c.text += delta_text
            c.token_ids += delta_ids
            if c.logprobs is not None and delta_logprobs:
                c.logprobs += delta_logprobs
            c.finish_reason, c.stop_reason = finish_reason, stop_reason
            self.changed.add(index)
        self.finished |= finished
        self.num_cached_tokens = num_cached_tokens
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()

    async def next(self) -> RequestOutput:
        """What changed since the last call (waits for something); raises the stream's error."""
        while not self.changed and self.error is None and not (self.finished and not self.finish_sent):
            self.ready.clear()
            await self.ready.wait()
        if self.error is not None:
            raise self.error
        outputs = []
        for index in sorted(self.changed):
            c = self.choices[index]
            outputs.append(CompletionOutput(index, c.text, c.token_ids, c.text[c.sent_text:],
                                            c.token_ids[c.sent_tokens:],
                                            None if c.logprobs is None else c.logprobs[c.sent_tokens:],
                                            c.logprobs, c.finish_reason, c.stop_reason, len(c.token_ids)))
            c.sent_text, c.sent_tokens = len(c.text), len(c.token_ids)
        self.changed.clear()
        self.finish_sent = self.finished
        return RequestOutput(self.request_id, self.prompt_token_ids, outputs, self.finished, self.num_cached_tokens,
                             self.prompt_logprobs)
