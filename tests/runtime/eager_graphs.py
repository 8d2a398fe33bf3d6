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
