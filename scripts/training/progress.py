"""Progress of a training run on the terminal and in captured logs."""

from __future__ import annotations

import time


class ProgressBar:
    """rich's progress bar when rich is installed (plain lines otherwise), plus a log line every
    `log_every` steps so that captured logs show the curve too."""

    def __init__(self, title: str, total: int):
        self.title, self.total, self.start = title, total, time.perf_counter()
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(title, total=total, loss="-")
        except ImportError:
            self.progress = None

    def set_total(self, total: int) -> None:
        self.total = total
        if self.progress is not None:
            self.progress.update(self.task, total=total)

    def update(self, step: int, loss: float | None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss="-" if loss is None else f"{loss:.3f}")

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f}s] {self.title}: {message}"
        if self.progress is not None:
            self.progress.console.print(line, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
