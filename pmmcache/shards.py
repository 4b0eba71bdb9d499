"""Sharded caches: one file per extraction process, read as one cache.

A cache written by several processes into one file through memory maps needs a file system that
honours concurrent memory-mapped writes from several machines, which network file systems do not
promise. A sharded cache gives every file one writer instead:

    cache/<dataset>/<key>.h5                      the index: manifest, every item key, the shard list
    cache/<dataset>/<key>.00000-of-00002.h5shard  rows [0, n0) as a cache file of their own (same layout)
    cache/<dataset>/<key>.00001-of-00002.h5shard  rows [n0, N+1)

Shard i holds a contiguous range of rows, with its own `done`, checksums and `complete` byte, so each
shard resumes on its own. `RowConcat` joins the shards' memory maps of one dataset into one array over
the cache's rows (reads and writes by row index), which is how `cache.open_maps` hands a sharded cache
to everything that reads one. The shard files' suffix keeps them out of `*.h5` searches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHARD_SUFFIX = ".h5shard"


@dataclass(frozen=True)
class Shard:
    """One shard file of a sharded cache: rows [first_row, first_row + rows) of the whole."""

    file: str  # file name, in the folder of the index
    first_row: int
    rows: int

    @property
    def stop(self) -> int:
        return self.first_row + self.rows


def plan_shards(index: Path, num_rows: int, count: int) -> list[Shard]:
    """`count` shards of near-equal contiguous row ranges covering rows [0, num_rows)."""
    bounds = [num_rows * i // count for i in range(count + 1)]
    return [Shard(f"{index.stem}.{i:05d}-of-{count:05d}{SHARD_SUFFIX}", bounds[i], bounds[i + 1] - bounds[i])
            for i in range(count)]


def shard_of(shards: list[Shard], rows: np.ndarray) -> np.ndarray:
    """Index of the shard holding each of `rows`."""
    return np.searchsorted(np.array([s.stop for s in shards]), np.asarray(rows), side="right")


class RowConcat:
    """One per-row dataset of several shards as one array over the cache's rows; only the shards given
    (`parts`: first row -> that shard's memory map) can be read or written."""

    def __init__(self, parts: dict[int, np.ndarray], num_rows: int):
        self._starts = np.array(sorted(parts), dtype=np.int64)
        self._parts = [parts[start] for start in self._starts]
        self._stops = self._starts + np.array([len(part) for part in self._parts], dtype=np.int64)
        first = self._parts[0]
        self.shape = (num_rows,) + first.shape[1:]
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._parts)

    def covered(self) -> np.ndarray:
        """The rows this view holds, in order."""
        return np.concatenate([np.arange(a, b) for a, b in zip(self._starts, self._stops)])

    def _locate(self, index: Any) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(*index.indices(self.shape[0])) if isinstance(index, slice) else np.asarray(index)
        rows = rows.reshape(-1).astype(np.int64)
        part = np.searchsorted(self._starts, rows, side="right") - 1
        outside = (part < 0) | (rows >= self._stops[np.maximum(part, 0)])
        if outside.any():
            raise IndexError(f"row {int(rows[outside][0])} is in no shard opened here")
        return rows, part

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        rows, part = self._locate(index)
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        for p in np.unique(part):
            chosen = part == p
            out[chosen] = self._parts[p][rows[chosen] - self._starts[p]]
        return out

    def __setitem__(self, index: Any, values: Any) -> None:
        rows, part = self._locate(index)
        values = np.broadcast_to(np.asarray(values, dtype=self.dtype), (len(rows),) + self.shape[1:])
        for p in np.unique(part):
            chosen = part == p
            self._parts[p][rows[chosen] - self._starts[p]] = values[chosen]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if len(self.covered()) != self.shape[0]:
            raise IndexError("not every shard is opened here")
        whole = np.concatenate(self._parts)
        return whole.astype(dtype) if dtype is not None else whole

    def flush(self) -> None:
        for part in self._parts:
            part.flush()


class EveryShard:
    """A per-file flag (`complete`, shape (1,)) of several shards as one: true when every shard's is,
    set in every shard."""

    def __init__(self, parts: list[np.ndarray]):
        self._parts = parts
        self.shape = parts[0].shape
        self.dtype = parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._parts)

    def __getitem__(self, index: Any) -> Any:
        return min(part[index] for part in self._parts)

    def __setitem__(self, index: Any, value: Any) -> None:
        for part in self._parts:
            part[index] = value

    def flush(self) -> None:
        for part in self._parts:
            part.flush()
