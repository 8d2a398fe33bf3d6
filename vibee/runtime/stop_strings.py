"""Stop strings over streamed text.

The output ends at the first occurrence of any stop string in the whole text: the one that
*starts* earliest (for several starting at the same place, the shortest, which is the one that
completes first). The result does not depend on how the text was split into deltas:

- a tail of the text that could still grow into a stop string is held back, not emitted;
- a stop string that has completed is not acted on while an earlier-starting one may still
  complete (e.g. stop=["abc", "b"] on "ab": "abc" could still start at "a"); it is decided when
  that one fails, or at ``flush``.

Held-back text is always shorter than the longest stop string.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stop = list(dict.fromkeys(stop))
        self._include = include_stop_str_in_output
        self._max_len = max((len(s) for s in self._stop), default=0)
        self._first_chars = {s[0] for s in self._stop}
        self._held = ""
        self._stopped: str | None = None

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text (set by ``feed`` or ``flush``), else None."""
        return self._stopped

    @property
    def held(self) -> str:
        """Text received but not emitted yet."""
        return self._held

    def _earliest_complete(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = buf.find(s)
            if i >= 0 and (best is None or (i, len(s)) < (best[0], len(best[1]))):
                best = (i, s)
        return best

    def _earliest_partial(self, buf: str) -> int | None:
        """Smallest j such that buf[j:] is a proper prefix of some stop string."""
        n = len(buf)
        for j in range(max(0, n - self._max_len + 1), n):
            if buf[j] not in self._first_chars:
                continue
            tail = buf[j:]
            for s in self._stop:
                if len(s) > len(tail) and s.startswith(tail):
                    return j
        return None

    def _finish(self, buf: str, at: int, s: str) -> str:
        self._stopped = s
        self._held = ""
        return buf[:at] + (s if self._include else "")

    def feed(self, new_text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit now, the stop string if the text just ended).

        Once stopped, further text is ignored: ("", None)."""
        if self._stopped is not None:
            return "", None
        if not self._stop:
            return new_text, None
        buf = self._held + new_text
        complete = self._earliest_complete(buf)
        partial = self._earliest_partial(buf)
        if complete is not None and (partial is None or partial >= complete[0]):
            # A partial match starting at the same place would be a longer stop string: the
            # shorter, already complete one wins.
            return self._finish(buf, complete[0], complete[1]), complete[1]
        cut = len(buf) if partial is None else partial
        self._held = buf[cut:]
        return buf[:cut], None

    def flush(self) -> str:
        """End of text: return what was held back. If it holds a complete stop string (waiting on a
        longer one that can no longer complete), return the text before it and set ``stopped``."""
        if self._stopped is not None:
            return ""
        buf, self._held = self._held, ""
        complete = self._earliest_complete(buf)
        if complete is not None:
            return self._finish(buf, complete[0], complete[1])
        return buf
