"""Full-ranking evaluation: every item through the item tower once, every user against every item.

Leave-one-out (paper IV-A): valid = history seq[:-2] -> target seq[-2]; test = history seq[:-1] ->
target seq[-1]. The user's history is masked out before ranking (PMMRec; `mask_history=False` gives
RecBole's default). Work is sharded across Accelerate processes: items for the item table, users for
the scores; the per-user metrics are gathered, so the numbers do not depend on the process count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from pmmcache.items import ItemStore
from pmmcache.metrics import (full_rank_metrics, metric_names, popularity_diagnostics, popularity_percentiles,
                              rank_metrics, summarize, top_k_items)
from pmmcache.model import PMMRec


def _shard(n: int, accelerator: Accelerator | None) -> tuple[int, int]:
    if accelerator is None or accelerator.num_processes == 1:
        return 0, n
    per = -(-n // accelerator.num_processes)
    start = min(n, accelerator.process_index * per)
    return start, min(n, start + per)


@torch.no_grad()
def item_table(model: PMMRec, store: ItemStore, batch_size: int = 512,
               accelerator: Accelerator | None = None) -> torch.Tensor:
    """(N + 1, d) vectors of every item (row 0, padding, is zeros), each item encoded once."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    n = store.num_items
    start, end = _shard(n, accelerator)
    parts = []
    for first in range(start + 1, end + 1, batch_size):
        index = torch.arange(first, min(first + batch_size, end + 1))
        parts.append(model.encode_items(store.get(index)).vector.float())
    d = model.config.user_encoder.d_model
    mine = torch.cat(parts) if parts else torch.zeros(0, d, device=device)
    return torch.cat([torch.zeros(1, d, device=device), _gather_shards(mine, n, accelerator)])


