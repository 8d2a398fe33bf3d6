"""What both benchmarks share: the random workload, percentiles, the environment description, and
writing results as JSON + a markdown table (and printing that table), and how a command ends."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

# --- workload ------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """'100:1024' -> (100, 1024); '128' -> (128, 128). Raises ValueError with a one-line message."""
    parts = str(text).strip().split(":")
    if len(parts) not in (1, 2):
        raise ValueError(f"{text!r} is not a length or a LOW:HIGH range")
    try:
        low, high = (int(p) for p in (parts * 2 if len(parts) == 1 else parts))
    except ValueError:
        raise ValueError(f"{text!r} is not a length or a LOW:HIGH range of integers") from None
    if low < 1 or high < low:
        raise ValueError(f"{text!r}: need 1 <= LOW <= HIGH")
    return low, high


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


def random_workload(num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int],
                    vocab_size: int, exclude_ids: Iterable[int] = (), seed: int = 0) -> Workload:
    """Random-token prompts like vLLM's random dataset: lengths uniform over the inclusive ranges,
    ids uniform over the vocabulary minus `exclude_ids` (special tokens such as EOS), seeded."""
    excluded = set(exclude_ids)
    allowed = [i for i in range(vocab_size) if i not in excluded]
    if not allowed:
        raise ValueError(f"no token ids to draw from (vocabulary {vocab_size}, {len(excluded)} excluded)")
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(num_prompts):
        prompts.append(rng.choices(allowed, k=rng.randint(*input_range)))
        outputs.append(rng.randint(*output_range))
    return Workload(prompts, outputs)


def first_tokens_varied(workload: Workload, pass_index: int, vocab_size: int, exclude_ids: Iterable[int] = ()) -> Workload:
    """The workload for timed pass `pass_index` of a repeated run: the same lengths and tokens, but
    each prompt's first token moved pass_index places along the vocabulary minus `exclude_ids`, so
    that no prompt starts as an earlier pass's did (the prefix cache chains a block's hash to the
    blocks before it: one changed first token leaves nothing of an earlier pass to reuse)."""
    if pass_index == 0:
        return workload
    excluded = set(exclude_ids)
    allowed = [i for i in range(vocab_size) if i not in excluded]
    if len(allowed) <= pass_index:
        raise ValueError(f"{pass_index + 1} passes need as many token ids to start prompts with; the vocabulary "
                         f"has {len(allowed)}")
    place = {token: i for i, token in enumerate(allowed)}
    prompts = [[allowed[(place.get(p[0], 0) + pass_index) % len(allowed)], *p[1:]] for p in workload.prompts]
    return Workload(prompts, list(workload.output_lens))


def stdlib_workload(tokenize, num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int],
                    seed: int = 0) -> Workload:
    """Prompts cut from the Python standard library's source (text every machine has): for each,
    a seeded file and a window of the drawn length. Real text, so n-gram and draft-model
    speculation see what they would in use; random tokens give them nothing to predict."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    if not files:
        raise ValueError(f"no Python source under {root}")
    rng = random.Random(seed)
    prompts, outputs = [], []
    cache: dict[Path, list[int]] = {}
    while len(prompts) < num_prompts:
        path = rng.choice(files)
        if path not in cache:
            cache[path] = tokenize(path.read_text(encoding="utf-8", errors="replace"))
        ids, length = cache[path], rng.randint(*input_range)
        if len(ids) <= length:
            continue
        start = rng.randrange(len(ids) - length)
        prompts.append(ids[start:start + length])
        outputs.append(rng.randint(*output_range))
    return Workload(prompts, outputs)


# --- figures -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, median, p90, p99, max of `values * scale` (None when there are no values)."""
    xs = [v * scale for v in values]
    if not xs:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None, "max": None}
    return {"count": len(xs), "mean": sum(xs) / len(xs), "median": percentile(xs, 50),
            "p90": percentile(xs, 90), "p99": percentile(xs, 99), "max": max(xs)}


# --- environment ---------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) if commit else None


def environment(device: str | None = None) -> dict[str, Any]:
    """Where the figures were measured: versions, the device's name, CPUs, the code's commit."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        env["cpus_usable"] = len(os.sched_getaffinity(0))
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["torch_threads"] = torch.get_num_threads()
        if device is not None and device.startswith("cuda") and torch.cuda.is_available():
            env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        env["torch"] = None
    if device is not None:
        env["device"] = device
        env.setdefault("device_name", env["cpu"] if device == "cpu" else device)
    try:
        from importlib.metadata import version

        env["vibee"] = version("vibee")
    except Exception:  # not installed as a package: the commit still says which code ran
        env["vibee"] = None
    env["git_commit"] = _git_commit()
    return env


# --- tables and files ----------------------------------------------------------------------------


@dataclass
class Section:
    """One table of the report: a title, column names and rows of values."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"
    return str(value)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _right_aligned(section: Section) -> list[bool]:
    """Numbers line up on the right; a column holding any text reads better on the left."""
    return [i > 0 and all(_is_number(row[i]) for row in section.rows) for i in range(len(section.columns))]


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def markdown(title: str, sections: Sequence[Section], notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", ""]
    for note in notes:
        lines += [note, ""]
    for s in sections:
        lines += [f"## {s.title}", "", "| " + " | ".join(s.columns) + " |",
                  "|" + "|".join("---:" if right else "---" for right in _right_aligned(s)) + "|"]
        lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in s.rows]
        lines.append("")
    return "\n".join(lines)


def print_report(console, title: str, sections: Sequence[Section], notes: Sequence[str] = ()) -> None:
    from rich.table import Table

    console.print(f"[bold]{title}[/bold]")
    for note in notes:
        console.print(note, highlight=False)
    for s in sections:
        table = Table(title=s.title, title_justify="left", title_style="bold")
        for col, right in zip(s.columns, _right_aligned(s)):
            table.add_column(col, justify="right" if right else "left")
        for row in s.rows:
            table.add_row(*(fmt(v) for v in row))
        console.print(table)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan; "inf" reads back unambiguously
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_result(result_dir: str | Path, name: str, data: dict[str, Any], title: str,
                 sections: Sequence[Section], notes: Sequence[str] = (),
                 now: datetime | None = None) -> tuple[Path, Path]:
    """Write <result_dir>/<name>-<timestamp>.json (data) and .md (the tables); returns both paths."""
    out = Path(result_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    stem = f"{name}-{stamp}"
    n = 1
    while (out / f"{stem}.json").exists() or (out / f"{stem}.md").exists():  # two runs in one second
        stem = f"{name}-{stamp}-{n}"
        n += 1
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(title, sections, notes), encoding="utf-8")
    return json_path, md_path


def fail(message: str) -> None:
    """A bench command's user error: one line on stderr, exit status 2, no traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def finish(console, result_dir, name, data, title, sections, notes) -> Path:
    """The end of every bench command: write the result files, print the tables, say where they went."""
    try:
        json_path, md_path = write_result(result_dir, name, data, title, sections, notes)
    except OSError as exc:
        print_report(console, title, sections, notes)
        fail(f"could not write results to {result_dir}: {exc}")
    print_report(console, title, sections, notes)
    console.print(f"wrote {json_path} and {md_path}", highlight=False)
    return json_path
