"""`vibee bench parse`: how fast the front end turns spec text into a document (MB/s of
parse_document, in process), over the shipped specs, a generated corpus of older descriptive
specs, and any directories of .vibee files given; and what fraction of each corpus parses."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from vibee.bench.report import Section, environment
from vibee.frontend.descriptive_corpus import descriptive_corpus
from vibee.frontend.errors import SpecError
from vibee.frontend.parser import parse_document


@dataclass
class Corpus:
    name: str
    texts: list[tuple[str, str]]  # (path, text)

    @property
    def bytes(self) -> int:
        return sum(len(text.encode("utf-8")) for _, text in self.texts)


def spec_files(directory: Path, name: str) -> Corpus:
    """Every .vibee file under `directory` (recursively) that is UTF-8; others count as not parsed."""
    texts = []
    for path in sorted(directory.rglob("*.vibee")):
        texts.append((str(path), path.read_bytes().decode("utf-8", errors="replace")))
    return Corpus(name, texts)


def generated(count: int, seed: int) -> Corpus:
    return Corpus(f"{count} generated descriptive specs",
                  [(f"generated/{i}.vibee", text) for i, (text, _) in enumerate(descriptive_corpus(count, seed))])


def parse_rate(corpus: Corpus) -> tuple[int, list[str]]:
    """How many files parse, and the first diagnostic of each that doesn't (`path:line:col: message`)."""
    failures = []
    for path, text in corpus.texts:
        try:
            parse_document(text, path)
        except SpecError as exc:
            failures.append(exc.diagnostics[0].render().splitlines()[0])
    return len(corpus.texts) - len(failures), failures


def parse_speed(corpus: Corpus, repeats: int, on_repeat=None) -> dict:
    """CPU time of this process parsing the whole corpus (parsing is single-threaded and
    CPU-bound; CPU time doesn't count other load on the machine), `repeats` times after one
    untimed pass (which builds the Lark parser and warms caches). Files that fail count too:
    reporting errors is part of parsing."""
    def once() -> float:
        start = time.process_time()
        for path, text in corpus.texts:
            try:
                parse_document(text, path)
            except SpecError:
                pass
        return time.process_time() - start

    once()
    times = []
    for _ in range(repeats):
        times.append(once())
        if on_repeat is not None:
            on_repeat()
    size = corpus.bytes
    best, median = min(times), statistics.median(times)
    return {"files": len(corpus.texts), "bytes": size, "repeats": repeats, "best_s": best, "median_s": median,
            "mb_per_s_best": size / best / 1e6, "mb_per_s_median": size / median / 1e6}


def run_parse_bench(spec_dir: Path | None, generated_count: int, corpora: tuple[Path, ...], repeats: int,
                    seed: int, console) -> tuple[dict, str, list[Section], list[str]]:
    """Time and count every corpus; returns the JSON data, title, tables and notes of the report."""
    from vibee.runtime.generated import DEFAULT_SPEC_DIR

    sets = [spec_files(spec_dir or DEFAULT_SPEC_DIR, "shipped specs")]
    if generated_count:
        sets.append(generated(generated_count, seed))
    sets += [spec_files(directory, str(directory)) for directory in corpora]
    results, rows, failures = {}, [], []
    for corpus in sets:
        if not corpus.texts:
            raise ValueError(f"no .vibee files under {corpus.name}")
        console.print(f"parsing {corpus.name}: {len(corpus.texts)} files, {corpus.bytes / 1e6:.2f} MB ...",
                      highlight=False)
        parsed, failed = parse_rate(corpus)
        speed = parse_speed(corpus, repeats)
        results[corpus.name] = {**speed, "parsed": parsed, "parse_rate": parsed / len(corpus.texts), "failures": failed}
        rows.append([corpus.name, speed["files"], f"{speed['bytes'] / 1e6:.3f}", f"{speed['mb_per_s_best']:.2f}",
                     f"{speed['mb_per_s_median']:.2f}", f"{100 * parsed / len(corpus.texts):.2f}%"])
        failures += [[corpus.name, line] for line in failed[:20]]
    env = environment("cpu")
    title = f"vibee bench parse on {env.get('cpu')}"
    notes = [f"CPU time of parse_document over each whole corpus, best and median of {repeats} passes after one "
             "untimed pass; files that fail count too (their diagnostics are part of parsing)."]
    sections = [Section("Parse speed", ["corpus", "files", "MB", "MB/s (best)", "MB/s (median)", "parses"], rows)]
    if failures:
        sections.append(Section("First failures", ["corpus", "first diagnostic"], failures))
    sections.append(Section("Environment", ["Item", "Value"], [[k, v] for k, v in env.items()]))
    data = {"benchmark": "parse", "settings": {"repeats": repeats, "seed": seed, "generated": generated_count},
            "results": results, "environment": env}
    return data, title, sections, notes
