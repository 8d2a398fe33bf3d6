"""`vibee bench parse`: how fast the front end turns spec text into a document (MB/s of
parse_document, in process), over the shipped specs, a generated corpus of older descriptive
specs, and any directories of .vibee files given; and what fraction of each corpus parses."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

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
