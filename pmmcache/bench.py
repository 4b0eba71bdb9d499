"""Benchmarks: every figure is measured side by side in one process and reported with ratios as JSON."""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch

from pmmcache import cache as cache_io


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    import os

    info = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_synthetic_cache(path: Path, items: int, text_tokens: int, image_tokens: int, dim: int,
                          seed: int = 0, chunk: int = 256) -> None:
    """A complete cache of random states, written through the real writer."""
    layout = cache_io.cache_layout(items + 1, (text_tokens, dim), (image_tokens, dim))
    cache_io.create_cache(path, {"synthetic": True}, [""] + [f"bench/{i}" for i in range(items)], layout)
    writer = cache_io.CacheWriter(path)
    rng = np.random.default_rng(seed)
    for start in range(0, items + 1, chunk):
        rows = np.arange(start, min(start + chunk, items + 1))
        writer.write(rows, {
            "text/states": rng.standard_normal((len(rows), text_tokens, dim), dtype=np.float32).astype(np.float16),
            "text/mask": np.ones((len(rows), text_tokens), dtype=np.uint8),
            "image/states": rng.standard_normal((len(rows), image_tokens, dim), dtype=np.float32).astype(np.float16),
            "modality": np.ones((len(rows), 2), dtype=np.uint8),
        })
    writer.mark_complete()
    writer.close()


def write_chunked_copy(source: Path, target: Path) -> None:
    """The naive layout: the same arrays, chunked one item per chunk (what h5py users often write)."""
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for name in ("text/states", "text/mask", "image/states", "modality"):
            ds = src[name]
            out = dst.create_dataset(name, shape=ds.shape, dtype=ds.dtype, chunks=(1,) + ds.shape[1:])
            for start in range(0, ds.shape[0], 512):
                out[start:start + 512] = ds[start:start + 512]


def reader_bench(work: Path, items: int, tokens: int, dim: int, batch_items: int, repeats: int,
                 device: torch.device) -> dict[str, Any]:
    """Milliseconds per random batch for each way of reading the cache, and ratios to naive h5py."""
    path = work / "bench-reader.h5"
    chunked = work / "bench-reader-chunked.h5"
    text_tokens = tokens // 2
    write_synthetic_cache(path, items, text_tokens, tokens - text_tokens, dim)
    write_chunked_copy(path, chunked)
    rng = np.random.default_rng(1)
    batches = [rng.integers(1, items + 1, size=batch_items) for _ in range(repeats + 1)]
    cursor = iter(range(10**9))

    def next_batch() -> np.ndarray:
        return batches[next(cursor) % len(batches)]

    def h5py_fancy_ms(file: Path) -> float:
        names = ("text/states", "text/mask", "image/states", "modality")
        with h5py.File(file, "r") as handle:
            def read() -> list[np.ndarray]:
                idx = np.unique(next_batch())  # h5py needs increasing indices
                return [handle[name][idx] for name in names]
            return _median_ms(read, repeats)

    figures: dict[str, float] = {}
    figures["h5py_chunked_fancy_ms"] = h5py_fancy_ms(chunked)
    figures["h5py_contiguous_fancy_ms"] = h5py_fancy_ms(path)
    for storage in ("memmap", "ram") + (("gpu",) if device.type == "cuda" else ()):
        reader = cache_io.CacheReader(path, storage=storage, device=device if storage == "gpu" else "cpu")

        def read(reader: cache_io.CacheReader = reader) -> None:
            states = reader.get(torch.from_numpy(next_batch()))
            if device.type == "cuda":
                torch.cuda.synchronize()
            return states
        figures[f"{storage}_ms"] = _median_ms(read, repeats)
    batch_mb = batch_items * (tokens * dim * 2 + text_tokens + 2) / 1e6
    naive = figures["h5py_chunked_fancy_ms"]
    return {
        "items": items, "tokens_per_item": tokens, "dim": dim, "batch_items": batch_items,
        "batch_mb": round(batch_mb, 1), "cache_mb": round(path.stat().st_size / 1e6, 1),
        "ms_per_batch": {k.removesuffix("_ms"): round(v, 2) for k, v in figures.items()},
        "speedup_vs_naive_h5py": {k.removesuffix("_ms"): round(naive / v, 1) for k, v in figures.items()},
        "note": "files are in the OS page cache (just written): this measures the read path, not the disk",
    }


def run_extract_bench(dataset: str = "demo", items: int = 4000, tokens: int = 100, dim: int = 768,
                      batch_items: int = 672, repeats: int = 5, device: str = "auto",
                      work_dir: str | None = None) -> dict[str, Any]:
    """Extraction throughput on `dataset` and the reader comparison on a synthetic cache."""
    from pmmcache import extract

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        work = Path(tmp)
        config = extract.ExtractConfig(dataset=dataset, cache_dir=work / "cache", device=str(dev), force=True)
        result = extract.run(config, show_progress=False)
        extraction = {"dataset": dataset, "items": result.items, "seconds": round(result.seconds, 2),
                      "items_per_s": round(result.items_per_second, 1),
                      "mb_written": round(result.bytes_written / 1e6, 1), "cache": result.path.name}
        reader = reader_bench(work, items, tokens, dim, batch_items, repeats, dev)
    return {"bench": "extract", "machine": machine(), "device": str(dev), "extraction": extraction, "reader": reader}
