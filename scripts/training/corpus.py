"""The training data: the Python standard library's own *.py files, split by a hash of their path.

Every machine has the stdlib offline, so the models can be retrained anywhere without a download.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Directory names that hold the stdlib's own test suites. Many Python builds (Debian's, the
# official Docker images) ship without them, so leaving them out everywhere keeps the data the
# same kind of text on every machine.
TEST_DIRS = {"test", "tests", "idle_test"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Data that happens to live in .py files: pydoc's help topics (prose in one string) and the codec
# tables that gencodec.py generated (encodings/cp864.py ...). They are 15% of the bytes, would teach
# nothing about code, and their near-certain tokens would flatter the perplexity.
DATA_DIRS = {"pydoc_data"}
GENERATED_MARKER = "gencodec.py"

HELD_OUT_PERCENT = 2  # reported perplexity and agreement
VALID_PERCENT = 2  # picks the best checkpoint during training; never reported as a result


def split_of(relpath: str) -> str:
    """'held_out', 'valid' or 'train' for a file, from a hash of its path relative to the stdlib.

    Hashing the path (not the content) keeps a file on the same side across Python versions, so a
    held-out file is held out whichever stdlib the model was trained on.
    """
    bucket = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < HELD_OUT_PERCENT:
        return "held_out"
    if bucket < HELD_OUT_PERCENT + VALID_PERCENT:
        return "valid"
    return "train"


@dataclass
class Corpus:
    root: Path
    files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # split -> [(relpath, text)]
    skipped_undecodable: int = 0

    def texts(self, split: str) -> list[str]:
        return [text for _, text in self.files.get(split, [])]

    def summary(self) -> dict:
        return {
            split: {
                "files": len(docs),
                "bytes": sum(len(text.encode("utf-8")) for _, text in docs),
            }
            for split, docs in sorted(self.files.items())
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path) -> list[str]:
    """Relative paths of the stdlib's *.py files (test suites and installed packages left out), sorted."""
    paths = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(part in SKIP_DIRS or part in TEST_DIRS or part in DATA_DIRS for part in parts[:-1]):
            continue
        paths.append(path.relative_to(root).as_posix())
    return sorted(paths)


def load_corpus(root: Path, quick: bool) -> Corpus:
    corpus = Corpus(root=root, files={"train": [], "valid": [], "held_out": []})
    budget = {"train": 200_000, "valid": 8_000, "held_out": 8_000} if quick else None
    for rel in stdlib_sources(root):
        split = split_of(rel)
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            corpus.skipped_undecodable += 1  # a few stdlib files are latin-1 on purpose
            continue
        if not text.strip() or GENERATED_MARKER in text[:1000]:
            continue
        if budget is not None:
            if budget[split] <= 0 or len(text) > 20_000:
                continue
            budget[split] -= len(text)
        corpus.files[split].append((rel, text))
    return corpus
