"""Cache-reader benchmark: one random training batch of items from each way of reading the cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pmmcache import cache as cache_io
from pmmcache.bench.common import median_ms, synchronize, write_synthetic_cache

STATE_NAMES = ("text/states", "text/mask", "image/states", "modality")


def write_chunked_copy(source: Path, target: Path) -> None:
    """The naive layout: the same arrays, chunked one item per chunk (what h5py users often write)."""
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for name in STATE_NAMES:
            ds = src[name]
            out = dst.create_dataset(name, shape=ds.shape, dtype=ds.dtype, chunks=(1,) + ds.shape[1:])
            for start in range(0, ds.shape[0], 512):
                out[start:start + 512] = ds[start:start + 512]


def reader_bench(work: Path, items: int, tokens: int, dim: int, batch_items: int, repeats: int,
                 device: torch.device, int8: bool = True) -> dict[str, Any]:
    """Milliseconds per random batch for each way of reading the cache, and ratios to naive h5py.

    With `int8`, the same reads from an int8 cache (dequantised to float16 by the reader) are added
    as `<storage>_int8`."""
    path = work / "bench-reader.h5"
    chunked = work / "bench-reader-chunked.h5"
    text_tokens = tokens // 2
    write_synthetic_cache(path, items, text_tokens, tokens - text_tokens, dim)
    write_chunked_copy(path, chunked)
    paths = {"": path}
    if int8:
        paths["_int8"] = work / "bench-reader-int8.h5"
        write_synthetic_cache(paths["_int8"], items, text_tokens, tokens - text_tokens, dim, states_dtype="int8")
    rng = np.random.default_rng(1)
    batches = [rng.integers(1, items + 1, size=batch_items) for _ in range(repeats + 1)]
    cursor = iter(range(10**9))

    def next_batch() -> np.ndarray:
        return batches[next(cursor) % len(batches)]

    def h5py_fancy_ms(file: Path) -> float:
        with h5py.File(file, "r") as handle:
            def read() -> list[np.ndarray]:
                idx = np.unique(next_batch())  # h5py needs increasing indices
                return [handle[name][idx] for name in STATE_NAMES]
            return median_ms(read, repeats)

    figures: dict[str, float] = {}
    figures["h5py_chunked_fancy_ms"] = h5py_fancy_ms(chunked)
    figures["h5py_contiguous_fancy_ms"] = h5py_fancy_ms(path)
    for suffix, file in paths.items():
        for storage in ("memmap", "ram") + (("gpu",) if device.type == "cuda" else ()):
            reader = cache_io.CacheReader(file, storage=storage, device=device if storage == "gpu" else "cpu")

            def read(reader: cache_io.CacheReader = reader) -> cache_io.ItemStates:
                states = reader.get(torch.from_numpy(next_batch()))
                synchronize(device)
                return states
            figures[f"{storage}{suffix}_ms"] = median_ms(read, repeats)
    batch_mb = batch_items * (tokens * dim * 2 + text_tokens + 2) / 1e6
    naive = figures["h5py_chunked_fancy_ms"]
    result = {
        "items": items, "tokens_per_item": tokens, "dim": dim, "batch_items": batch_items,
        "batch_mb": round(batch_mb, 1), "cache_mb": round(path.stat().st_size / 1e6, 1),
        "ms_per_batch": {k.removesuffix("_ms"): round(v, 2) for k, v in figures.items()},
        "speedup_vs_naive_h5py": {k.removesuffix("_ms"): round(naive / v, 1) for k, v in figures.items()},
        "note": "files are in the OS page cache (just written): this measures the read path, not the disk",
    }
    if int8:
        result["cache_mb_int8"] = round(paths["_int8"].stat().st_size / 1e6, 1)
    return result
