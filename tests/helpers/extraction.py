"""A small tool of the extraction tests: edit a raw data file in place."""
from __future__ import annotations

from pathlib import Path


def rewrite_line(path: Path, number: int, text: str) -> None:
    """Replace line `number` (1-based) of a text file."""
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")
