"""Cold-start case construction (paper IV-F2) on a hand-made dataset whose cases are listed by hand."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pmmcache.coldstart import cold_item_mask, cold_start_cases
from pmmcache.data.prepare import ITEM_SCHEMA, USER_SCHEMA, PrepareConfig, PreparedDataset
from pmmcache.errors import ConfigError

# Whole sequences, oldest first; the training parts are seq[:-2].
SEQUENCES = {
    "u1": [1, 2, 3, 1, 2, 5, 6],  # training part 1 2 3 1 2
    "u2": [5, 1, 2, 4, 1],  # training part 5 1 2
    "u3": [3, 1, 2, 6, 3],  # training part 3 1 2
    "u4": [4, 4, 1, 2],  # training part 4 4
}
# Training occurrences: item 1: 4, item 2: 4, item 3: 2, item 4: 2, item 5: 1, item 6: 0 (only after seq[:-2]).
TRAIN_COUNTS = [0, 4, 4, 2, 2, 1, 0]


def hand_made(max_history: int = 20) -> PreparedDataset:
    n = len(TRAIN_COUNTS) - 1
    items = pa.table({"index": list(range(1, n + 1)), "key": [f"s/i{i}" for i in range(1, n + 1)],
                      "source": ["s"] * n, "text": [f"item {i}" for i in range(1, n + 1)],
                      "image_store": [-1] * n, "image_key": [None] * n}, schema=ITEM_SCHEMA)
    users = pa.table({"key": [f"s/{u}" for u in SEQUENCES], "source": ["s"] * len(SEQUENCES),
                      "items": list(SEQUENCES.values())}, schema=USER_SCHEMA)
    return PreparedDataset(name="s", items=items, users=users, image_stores=[],
                           config=PrepareConfig(min_core=0, max_history=max_history), report={})


def as_cases(cases) -> list[tuple[list[int], int]]:
    return [(h.tolist(), int(t)) for h, t in zip(cases.histories, cases.targets)]


def test_counts_come_from_the_training_parts_only():
    assert hand_made().train_item_counts().tolist() == TRAIN_COUNTS


def test_every_prefix_ending_in_a_cold_item_is_a_case_with_its_last_max_len_items_as_history():
    # threshold 4: items 1 and 2 occur exactly 4 times, so they are NOT cold; 3, 4, 5, 6 are.
    cases = cold_start_cases(hand_made(), threshold=4, max_len=3)
    assert as_cases(cases) == [
        # u1: 1 2 [3] 1 2 [5] [6]
        ([0, 1, 2], 3),
        ([3, 1, 2], 5),  # history 1 2 3 1 2 truncated to its last 3 items
        ([1, 2, 5], 6),  # item 6 never occurs in training (count 0): cold
        # u2: [5] 1 2 [4] 1 -- the cold 5 at the first position has no history: skipped
        ([5, 1, 2], 4),
        # u3: [3] 1 2 [6] [3] -- the first 3 skipped; the repeated cold 3 is a case again
        ([3, 1, 2], 6),
        ([1, 2, 6], 3),
        # u4: [4] [4] 1 2 -- the first 4 skipped, the repeat with the first as history
        ([0, 0, 4], 4),
    ]
    assert cases.cases == 7 and cases.cold_items == 4 and cases.cold_targets == 4
    assert cases.histories.dtype == np.int32 and cases.targets.dtype == np.int32


def test_an_item_at_the_threshold_is_warm_and_becomes_cold_one_above_it():
    dataset = hand_made()
    assert cold_item_mask(dataset, 4).tolist() == [False, False, False, True, True, True, True]
    assert cold_item_mask(dataset, 5).tolist() == [False, True, True, True, True, True, True]
    assert cold_item_mask(dataset, 1).tolist() == [False] * 6 + [True]  # only the never-trained item 6
    warm_at_4 = cold_start_cases(dataset, threshold=4, max_len=3)
    cold_at_5 = cold_start_cases(dataset, threshold=5, max_len=3)
    assert 1 not in warm_at_4.targets and 2 not in warm_at_4.targets
    # At 5 every position but the first of each sequence is a case: 6 + 4 + 4 + 3.
    assert cold_at_5.cases == 17 and cold_at_5.cold_items == 6
    assert as_cases(cold_start_cases(dataset, threshold=1, max_len=3)) == [([1, 2, 5], 6), ([3, 1, 2], 6)]


def test_max_len_defaults_to_the_datasets_history_length_and_longer_histories_are_not_cut():
    cases = cold_start_cases(hand_made(max_history=6), threshold=4)
    assert cases.histories.shape == (7, 6)
    assert cases.histories[2].tolist() == [1, 2, 3, 1, 2, 5]  # u1's whole prefix before 6
    assert cases.histories[0].tolist() == [0, 0, 0, 0, 1, 2]


def test_bad_settings_are_errors_naming_them():
    with pytest.raises(ConfigError, match="threshold"):
        cold_start_cases(hand_made(), threshold=0)
    with pytest.raises(ConfigError, match="max_len"):
        cold_start_cases(hand_made(), threshold=4, max_len=0)
