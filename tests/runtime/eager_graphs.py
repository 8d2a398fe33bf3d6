"""The host side of CUDA-graph decode steps on a CPU: "graphs" that run the model eagerly on
DecodeGraphs' static buffers (what a captured graph reads and writes)."""

from __future__ import annotations


def use_eager_graphs(monkeypatch) -> list[int]:
    """Make every engine built from now on decode through DecodeGraphs with eager replays;
    returns the list each replay appends its batch size to."""
    from vibee.runtime.cuda_graphs import DecodeGraphs
    from vibee.runtime.engine import LLMEngine

    replayed: list[int] = []

    class EagerReplay:
        def __init__(self, graphs, b):
            self.graphs, self.b = graphs, b

        def replay(self):
            replayed.append(self.b)
            self.graphs.step(self.b)

    def capture(self):
        self.graphs = {b: EagerReplay(self, b) for b in self.sizes}

    monkeypatch.setattr(DecodeGraphs, "capture", capture)
    monkeypatch.setattr(LLMEngine, "_wants_graphs", lambda self: True)
    return replayed
