"""Editing spec text in tests the way a user would: change one knob, keep everything else."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

SHIPPED_SPECS = Path(__file__).resolve().parents[1] / "specs" / "tri"


def with_knob(text: str, key: str, value: str) -> str:
    """The spec text with `key: <old>` (the first such line) set to value, comments kept."""
    pattern = re.compile(rf"^(\s*{re.escape(key)}:\s*)([^#\n]*?)(\s*(#.*)?)$", re.MULTILINE)
    changed, count = pattern.subn(lambda m: m.group(1) + value + m.group(3), text, count=1)
    assert count == 1, f"the spec has no '{key}:' line"
    return changed


def specs_with_knob(folder: Path, spec: str, key: str, value: str) -> Path:
    """A copy of the shipped specs in folder with one knob of one spec file changed."""
    shutil.copytree(SHIPPED_SPECS, folder)
    path = folder / spec
    path.write_text(with_knob(path.read_text(), key, value))
    return folder
