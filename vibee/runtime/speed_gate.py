"""Speculation on or off for the whole engine, by measured speed.

Plain decoding runs several steps per host sync (multi-steps) and overlaps the host's work;
speculation saves target forwards but verifies k + 1 rows a round, and host drafts wait for the
last step's tokens. Whether drafting pays depends on the model, the drafter, the text and the batch.
So the engine measures: a cycle times `probe_steps` steps without speculation, then as many with
it, and keeps the faster mode for `hold_steps` steps before measuring both again. A step here is
one decode forward of the target: an engine step of r rounds on the device (a multi-step, or
speculative rounds) counts r, so the probes cost the same whether or not steps run in rounds. Plain decoding
is measured first: it is the mode that costs at most what it always costs, and the time its probe
took bounds the speculating probe, which ends once it has taken as long: by then it has had the
time plain decoding needed, and a drafter many times slower than the target (a draft model as
small in compute as the target is) costs a few of its slow steps per cycle, the first cycle
included, instead of probe_steps of them. A speculating probe clearly losing (below LOSING of
the plain rate after an eighth of its steps) ends there, instead of spending the plain probe's
whole time at that rate (the built-in model's draft model runs at about half the plain speed on
the H200). Each time plain decoding wins again the hold doubles
(up to MAX_BACKOFF times), so where drafting never pays the probes' cost fades instead of
recurring every cycle; when speculation wins the hold is back to hold_steps. Steps that prefill
(a new request at batch 1 costs several decode steps) are not timed in a probe: they would decide
the winner by which probe they fell in. Nor is the step after a switch: it reports the tokens of
the step before it, launched in the other mode. A speculating hold keeps measuring: once it has run
probe_steps decode steps and its rate so far is below the last plain probe's, it turns into a
plain hold (short probes can pick the wrong mode; a hold is long enough to find out). The
per-sequence acceptance gate of the speculative_decode spec works inside the speculating mode.
"""

from __future__ import annotations

PROBE_STEPS = 32  # decode forwards timed in each mode per cycle
HOLD_STEPS = 4096  # decode forwards run in the faster mode before the next measurement
MAX_BACKOFF = 16  # the hold after plain decoding won many times in a row: 16 * HOLD_STEPS
LOSING = 0.75  # a speculating probe this much slower than plain ends early


class SpeedGate:
    def __init__(self, probe_steps: int = PROBE_STEPS, hold_steps: int = HOLD_STEPS):
        if probe_steps < 1 or hold_steps < 0:
            raise ValueError(f"probe_steps must be >= 1 and hold_steps >= 0, got {probe_steps}, {hold_steps}")
        self.probe_steps, self.hold_steps = probe_steps, hold_steps
        self.phase = "probe_off"  # probe_off -> probe_on -> hold -> probe_off ...
        self.speculating = False
        self.rates: dict[bool, float] = {}  # the last measured tokens/s with and without speculation
        self.holds = {True: 0, False: 0}  # hold phases spent speculating / not
        self.backoff = 1  # the current hold is backoff * hold_steps
        self._plain_won = False  # in the last probe
        self._budget = 0.0  # seconds the last plain probe took: a speculating probe's limit
        self._steps = 0
        self._tokens = 0
        self._seconds = 0.0
        self._timed = [0, 0, 0.0]  # a hold's decode steps, tokens, seconds (prefill steps left out)
        self._switched = False  # the mode just changed: the next step is neither mode's

    def record(self, tokens: int, seconds: float, *, prefill: bool = False, forwards: int = 1) -> None:
        """One engine step: the tokens it reported, the wall time it took, whether it prefilled
        (not timed while probing) and the decode forwards it reported tokens of (its rounds)."""
        if self._switched:  # it reported the tokens of the mode before the switch (steps overlap)
            self._switched = False
            return
        if prefill and self.phase != "hold":
            return
        self._steps += forwards
        self._tokens += tokens
        self._seconds += seconds
        if self.phase == "hold":
            if not prefill:
                self._timed = [self._timed[0] + forwards, self._timed[1] + tokens, self._timed[2] + seconds]
            if self._steps >= self.hold_steps * self.backoff:
                self._next("probe_off", False)
            elif self.speculating and self._timed[0] >= self.probe_steps and False in self.rates \
                    and self._timed[1] / max(self._timed[2], 1e-9) < self.rates[False]:
                self.rates[True] = self._timed[1] / max(self._timed[2], 1e-9)
                self.holds[False] += 1
                self._plain_won = True
                self._next("hold", False)  # the rest of the cycle without speculation
        elif self.phase == "probe_off":
            if self._steps >= self.probe_steps:
                self.rates[False] = self._tokens / max(self._seconds, 1e-9)
                self._budget = self._seconds
                self._next("probe_on", True)
        elif self._steps >= self.probe_steps or self._seconds >= self._budget or self._losing():
            self.rates[True] = self._tokens / max(self._seconds, 1e-9)
            faster = self.rates[True] > self.rates[False]
            self.holds[faster] += 1
            if faster or not self._plain_won:
                self.backoff = 1
            else:  # plain won last time too: wait longer before paying for the next probe
                self.backoff = min(2 * self.backoff, MAX_BACKOFF)
            self._plain_won = not faster
            self._next("hold", faster)

    def _losing(self) -> bool:
        """A speculating probe that has run an eighth of its steps (probes of 8 steps or more)
        below LOSING of the plain rate."""
        early = self.probe_steps // 8
        return bool(early) and self._steps >= early and self._tokens / max(self._seconds, 1e-9) < LOSING * self.rates[False]

    @classmethod
    def held(cls, speculating: bool = True) -> SpeedGate:
        """A gate that never measures: the engine stays in one mode (tests, and runs that compare
        the modes themselves)."""
        gate = cls()
        gate.phase, gate.speculating, gate.hold_steps = "hold", speculating, 2**62
        return gate

    def _next(self, phase: str, speculating: bool) -> None:
        self._switched = speculating != self.speculating
        self.phase, self.speculating = phase, speculating
        self._steps, self._tokens, self._seconds = 0, 0, 0.0
        self._timed = [0, 0, 0.0]

    def figures(self) -> dict:
        return {"speculating": self.speculating, "phase": self.phase,
                "tokens_per_s_speculating": self.rates.get(True), "tokens_per_s_plain": self.rates.get(False),
                "holds_speculating": self.holds[True], "holds_plain": self.holds[False], "backoff": self.backoff,
                "probe_steps": self.probe_steps, "hold_steps": self.hold_steps}
