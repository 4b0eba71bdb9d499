"""The cache-reader benchmark runs at a tiny size, and its fast paths return what the plain reads return."""
from __future__ import annotations

import h5py
import numpy as np
import torch

from pmmcache import bench
from pmmcache import cache as cache_io

ITEMS, TOKENS, DIM = 256, 20, 32  # 10 text + 10 image tokens per item; big enough that no figure rounds to 0


def test_reader_bench_reports_every_read_path(tmp_path):
    result = bench.reader_bench(tmp_path, items=ITEMS, tokens=TOKENS, dim=DIM, batch_items=64, repeats=3,
                                device=torch.device("cpu"))
    paths = {"memmap", "ram", "h5py_chunked_fancy", "h5py_contiguous_fancy"}
    assert set(result["ms_per_batch"]) == paths  # no "gpu" figure without CUDA
    assert all(ms > 0 for ms in result["ms_per_batch"].values())
    assert set(result["speedup_vs_naive_h5py"]) == paths
    assert result["speedup_vs_naive_h5py"]["h5py_chunked_fancy"] == 1.0
    assert all(ratio > 0 for ratio in result["speedup_vs_naive_h5py"].values())
    assert (result["items"], result["tokens_per_item"], result["dim"], result["batch_items"]) == (ITEMS, TOKENS, DIM, 64)
    assert result["cache_mb"] == round((tmp_path / "bench-reader.h5").stat().st_size / 1e6, 1) > 0

    # The naive layout really is chunked one item per chunk, the cache contiguous.
    with h5py.File(tmp_path / "bench-reader-chunked.h5", "r") as f:
        assert f["image/states"].chunks == (1, TOKENS - TOKENS // 2, DIM)
    with h5py.File(tmp_path / "bench-reader.h5", "r") as f:
        assert f["image/states"].chunks is None


def test_memmap_and_ram_readers_return_what_h5py_reads(tmp_path):
    path = tmp_path / "synthetic.h5"
    bench.write_synthetic_cache(path, items=ITEMS, text_tokens=6, image_tokens=4, dim=DIM, chunk=7)
    index = torch.tensor([[5, 1, ITEMS], [5, 0, 17]])  # repeats, padding row, last row, any order
    flat = index.reshape(-1).numpy()
    with h5py.File(path, "r") as f:  # the plain path: h5py reads of the whole datasets
        plain = {name: f[name][:][flat] for name in ("text/states", "text/mask", "image/states", "modality")}
        assert f["done"][:].all() and f["complete"][0] == 1
    assert np.abs(plain["text/states"]).max() > 0.5  # random states, not zeros

    results = {}
    for storage in ("memmap", "ram"):
        reader = cache_io.CacheReader(path, storage=storage)
        assert reader.storage == storage
        results[storage] = reader.get(index)
    fast, slow = results["memmap"], results["ram"]
    for got in (fast, slow):
        assert got.text.shape == (2, 3, 6, DIM) and got.image.shape == (2, 3, 4, DIM)
        np.testing.assert_array_equal(got.text.reshape(-1, 6, DIM).numpy(), plain["text/states"])
        np.testing.assert_array_equal(got.image.reshape(-1, 4, DIM).numpy(), plain["image/states"])
        np.testing.assert_array_equal(got.text_mask.reshape(-1, 6).numpy(), plain["text/mask"].astype(bool))
        np.testing.assert_array_equal(got.modality.reshape(-1, 2).numpy(), plain["modality"].astype(bool))
    assert torch.equal(fast.text, slow.text) and torch.equal(fast.image, slow.image)
