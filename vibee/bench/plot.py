"""The benchmarks' PNGs: figures made without a display (`figure`) and written the same way
(`save`); the latency distributions of `vibee bench serve`, one cumulative distribution per
panel (TTFT, TPOT, ITL, end to end) with the median and p99 marked, so tails are seen, not read."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def figure(*args, **kwargs):
    """plt.subplots(*args, **kwargs) on the file-only Agg backend: (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: Path, title: str) -> Path:
    """Title, lay out, write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_serve_latencies(results: Sequence, path: Path, title: str) -> Path:
    import numpy as np

    ok = [r for r in results if r.ok]
    panels = [
        ("Time to first token", [r.ttft for r in ok if r.ttft is not None]),
        ("Time per output token", [r.tpot for r in ok if r.tpot is not None]),
        ("Inter-token latency", [x for r in ok for x in r.itl]),
        ("End-to-end latency", [r.e2e for r in ok if r.e2e is not None]),
    ]
    fig, axes = figure(2, 2, figsize=(10, 7))
    for ax, (name, seconds) in zip(axes.flat, panels):
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        if not seconds:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        ms = np.sort(np.asarray(seconds) * 1000.0)
        ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), drawstyle="steps-post")
        for q, style in ((50, "--"), (99, ":")):
            value = float(np.percentile(ms, q))
            ax.axvline(value, linestyle=style, color="gray", label=f"p{q} {value:.1f} ms")
        ax.legend(loc="lower right")
    return save(fig, path, title)
