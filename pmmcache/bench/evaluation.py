"""Evaluation benchmark: a complete full-rank evaluation of U users over a catalogue of N items.

The parts `pmmcache eval --full-rank` runs (`pmmcache.evaluate`): the item table (every item through
the top blocks + fusion once, in batches), the user vectors (user encoder over each history), and
`full_rank_metrics` (users x items scores in batched matmuls on the device, history masked, target
ranks -> HR/NDCG). Items are read from a synthetic cache of `cache_rows` rows; the catalogue's items
map onto those rows cyclically, so a 100k-item catalogue needs no 15 GB cache (per-item compute is
the same whatever the states hold). The model's passes run under `pmmcache.evaluate.eval_autocast`, as
`pmmcache eval` does (bf16 on CUDA by default, fp32 on a CPU).

Then the scoring alone at `scoring_items` (default 100k, on a CPU too): `full_rank_metrics` of random
user and item vectors, so the catalogue-size scoring figure needs no 100k-item table on a CPU.
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
from pmmcache.errors import ConfigError


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
                   scoring_items: int = 100_000, **size_options: Any) -> dict[str, Any]:
    """Seconds of each part of a full-rank evaluation, items/s of the item table, users x items/s of the
    scoring, and users x items/s of scoring `scoring_items` random item vectors; one JSON-able dict."""
    from pmmcache.evaluate import EVAL_PRECISIONS, autocast_dtype, item_table, user_vectors
    from pmmcache.metrics import full_rank_metrics, summarize

    dev = resolve_device(device)
    size = default_size(dev, **size_options)
    on_gpu = dev.type == "cuda"
    items = items or (100_000 if on_gpu else 2_000)
    users = users or (100_000 if on_gpu else 2_000)
    cache_rows = min(items, cache_rows or (10_000 if on_gpu else 1_000))
    precision = "bf16" if precision == "auto" else precision  # auto: `pmmcache eval`'s default
    if precision not in EVAL_PRECISIONS:
        raise ConfigError(f"bench eval --precision {precision}: evaluation runs {' or '.join(EVAL_PRECISIONS)}")
    used = "bf16" if autocast_dtype(dev, precision) == torch.bfloat16 else "fp32"

    text, vision = build_encoders(size, seed)
    model = build_model(size, text, vision, history + 1, nid_head=False).to(dev).eval()
    rng = np.random.default_rng(seed)
    histories = torch.from_numpy(rng.integers(1, items + 1, size=(users, history)))  # (U, H), full histories
    targets = torch.from_numpy(rng.integers(1, items + 1, size=users))  # (U,)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "bench-eval.h5"
        write_synthetic_cache(path, cache_rows, size.text_tokens, size.image_tokens, size.dim, seed=seed)
        store = CyclicStore(cache_io.CacheReader(path, storage=storage, device=dev), items)

        def scored(users_: torch.Tensor, table: torch.Tensor, targets_: torch.Tensor, histories_: torch.Tensor) -> None:
            per_user = full_rank_metrics(users_, table, targets_.to(dev), histories_.to(dev), ks=(10, 20, 50),
                                         batch_size=score_batch_size, mask_history=True)
            summarize(per_user)  # brings the means to the host: the scoring is done

        def evaluate() -> dict[str, float]:
            seconds = {}
            clock = time.perf_counter()
            table = item_table(model, store, item_batch_size, precision=precision)  # (N + 1, d) float32
            synchronize(dev)
            seconds["item_table"] = time.perf_counter() - clock
            users_ = user_vectors(model, table, histories, score_batch_size, precision)  # (U, d)
            synchronize(dev)
            seconds["user_vectors"] = time.perf_counter() - clock - seconds["item_table"]
            scored(users_, table, targets, histories)
            seconds["scores_and_ranks"] = time.perf_counter() - clock - seconds["item_table"] - seconds["user_vectors"]
            seconds["total"] = time.perf_counter() - clock
            return seconds

        # Scoring alone at catalogue size: random vectors of the model's width (the scores cost the same).
        generator = torch.Generator().manual_seed(seed)
        big_table = torch.randn(scoring_items + 1, size.dim, generator=generator).to(dev)  # (N' + 1, d)
        big_users = torch.randn(users, size.dim, generator=generator).to(dev)
        big_histories = torch.from_numpy(rng.integers(1, scoring_items + 1, size=(users, history)))
        big_targets = torch.from_numpy(rng.integers(1, scoring_items + 1, size=users))

        def score_at_scale() -> float:
            clock = time.perf_counter()
            scored(big_users, big_table, big_targets, big_histories)
            return time.perf_counter() - clock

        with torch.no_grad():
            evaluate()  # warm-up (kernels, allocator, page cache)
            reset_gpu_peak(dev)
            seconds = evaluate()
            score_at_scale()
            scale_seconds = score_at_scale()
    return {
        "bench": "eval", "machine": machine(), "device": str(dev), "precision": used,
        "size": size.__dict__ | {"image_tokens": size.image_tokens}, "items": items, "users": users,
        "history": history, "cache_rows": cache_rows, "storage": store.reader.storage,
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "item_table_items_per_s": round(items / seconds["item_table"], 1),
        "user_vectors_users_per_s": round(users / seconds["user_vectors"], 1),
        "scoring_user_items_per_s": round(users * items / seconds["scores_and_ranks"], 1),
        "scoring_at_scale": {"items": scoring_items, "users": users, "seconds": round(scale_seconds, 6),
                             "user_items_per_s": round(users * scoring_items / scale_seconds, 1),
                             "vectors": "random, fp32 (scores, history mask, ranks as full_rank_metrics)"},
        "gpu_peak_mb": gpu_peak_mb(dev), "host_peak_rss_mb": host_peak_rss_mb(),
        "note": "complete full-rank evaluation = item table + user vectors + scores/mask/ranks (seconds.total); "
                "history masked; the catalogue's items repeat the synthetic cache's rows (same compute per item)",
    }