def _gather_shards(mine: torch.Tensor, n: int, accelerator: Accelerator | None) -> torch.Tensor:
    """Concatenate every process's contiguous shard (see `_shard`) into the full (n, ...) tensor."""
    if accelerator is None or accelerator.num_processes == 1:
        return mine
    per = -(-n // accelerator.num_processes)
    padded = mine.new_zeros((per,) + tuple(mine.shape[1:]))
    padded[: len(mine)] = mine
    return accelerator.gather(padded)[:n]


@torch.no_grad()
def user_vectors(model: PMMRec, table: torch.Tensor, histories: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """(U, d) last-position user states for left-padded `histories` (U, L) of item indices."""
    out = []
    for first in range(0, len(histories), batch_size):
        ids = histories[first:first + batch_size].to(table.device)
        out.append(model.user_vectors(table[ids], ids == 0).float())
    return torch.cat(out) if out else torch.zeros(0, table.shape[1], device=table.device)


@torch.no_grad()
def evaluate_splits(model: PMMRec, store: ItemStore, dataset: Any, splits: tuple[str, ...] = ("valid", "test"),
                    ks: tuple[int, ...] = (10, 20, 50), max_len: int | None = None, mask_history: bool = True,
                    accelerator: Accelerator | None = None, item_batch_size: int = 512,
                    score_batch_size: int = 1024) -> dict[str, dict[str, float]]:
    """HR@k and NDCG@k per split, full ranking over all items; the item table is built once."""
    was_training = model.training
    model.eval()
    table = item_table(model, store, item_batch_size, accelerator)
    counts = torch.from_numpy(np.asarray(dataset.train_item_counts()))
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        histories, targets = dataset.split_arrays(split, max_len)
        results[split] = evaluate_cases(model, table, histories, targets, ks, mask_history, accelerator,
                                        score_batch_size, popularity=counts)
        results[split]["users"] = len(targets)
    model.train(was_training)
    return results


def popularity_ranking(dataset: Any, splits: tuple[str, ...] = ("valid", "test"), ks: tuple[int, ...] = (10, 20, 50),
                       max_len: int | None = None, mask_history: bool = True) -> dict[str, dict[str, float]]:
    """The same metrics for ranking every user's candidates by training popularity: the floor a
    recommender must clear (a content model below it has learned less than item counts know)."""
    counts = torch.from_numpy(np.asarray(dataset.train_item_counts())).float()  # (N + 1,)
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        histories, targets = (torch.as_tensor(a).long() for a in dataset.split_arrays(split, max_len))
        users = torch.ones(len(targets), 1)  # every user scores item i as counts[i]
        per_case = full_rank_metrics(users, counts[:, None], targets, histories, ks=ks, mask_history=mask_history)
        results[split] = {**summarize(per_case), "users": len(targets)}
    return results


@torch.no_grad()
def evaluate_cases(model: PMMRec, table: torch.Tensor, histories: np.ndarray | torch.Tensor,
                   targets: np.ndarray | torch.Tensor, ks: tuple[int, ...] = (10, 20, 50), mask_history: bool = True,
                   accelerator: Accelerator | None = None, batch_size: int = 1024,
                   popularity: torch.Tensor | None = None) -> dict[str, float]:
    """Mean HR@k / NDCG@k of test cases (left-padded histories (C, L) -> targets (C,)) against `table`
    (N + 1, d), full ranking; cases are sharded across processes and the per-case metrics gathered.
    With `popularity` ((N + 1,) training counts) also PopPct@k and Coverage@k of the recommended
    top k (`metrics.popularity_diagnostics`). The model must already be in eval mode."""
    histories, targets = torch.as_tensor(histories).long(), torch.as_tensor(targets).long()
    start, end = _shard(len(targets), accelerator)
    users = user_vectors(model, table, histories[start:end], batch_size)
    mine_histories, mine_targets = histories[start:end].to(table.device), targets[start:end].to(table.device)
    if popularity is None:
        per_case = full_rank_metrics(users, table, mine_targets, mine_histories, ks=ks, batch_size=batch_size,
                                     mask_history=mask_history)
    else:  # each chunk's scores serve both the metrics and the top-k diagnostics: scored once
        items, chunks, top = table.float(), [], []
        for i in range(0, len(users), batch_size):
            scores = users[i:i + batch_size].float() @ items.T  # (b, N + 1)
            exclude = mine_histories[i:i + batch_size] if mask_history else None
            chunks.append(rank_metrics(scores, mine_targets[i:i + batch_size], ks, exclude))
            top.append(top_k_items(scores, max(ks), exclude))
        per_case = ({name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]} if chunks else
                    {name: users.new_zeros(0) for name in metric_names(ks)})
    per_case = {name: _gather_shards(values, len(targets), accelerator) for name, values in per_case.items()}
    summary = summarize(per_case)
    if popularity is not None:
        mine = torch.cat(top) if top else torch.zeros(0, max(ks), dtype=torch.long, device=table.device)
        everyone = _gather_shards(mine, len(targets), accelerator)  # (C, K)
        summary.update(popularity_diagnostics(everyone, popularity_percentiles(popularity.cpu()),
                                              table.shape[0] - 1, ks))
    return summary


def random_ranking_hr(num_items: int, k: int = 10) -> float:
    """Expected HR@k of a uniformly random ranking over the catalogue (history not masked)."""
    return min(1.0, k / num_items)


def format_diagnostics(results: dict[str, dict[str, float]], k: int = 10) -> str:
    """One line per split: how popular (percentile, 50 = catalogue mean) and how varied the top k are."""
    lines = []
    for split, metrics in results.items():
        if f"PopPct@{k}" in metrics:
            lines.append(f"{split}: top-{k} popularity percentile {metrics[f'PopPct@{k}']:.1f} "
                         f"(catalogue mean 50), catalogue coverage@{k} {metrics[f'Coverage@{k}']:.3f}")
    return "\n".join(lines)


def format_with_popularity(results: dict[str, dict[str, float]], popular: dict[str, dict[str, float]],
                           ks: tuple[int, ...] = (10, 20, 50)) -> str:
    """The metrics table with popularity ranking's rows (`pop:<split>`) under the model's, then the
    diagnostics of the model's top 10."""
    return (format_table({**results, **{f"pop:{split}": v for split, v in popular.items()}}, ks) + "\n"
            + format_diagnostics(results))


def format_table(results: dict[str, dict[str, float]], ks: tuple[int, ...] = (10, 20, 50)) -> str:
    names = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")]
    width = max([8] + [len(split) + 1 for split in results])
    lines = [f"{'split':<{width}}" + "".join(f"{n:>10}" for n in names)]
    for split, metrics in results.items():
        lines.append(f"{split:<{width}}" + "".join(f"{metrics.get(n, float('nan')):>10.4f}" for n in names))
    return "\n".join(lines)


def load_run(run_dir: Path, dataset: str | None = None, mask_history: bool = True,
             accelerator: Accelerator | None = None, storage: str | None = None) -> tuple[Any, Accelerator]:
    """A trained run's best model, item store and dataset (`train.Setup`, model on the device, in eval
    mode), rebuilt from its config.json; `dataset` evaluates on another dataset than the run's;
    `storage` overrides where the cache is read from (memmap: no copy, for one pass over the items)."""
    from pmmcache.runtime import use_cpu
    from pmmcache.train import trained_setup

    changes: dict[str, Any] = {"mask_history": mask_history}
    if dataset:
        changes["dataset"] = dataset
    if storage:
        changes["storage"] = storage
    accelerator = accelerator or Accelerator(cpu=use_cpu())
    s = trained_setup(Path(run_dir), accelerator.device, **changes)
    s.model.to(accelerator.device).eval()
    return s, accelerator


def run_cli(run_dir: Path, dataset: str | None = None, mask_history: bool = True, output: Path | None = None,
            show: bool = True, loaded: tuple[Any, Accelerator] | None = None) -> dict[str, Any]:
    """`pmmcache eval --full-rank`: a run's best model on valid and test; prints a table, writes JSON.
    `loaded` is `load_run(run_dir, dataset, mask_history)`'s result when the caller has it already."""
    import json

    s, accelerator = loaded or load_run(run_dir, dataset, mask_history)
    config, model = s.config, s.model
    results = evaluate_splits(model, s.store, s.dataset, ("valid", "test"), config.ks, config.max_len,
                              mask_history, accelerator)
    popular = popularity_ranking(s.dataset, ("valid", "test"), config.ks, config.max_len, mask_history)
    record = {"run": str(run_dir), "dataset": config.dataset, "mask_history": mask_history,
              "items": s.store.num_items, "metrics": results, "popularity_ranking": popular,
              "random_HR@10": random_ranking_hr(s.store.num_items, 10)}
    if accelerator.is_main_process:
        target = output or run_dir / "eval-full-rank.json"
        target.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if show:
            print(format_with_popularity(results, popular, config.ks))
            print(f"{s.store.num_items} items, history {'masked' if mask_history else 'not masked'}; wrote {target}")
    return record
