"""Cold-start evaluation (paper IV-A and IV-F2, Table VII): how well a run ranks items it barely saw.

An item is cold when it occurs fewer than `threshold` (paper: 10) times in the training data, i.e. in
the training parts seq[:-2] of all users (`PreparedDataset.train_item_counts`). Every prefix of a
user's COMPLETE sequence that ends with a cold item is a test case: history = the items before it
(the last `max_len`, left-padded with 0), target = that cold item. A prefix with nothing before the
cold item has no history to encode and is skipped. Scoring is the regular full ranking over every
item (`evaluate.evaluate_cases`), history masked by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pmmcache.config import load_file
from pmmcache.data.prepare import PreparedDataset, _left_padded, _ranges
from pmmcache.errors import ConfigError
from pmmcache.files import write_json

DEFAULT_THRESHOLD = 10  # paper IV-A: "less than 10 occurrences"


@dataclass(frozen=True)
class ColdStartCases:
    """Test cases of the cold-start setting, one row per case."""

    histories: np.ndarray  # (C, max_len) int32 item indices, left-padded with 0
    targets: np.ndarray  # (C,) int32 cold item indices
    cold_items: int  # catalogue items below the threshold (some may never end a case)
    cold_targets: int  # distinct cold items that end at least one case

    @property
    def cases(self) -> int:
        return len(self.targets)


def cold_item_mask(dataset: PreparedDataset, threshold: int = DEFAULT_THRESHOLD) -> np.ndarray:
    """(N + 1,) bool: True for items with fewer than `threshold` training occurrences (padding: False)."""
    if threshold < 1:
        raise ConfigError(f"cold-start threshold must be >= 1, got {threshold}")
    cold = dataset.train_item_counts() < threshold
    cold[0] = False
    return cold


def cold_start_cases(dataset: PreparedDataset, threshold: int = DEFAULT_THRESHOLD,
                     max_len: int | None = None) -> ColdStartCases:
    """Every prefix of a complete user sequence that ends with a cold item (see the module docstring)."""
    max_len = dataset.config.max_history if max_len is None else max_len
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    cold = cold_item_mask(dataset, threshold)
    values, starts, ends = dataset._sequences()
    positions = _ranges(starts, ends)  # (V,) every position of every sequence in `values`
    owners = np.repeat(np.arange(len(starts)), ends - starts)  # (V,) its user
    case = cold[values[positions]] & (positions > starts[owners])  # a cold item with something before it
    positions, owners = positions[case], owners[case]
    histories = _left_padded(values, starts[owners], positions, max_len)
    targets = values[positions].astype(np.int32)
    return ColdStartCases(histories=histories, targets=targets, cold_items=int(cold.sum()),
                          cold_targets=len(np.unique(targets)))


def evaluate_run(run_dir: str | Path, threshold: int = DEFAULT_THRESHOLD, mask_history: bool = True,
                 output: str | Path | None = None, dataset: str | None = None, show: bool = False,
                 loaded: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """HR@k / NDCG@k of a run's best model on the cold-start cases of its dataset.

    Writes `<run>/eval-cold-start.json` (or `output`) and returns the same record:
    {"metrics": {"HR@10": ..., "NDCG@10": ..., ...}, "cases", "cold_items", "cold_targets", "threshold",
    "mask_history", "items", "dataset", "run", "config"}. `loaded` is `evaluate.load_run(run_dir, dataset,
    mask_history)`'s result when the caller has it already (the model is then not loaded twice).
    """
    from pmmcache.evaluate import evaluate_cases, format_table, item_table, load_run

    run_dir = Path(run_dir)
    s, accelerator = loaded or load_run(run_dir, dataset, mask_history)
    config = s.config
    cases = cold_start_cases(s.dataset, threshold, config.max_len)
    table = item_table(s.model, s.store, accelerator=accelerator)
    metrics = evaluate_cases(s.model, table, cases.histories, cases.targets, config.ks, mask_history, accelerator)
    record = {"run": str(run_dir), "dataset": config.dataset, "threshold": threshold, "mask_history": mask_history,
              "cases": cases.cases, "cold_items": cases.cold_items, "cold_targets": cases.cold_targets,
              "items": s.store.num_items, "metrics": metrics, "config": load_file(run_dir / "config.json")}
    if accelerator.is_main_process:
        target = Path(output) if output else run_dir / "eval-cold-start.json"
        write_json(target, record)
        if show:
            print(format_table({"cold": metrics}, config.ks))
            print(f"{cases.cases} cold-start cases ending in {cases.cold_targets} of {cases.cold_items} cold items "
                  f"(< {threshold} training occurrences), {s.store.num_items} items ranked, "
                  f"history {'masked' if mask_history else 'not masked'}; wrote {target}")
            if not cases.cases:
                print("no cold-start cases: every item that ends a prefix occurs often enough in training")
    return record
