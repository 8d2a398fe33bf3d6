"""Speculation on or off for the whole engine, by measured speed.

Speculative steps cannot overlap (the next drafts need this step's accepted tokens on the host),
plain steps can; whether drafting pays depends on the model, the drafter, the text and the batch.
So the engine measures: a cycle times `probe_steps` steps with speculation, then as many without,
and keeps the faster mode for `hold_steps` steps before measuring both again. `--speculative`
then costs at most the slower probe (probe_steps of every 2 * probe_steps + hold_steps) when
drafting does not pay, and keeps its gain when it does. The per-sequence acceptance gate of the
speculative_decode spec works inside the speculating mode.
"""

from __future__ import annotations

PROBE_STEPS = 32  # steps timed in each mode per cycle
HOLD_STEPS = 480  # steps run in the faster mode before the next measurement


class SpeedGate:
    def __init__(self, probe_steps: int = PROBE_STEPS, hold_steps: int = HOLD_STEPS):
        if probe_steps < 1 or hold_steps < 0:
            raise ValueError(f"probe_steps must be >= 1 and hold_steps >= 0, got {probe_steps}, {hold_steps}")
        self.probe_steps, self.hold_steps = probe_steps, hold_steps
        self.phase = "probe_on"  # probe_on -> probe_off -> hold -> probe_on ...
        self.speculating = True
        self.rates: dict[bool, float] = {}  # the last measured tokens/s with and without speculation
        self.holds = {True: 0, False: 0}  # hold phases spent speculating / not
        self._steps = 0
        self._tokens = 0
        self._seconds = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        """One engine step: the tokens it reported and the wall time it took."""
        self._steps += 1
        self._tokens += tokens
        self._seconds += seconds
        if self.phase == "hold":
            if self._steps >= self.hold_steps:
                self._next("probe_on", True)
        elif self._steps >= self.probe_steps:
            self.rates[self.speculating] = self._tokens / max(self._seconds, 1e-9)
            if self.phase == "probe_on":
                self._next("probe_off", False)
            else:
                faster = self.rates[True] > self.rates[False]
                self.holds[faster] += 1
                self._next("hold", faster)

    def _next(self, phase: str, speculating: bool) -> None:
        self.phase, self.speculating = phase, speculating
        self._steps, self._tokens, self._seconds = 0, 0, 0.0

    def figures(self) -> dict:
        return {"speculating": self.speculating, "phase": self.phase,
                "tokens_per_s_speculating": self.rates.get(True), "tokens_per_s_plain": self.rates.get(False),
                "holds_speculating": self.holds[True], "holds_plain": self.holds[False],
                "probe_steps": self.probe_steps, "hold_steps": self.hold_steps}
