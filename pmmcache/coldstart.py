"""Cold-start evaluation (paper IV-A and IV-F2, Table VII): how well a run ranks items it barely saw.

An item is cold when it occurs fewer than `threshold` (paper: 10) times in the training data, i.e. in
the training parts seq[:-2] of all users (`PreparedDataset.train_item_counts`). Every prefix of a
user's COMPLETE sequence that ends with a cold item is a test case: history = the items before it
(the last `max_len`, left-padded with 0), target = that cold item. A prefix with nothing before the
cold item has no history to encode and is skipped. Scoring is the regular full ranking over every
item (`evaluate.run` with `cold_start`), history masked by default.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from pmmcache.data.prepare import PreparedDataset
from pmmcache.errors import ConfigError

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
    histories, targets = dataset.prefix_cases(cold, max_len)
    return ColdStartCases(histories=histories, targets=targets, cold_items=int(cold.sum()),
                          cold_targets=len(np.unique(targets)))
