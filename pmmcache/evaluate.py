"""Full-ranking evaluation: every item through the item tower once, every user against every item.

Leave-one-out (paper IV-A): valid = history seq[:-2] -> target seq[-2]; test = history seq[:-1] ->
target seq[-1]. The user's history is masked out before ranking (PMMRec; `mask_history=False` gives
RecBole's default). Work is sharded across Accelerate processes: items for the item table, users for
the scores; the per-user metrics are gathered, so the numbers do not depend on the process count.

`run(EvalConfig)` is what `pmmcache eval` calls: a trained run's best model on valid and test
(`full_rank`) and on the cold-start cases of `pmmcache.coldstart` (`cold_start`), all against one item
table. The model's passes (item table, user vectors) run under `eval_autocast`: bf16 on CUDA unless
fp32 is asked for, fp32 on a CPU. Scores are dot products of the fp32 vectors (bf16's 8-bit mantissa
would tie neighbouring scores and move the ranks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Literal

import numpy as np
import torch
from accelerate import Accelerator

from pmmcache.coldstart import DEFAULT_THRESHOLD, cold_start_cases
from pmmcache.config import load_file
from pmmcache.errors import ConfigError
from pmmcache.files import write_json
from pmmcache.items import ItemStore
from pmmcache.metrics import (full_rank_metrics, metric_names, popularity_diagnostics, popularity_percentiles,
                              rank_metrics, summarize, top_k_items)
from pmmcache.model import PMMRec
from pmmcache.runs import Setup, load_run


EVAL_PRECISIONS = ("bf16", "fp32")
EvalPrecision = Literal["bf16", "fp32"]


def autocast_dtype(device: torch.device, precision: str = "bf16") -> torch.dtype | None:
    """The dtype the evaluation's model passes autocast to on `device`, None for plain fp32: bf16 only
    on CUDA (a CPU's bf16 matmuls are rarely faster, and its figures stay comparable with training's)."""
    if precision not in EVAL_PRECISIONS:
        raise ConfigError(f"evaluation precision {precision!r}: use one of {', '.join(EVAL_PRECISIONS)}")
    return torch.bfloat16 if device.type == "cuda" and precision == "bf16" else None


def eval_autocast(device: torch.device, precision: str = "bf16") -> ContextManager[Any]:
    """The autocast context of the evaluation's model passes (see `autocast_dtype`)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _shard(n: int, accelerator: Accelerator | None) -> tuple[int, int]:
    if accelerator is None or accelerator.num_processes == 1:
        return 0, n
    per = -(-n // accelerator.num_processes)
    start = min(n, accelerator.process_index * per)
    return start, min(n, start + per)


@torch.no_grad()
def item_table(model: PMMRec, store: ItemStore, batch_size: int = 512,
               accelerator: Accelerator | None = None, precision: str = "fp32") -> torch.Tensor:
    """(N + 1, d) fp32 vectors of every item (row 0, padding, is zeros), each item encoded once, the
    item tower under `eval_autocast(device, precision)`."""
    device = accelerator.device if accelerator else next(model.parameters()).device
    n = store.num_items
    start, end = _shard(n, accelerator)
    parts = []
    for first in range(start + 1, end + 1, batch_size):
        index = torch.arange(first, min(first + batch_size, end + 1))
        with eval_autocast(device, precision):
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
def user_vectors(model: PMMRec, table: torch.Tensor, histories: torch.Tensor, batch_size: int = 1024,
                 precision: str = "fp32") -> torch.Tensor:
    """(U, d) fp32 last-position user states for left-padded `histories` (U, L) of item indices, the user
    encoder under `eval_autocast(device, precision)`."""
    out = []
    for first in range(0, len(histories), batch_size):
        ids = histories[first:first + batch_size].to(table.device)
        with eval_autocast(table.device, precision):
            out.append(model.user_vectors(table[ids], ids == 0).float())
    return torch.cat(out) if out else torch.zeros(0, table.shape[1], device=table.device)


@torch.no_grad()
def evaluate_splits(model: PMMRec, store: ItemStore, dataset: Any, splits: tuple[str, ...] = ("valid", "test"),
                    ks: tuple[int, ...] = (10, 20, 50), max_len: int | None = None, mask_history: bool = True,
                    accelerator: Accelerator | None = None, item_batch_size: int = 512,
                    score_batch_size: int = 1024, precision: str = "fp32",
                    table: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """HR@k and NDCG@k per split, full ranking over all items; the item table is built once (or is
    `table`, an `item_table` of this model and store, shared with other evaluations)."""
    was_training = model.training
    model.eval()
    if table is None:
        table = item_table(model, store, item_batch_size, accelerator, precision)
    counts = torch.from_numpy(np.asarray(dataset.train_item_counts()))
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        histories, targets = dataset.split_arrays(split, max_len)
        results[split] = evaluate_cases(model, table, histories, targets, ks, mask_history, accelerator,
                                        score_batch_size, popularity=counts, precision=precision)
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
                   popularity: torch.Tensor | None = None, precision: str = "fp32") -> dict[str, float]:
    """Mean HR@k / NDCG@k of test cases (left-padded histories (C, L) -> targets (C,)) against `table`
    (N + 1, d), full ranking; cases are sharded across processes and the per-case metrics gathered.
    With `popularity` ((N + 1,) training counts) also PopPct@k and Coverage@k of the recommended
    top k (`metrics.popularity_diagnostics`). The model must already be in eval mode; `precision` is
    the user encoder's (`eval_autocast`)."""
    histories, targets = torch.as_tensor(histories).long(), torch.as_tensor(targets).long()
    start, end = _shard(len(targets), accelerator)
    users = user_vectors(model, table, histories[start:end], batch_size, precision)
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


@dataclass(frozen=True)
class EvalConfig:
    """`pmmcache eval`: a trained run's best model, every item ranked for every case."""

    run: Path
    full_rank: bool = True  # valid and test (leave-one-out) -> <run>/eval-full-rank.json
    cold_start: bool = False  # prefixes ending with a cold item (Table VII) -> <run>/eval-cold-start.json
    cold_threshold: int = DEFAULT_THRESHOLD  # items with fewer training occurrences are cold
    dataset: str | None = None  # evaluate on another dataset than the run's (its items must be in a cache)
    cache_dataset: str | None = None  # which extracted cache holds the items; None: the run's saved one
    mask_history: bool = True  # False: RecBole's protocol
    output: Path | None = None  # the JSON of the one mode asked for, instead of the run's file
    storage: Literal["auto", "memmap", "ram", "gpu"] | None = None  # where the cache is read from; None: the run's
    precision: EvalPrecision = "bf16"  # autocast of the model's passes on CUDA; a CPU always runs fp32

    def __post_init__(self) -> None:
        if not (self.full_rank or self.cold_start):
            raise ConfigError("nothing to evaluate: set full_rank and/or cold_start")
        if self.full_rank and self.cold_start and self.output:
            raise ConfigError("--output names one file: give it with only one of --full-rank / --cold-start")
        if self.cold_threshold < 1:
            raise ConfigError(f"cold-start threshold must be >= 1, got {self.cold_threshold}")
        autocast_dtype(torch.device("cpu"), self.precision)  # names a bad precision


def run(config: EvalConfig, show: bool = True) -> dict[str, dict[str, Any]]:
    """Evaluate a run's best model (loaded once) in the modes `config` asks for; writes each mode's
    JSON and returns the records as {"full_rank": ..., "cold_start": ...} (the modes asked for).
    Every item goes through the item tower once: valid, test and cold start share the table."""
    run_dir = Path(config.run)
    s, accelerator = load_run(run_dir, config.dataset, config.mask_history, storage=config.storage,
                              cache_dataset=config.cache_dataset)
    table = item_table(s.model, s.store, accelerator=accelerator, precision=config.precision)
    records: dict[str, dict[str, Any]] = {}
    if config.full_rank:
        records["full_rank"] = _full_rank(run_dir, s, accelerator, config, table, show)
    if config.cold_start:
        records["cold_start"] = _cold_start(run_dir, s, accelerator, config, table, show)
    return records


def _full_rank(run_dir: Path, s: Setup, accelerator: Accelerator, config: EvalConfig, table: torch.Tensor,
               show: bool) -> dict[str, Any]:
    """Valid and test of the run's dataset, beside popularity ranking."""
    run, mask_history = s.config, config.mask_history
    results = evaluate_splits(s.model, s.store, s.dataset, ("valid", "test"), run.ks, run.max_len, mask_history,
                              accelerator, precision=config.precision, table=table)
    popular = popularity_ranking(s.dataset, ("valid", "test"), run.ks, run.max_len, mask_history)
    record = {"run": str(run_dir), "dataset": run.dataset, "mask_history": mask_history,
              "precision": _precision_used(accelerator, config), "items": s.store.num_items, "metrics": results, "popularity_ranking": popular,
              "random_HR@10": random_ranking_hr(s.store.num_items, 10)}
    if accelerator.is_main_process:
        target = Path(config.output) if config.output else run_dir / "eval-full-rank.json"
        write_json(target, record)
        if show:
            print(format_with_popularity(results, popular, run.ks))
            print(f"{s.store.num_items} items, history {'masked' if mask_history else 'not masked'}; wrote {target}")
    return record


def _precision_used(accelerator: Accelerator, config: EvalConfig) -> str:
    return "bf16" if autocast_dtype(accelerator.device, config.precision) == torch.bfloat16 else "fp32"


def _cold_start(run_dir: Path, s: Setup, accelerator: Accelerator, config: EvalConfig, table: torch.Tensor,
                show: bool) -> dict[str, Any]:
    """The cold-start cases of the run's dataset (`coldstart.cold_start_cases`), full ranking.

    Record: {"metrics": {"HR@10": ..., ...}, "cases", "cold_items", "cold_targets", "threshold",
    "mask_history", "items", "dataset", "run", "config"}."""
    run, threshold, mask_history = s.config, config.cold_threshold, config.mask_history
    cases = cold_start_cases(s.dataset, threshold, run.max_len)
    metrics = evaluate_cases(s.model, table, cases.histories, cases.targets, run.ks, mask_history, accelerator,
                             precision=config.precision)
    record = {"run": str(run_dir), "dataset": run.dataset, "threshold": threshold, "mask_history": mask_history,
              "precision": _precision_used(accelerator, config),
              "cases": cases.cases, "cold_items": cases.cold_items, "cold_targets": cases.cold_targets,
              "items": s.store.num_items, "metrics": metrics, "config": load_file(run_dir / "config.json")}
    if accelerator.is_main_process:
        target = Path(config.output) if config.output else run_dir / "eval-cold-start.json"
        write_json(target, record)
        if show:
            print(format_table({"cold": metrics}, run.ks))
            print(f"{cases.cases} cold-start cases ending in {cases.cold_targets} of {cases.cold_items} cold items "
                  f"(< {threshold} training occurrences), {s.store.num_items} items ranked, "
                  f"history {'masked' if mask_history else 'not masked'}; wrote {target}")
            if not cases.cases:
                print("no cold-start cases: every item that ends a prefix occurs often enough in training")
    return record
