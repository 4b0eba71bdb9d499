"""Small tools of the extraction tests: edit a raw data file in place, see which cache rows get written."""
from __future__ import annotations

from pathlib import Path

from pmmcache import cache as cache_io


def rewrite_line(path: Path, number: int, text: str) -> None:
    """Replace line `number` (1-based) of a text file."""
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def record_written_rows(monkeypatch) -> list[int]:
    """The rows every CacheWriter.write call from now on writes, in call order.

    For claims a finished cache cannot show: that a row was *not* encoded again (its bytes would be
    the same either way)."""
    written: list[int] = []
    original = cache_io.CacheWriter.write

    def spy(self, rows, arrays):
        written.extend(int(r) for r in rows)
        original(self, rows, arrays)

    monkeypatch.setattr(cache_io.CacheWriter, "write", spy)
    return written
