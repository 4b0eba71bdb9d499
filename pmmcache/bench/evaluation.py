"""Evaluation benchmark: a complete full-rank evaluation of U users over a catalogue of N items.

The parts `pmmcache eval --full-rank` runs (`pmmcache.evaluate`): the item table (every item through
the top blocks + fusion once, in batches), the user vectors (user encoder over each history), and
`full_rank_metrics` (users x items scores in batched matmuls on the device, history masked, target
ranks -> HR/NDCG). Items are read from a synthetic cache of `cache_rows` rows; the catalogue's items
map onto those rows cyclically, so a 100k-item catalogue needs no 15 GB cache (per-item compute is
the same whatever the states hold).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmmcache import cache as cache_io
from pmmcache.bench.common import (build_encoders, build_model, default_size, gpu_peak_mb, host_peak_rss_mb, machine,
                                   reset_gpu_peak, resolve_device, synchronize, write_synthetic_cache)


class CyclicStore:
    """`ItemStore` over a catalogue of `num_items` items whose states repeat the cache's rows."""

    def __init__(self, reader: cache_io.CacheReader, num_items: int):
        self.reader, self.num_items = reader, num_items
        self.rows = reader.num_rows - 1  # row 0 is padding

    def get(self, indices: torch.Tensor) -> cache_io.ItemStates:
        index = indices.cpu()
        return self.reader.get(torch.where(index > 0, (index - 1) % self.rows + 1, 0))


def run_eval_bench(items: int | None = None, users: int | None = None, history: int = 20, cache_rows: int | None = None,
                   item_batch_size: int = 1024, score_batch_size: int = 1024, device: str = "auto",
                   precision: str = "auto", storage: str = "auto", work_dir: str | None = None, seed: int = 0,
                   **size_options: Any) -> dict[str, Any]:
    """Seconds of each part of a full-rank evaluation, items/s of the item table, users x items/s of the
    scoring; one JSON-able dict."""
    from pmmcache.evaluate import item_table, user_vectors
    from pmmcache.metrics import full_rank_metrics, summarize

    dev = resolve_device(device)
    size = default_size(dev, **size_options)
    on_gpu = dev.type == "cuda"
    items = items or (100_000 if on_gpu else 2_000)
    users = users or (100_000 if on_gpu else 2_000)
    cache_rows = min(items, cache_rows or (10_000 if on_gpu else 1_000))
    precision = "fp32" if precision == "auto" else precision  # auto: as `pmmcache eval` runs (no autocast)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    text, vision = build_encoders(size, seed)
    model = build_model(size, text, vision, history + 1, nid_head=False).to(dev).eval()
    rng = np.random.default_rng(seed)
    histories = torch.from_numpy(rng.integers(1, items + 1, size=(users, history)))  # (U, H), full histories
    targets = torch.from_numpy(rng.integers(1, items + 1, size=users))  # (U,)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "bench-eval.h5"
        write_synthetic_cache(path, cache_rows, size.text_tokens, size.image_tokens, size.dim, seed=seed)
        store = CyclicStore(cache_io.CacheReader(path, storage=storage, device=dev), items)

        def evaluate() -> dict[str, float]:
            seconds = {}
            clock = time.perf_counter()
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                table = item_table(model, store, item_batch_size)  # (N + 1, d) float32
                synchronize(dev)
                seconds["item_table"] = time.perf_counter() - clock
                users_ = user_vectors(model, table, histories, score_batch_size)  # (U, d)
                synchronize(dev)
                seconds["user_vectors"] = time.perf_counter() - clock - seconds["item_table"]
            per_user = full_rank_metrics(users_, table, targets.to(dev), histories.to(dev), ks=(10, 20, 50),
                                         batch_size=score_batch_size, mask_history=True)
            summarize(per_user)  # brings the means to the host: the scoring is done
            seconds["scores_and_ranks"] = time.perf_counter() - clock - seconds["item_table"] - seconds["user_vectors"]
            seconds["total"] = time.perf_counter() - clock
            return seconds

        with torch.no_grad():
            evaluate()  # warm-up (kernels, allocator, page cache)
            reset_gpu_peak(dev)
            seconds = evaluate()
    return {
        "bench": "eval", "machine": machine(), "device": str(dev), "precision": precision,
        "size": size.__dict__ | {"image_tokens": size.image_tokens}, "items": items, "users": users,
        "history": history, "cache_rows": cache_rows, "storage": store.reader.storage,
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "item_table_items_per_s": round(items / seconds["item_table"], 1),
        "user_vectors_users_per_s": round(users / seconds["user_vectors"], 1),
        "scoring_user_items_per_s": round(users * items / seconds["scores_and_ranks"], 1),
        "gpu_peak_mb": gpu_peak_mb(dev), "host_peak_rss_mb": host_peak_rss_mb(),
        "note": "complete full-rank evaluation = item table + user vectors + scores/mask/ranks (seconds.total); "
                "history masked; the catalogue's items repeat the synthetic cache's rows (same compute per item)",
    }
