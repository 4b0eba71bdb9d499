"""Cache integrity: every row's CRC-32 (written at extraction) and finite states, checked in full by
`pmmcache verify-cache` and on a few sampled blocks whenever stage 2 opens a cache.

Caches of older pmmcache versions have no checksums: they are reported as such (their values are still
checked for NaN/inf), never refused; `pmmcache extract --force` rebuilds one with checksums.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pmmcache import cache as cache_io
from pmmcache.errors import CacheCorruptError, PmmcacheError

FLOAT_DATASETS = ("text/states", "image/states", "text/scale", "image/scale")
SAMPLE_BLOCKS = 4  # blocks of consecutive rows checked when stage 2 opens a cache
SAMPLE_BLOCK_ROWS = 16
SHOWN = 5  # rows named in a message; the rest are counted


@dataclass
class CacheCheck:
    """What a check of some rows of one cache found (row numbers are cache rows, 0 = padding)."""

    path: Path
    checked: int
    has_checksums: bool
    complete: bool  # an incomplete cache (extraction interrupted) has pending rows by right
    pending: list[int] = field(default_factory=list)
    bad_checksum: list[int] = field(default_factory=list)
    non_finite: list[int] = field(default_factory=list)

    @property
    def missing(self) -> list[int]:
        """Rows a complete cache should have written but has not."""
        return self.pending if self.complete else []

    @property
    def ok(self) -> bool:
        return not (self.missing or self.bad_checksum or self.non_finite)

    @property
    def bad_rows(self) -> list[int]:
        return sorted(set(self.missing) | set(self.bad_checksum) | set(self.non_finite))

    def problems(self) -> list[str]:
        """One line per kind of problem, naming the first rows and their item keys."""
        keys = cache_io.read_keys(self.path) if not self.ok else []
        lines = []
        for rows, what in ((self.bad_checksum, "whose bytes do not match their checksum"),
                           (self.non_finite, "with NaN or infinite values"),
                           (self.missing, "never written (not done) in a cache marked complete")):
            if rows:
                shown = ", ".join(f"{row} ({keys[row] or 'padding'})" for row in rows[:SHOWN])
                more = f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
                lines.append(f"{len(rows)} row(s) {what}: {shown}{more}")
        return lines


def check_rows(path: Path, rows: np.ndarray | None = None, block_rows: int = 256) -> CacheCheck:
    """Check `rows` (default: all) of the cache at `path` against their checksums and for non-finite values."""
    path = Path(path)
    maps = cache_io.open_maps(path)
    total = maps["done"].shape[0]
    rows = np.arange(total) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    check = CacheCheck(path=path, checked=len(rows), has_checksums="checksum" in maps,
                       complete=bool(maps["complete"][0]))
    for start in range(0, len(rows), block_rows):
        block = rows[start:start + block_rows]
        done = maps["done"][block] == 1
        check.pending += block[~done].tolist()
        written = block[done]
        if not len(written):
            continue
        if check.has_checksums:
            wrong = cache_io.row_checksums(maps, written) != maps["checksum"][written]
            check.bad_checksum += written[wrong].tolist()
        finite = np.ones(len(written), bool)
        for name in FLOAT_DATASETS:
            if name in maps:
                finite &= np.isfinite(maps[name][written]).reshape(len(written), -1).all(axis=1)
        check.non_finite += written[~finite].tolist()
    return check


def sample_rows(num_rows: int, blocks: int = SAMPLE_BLOCKS, block_rows: int = SAMPLE_BLOCK_ROWS,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """A few random blocks of consecutive rows (every row of a small cache)."""
    if num_rows <= blocks * block_rows:
        return np.arange(num_rows)
    rng = rng or np.random.default_rng()
    starts = rng.integers(0, num_rows - block_rows + 1, size=blocks)
    return np.unique((starts[:, None] + np.arange(block_rows)[None, :]).reshape(-1))


def no_checksums_note(path: Path) -> str:
    return (f"{path} has no row checksums (made by an older pmmcache), so damaged rows cannot be found; "
            "rerun `pmmcache extract` with the same options and --force to rebuild it with checksums")


def check_sample(path: Path) -> None:
    """The start-up check of stage 2: a few sampled blocks; CacheCorruptError naming the file if damaged."""
    check = check_rows(path, sample_rows(cache_io.open_maps(path, names={"done"})["done"].shape[0]))
    if not check.has_checksums:
        print(f"warning: {no_checksums_note(path)}", file=sys.stderr)
    if not check.ok:
        raise CacheCorruptError(
            f"{path} is damaged (found by checking {check.checked} sampled rows):\n  " + "\n  ".join(check.problems())
            + f"\nRun `pmmcache verify-cache --reencode {path}` to find every damaged row and mark it for "
            "re-encoding, then rerun `pmmcache extract` with the options that made the cache")


@dataclass(frozen=True)
class VerifyConfig:
    """Settings of `pmmcache verify-cache`."""

    paths: tuple[Path, ...]  # cache files, or folders searched for *.h5
    reencode: bool = False  # mark damaged rows pending, so the next `pmmcache extract` encodes them again


def cache_files(paths: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        found = sorted(path.rglob("*.h5")) if path.is_dir() else [path]
        if not found:
            raise PmmcacheError(f"no cache files (*.h5) under {path}")
        files += found
    return files


def run(config: VerifyConfig) -> list[CacheCheck]:
    """Check every row of every cache; print what was found; CacheCorruptError if any cache is damaged."""
    checks, damaged = [], []
    for path in cache_files(config.paths):
        cache_io.read_manifest(path)  # a foreign or unreadable file fails here, naming itself
        check = check_rows(path)
        checks.append(check)
        if not check.complete:
            print(f"incomplete: {path} ({len(check.pending)} of {check.checked} rows not yet extracted; rerun "
                  "`pmmcache extract` with the options that made it to finish)")
        if check.ok:
            print(f"ok: {path} ({check.checked - len(check.pending)} rows"
                  f"{', checksums match' if check.has_checksums else ''})")
        else:
            damaged.append(path)
            print(f"DAMAGED: {path}\n  " + "\n  ".join(check.problems()))
            if config.reencode:
                writer = cache_io.CacheWriter(path)
                writer.mark_pending(np.array(check.bad_rows, dtype=np.int64))
                writer.close()
                print(f"  marked {len(check.bad_rows)} row(s) for re-encoding: rerun `pmmcache extract` with the "
                      "options that made this cache")
        if not check.has_checksums:
            print(f"note: {no_checksums_note(path)}")
    if damaged:
        hint = "" if config.reencode else "; `pmmcache verify-cache --reencode` marks the rows for re-encoding"
        raise CacheCorruptError(f"{len(damaged)} of {len(checks)} cache file(s) damaged: "
                                + ", ".join(map(str, damaged)) + hint)
    return checks
