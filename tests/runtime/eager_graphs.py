"""The host side of CUDA-graph steps on a CPU: "graphs" that run the model eagerly on the static
buffers of DecodeGraphs and PrefillGraphs (what a captured graph reads and writes)."""

from __future__ import annotations


def use_eager_graphs(monkeypatch) -> list[int]:
    """Make every engine built from now on decode through DecodeGraphs with eager replays;
    returns the list each replay appends its batch size to."""
    from vibee.runtime.cuda_graphs import DecodeGraphs
    from vibee.runtime.engine import LLMEngine
    from vibee.runtime.prefill_graphs import PrefillGraphs

    replayed: list[int] = []

    class EagerReplay:
        def __init__(self, graphs, b):
            self.graphs, self.b = graphs, b

        def replay(self):
            replayed.append(self.b)
            self.graphs.step(self.b)

    def capture(self):
        self.graphs = {b: EagerReplay(self, b) for b in self.sizes}

    def capture_prefill(self):
        self.graphs = {t: EagerReplay(self, t) for t in self.sizes}

    monkeypatch.setattr(DecodeGraphs, "capture", capture)
    monkeypatch.setattr(PrefillGraphs, "capture", capture_prefill)
    monkeypatch.setattr(LLMEngine, "_wants_graphs", lambda self: True)
    return replayed


def watch_round_starts(monkeypatch, record) -> None:
    """Eager graphs (use_eager_graphs), and record(rounds_object, seqs, rounds, chained, grammar_slots)
    before every DeviceRounds.start; skips the test outside the Triton interpreter, since rounds
    sample in a Triton kernel."""
    import os

    import pytest

    from vibee.runtime.device_rounds import DeviceRounds

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("rounds sample in a Triton kernel: on a CPU it needs TRITON_INTERPRET=1")
    use_eager_graphs(monkeypatch)
    real = DeviceRounds.start

    def start(self, seqs, tables, allowed, rooms, caps, rounds, temperatures=None, chained=False, grammar_slots=None):
        record(self, seqs, rounds, chained, grammar_slots)
        return real(self, seqs, tables, allowed, rooms, caps, rounds, temperatures, chained, grammar_slots)

    monkeypatch.setattr(DeviceRounds, "start", start)
