"""NID corruption: counts, label consistency, padding, determinism and statistics over many draws."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from pmmcache.corruption import corrupt_sequences, corruption_counts


def unique_item_batch(seed, batch=32, length=21, min_length=3):
    """Left-padded rows of distinct items per row (items may repeat across rows)."""
    generator = torch.Generator().manual_seed(seed)
    item_ids = torch.zeros(batch, length, dtype=torch.long)
    lengths = torch.randint(min_length, length + 1, (batch,), generator=generator)
    lengths[0] = length  # at least one full row
    for row, n in enumerate(lengths.tolist()):
        item_ids[row, length - n :] = torch.randperm(200, generator=generator)[:n] + 1
    return item_ids


def check_consistent(item_ids, corrupted, labels):
    """Every label agrees with what happened at its position."""
    pad = item_ids == 0
    assert (corrupted[pad] == 0).all() and (labels[pad] == -100).all()
    assert ((labels == 0) == (~pad & (corrupted == item_ids))).all()
    assert (corrupted[labels == 1] != item_ids[labels == 1]).all()
    assert (corrupted[labels == 2] != item_ids[labels == 2]).all()
    pool = set(item_ids[~pad].tolist())
    assert set(corrupted[labels == 2].tolist()) <= pool
    for row in range(item_ids.shape[0]):
        # Shuffled items come from the same row; with replacements undone the row is a permutation.
        shuffled = labels[row] == 1
        assert set(corrupted[row][shuffled].tolist()) <= set(item_ids[row][~pad[row]].tolist())
        restored = torch.where(labels[row] == 2, item_ids[row], corrupted[row])
        assert sorted(restored.tolist()) == sorted(item_ids[row].tolist())


@pytest.mark.parametrize(
    "length,shuffled,replaced",
    [(21, 3, 1), (20, 3, 1), (10, 2, 1), (9, 2, 0), (7, 2, 0), (5, 2, 0), (3, 0, 0), (2, 0, 0), (1, 0, 0), (0, 0, 0)],
)
def test_corruption_counts_round_half_up_with_at_least_two_shuffled(length, shuffled, replaced):
    num_shuffled, num_replaced = corruption_counts(torch.tensor([length]), 0.15, 0.05)
    assert (num_shuffled.item(), num_replaced.item()) == (shuffled, replaced)


def test_counts_never_exceed_length():
    lengths = torch.arange(0, 30)
    num_shuffled, num_replaced = corruption_counts(lengths, 0.9, 0.5)
    assert ((num_shuffled + num_replaced) <= lengths).all()
    assert (num_shuffled != 1).all()


def test_exact_counts_and_labels_with_distinct_items():
    item_ids = unique_item_batch(0)
    corrupted, labels = corrupt_sequences(item_ids, generator=torch.Generator().manual_seed(1))
    check_consistent(item_ids, corrupted, labels)
    expected_shuffled, expected_replaced = corruption_counts((item_ids != 0).sum(1), 0.15, 0.05)
    # Distinct items per row: every chosen position visibly changes.
    assert ((labels == 1).sum(1) == expected_shuffled).all()
    assert ((labels == 2).sum(1) == expected_replaced).all()
    assert (labels[0] == 1).sum() == 3 and (labels[0] == 2).sum() == 1


def test_statistics_over_many_draws():
    generator = torch.Generator().manual_seed(7)
    shuffled = replaced = total = 0
    for draw in range(150):
        item_ids = unique_item_batch(draw, min_length=20)  # lengths 20 or 21: 15 % and 5 % round exactly-ish
        corrupted, labels = corrupt_sequences(item_ids, generator=generator)
        check_consistent(item_ids, corrupted, labels)
        shuffled += int((labels == 1).sum())
        replaced += int((labels == 2).sum())
        total += int((item_ids != 0).sum())
    assert shuffled / total == pytest.approx(0.15, abs=0.01)
    assert replaced / total == pytest.approx(0.05, abs=0.01)


def test_positions_are_chosen_uniformly():
    item_ids = torch.arange(1, 21)[None, :].repeat(64, 1)
    generator = torch.Generator().manual_seed(3)
    hits = torch.zeros(20)
    for _ in range(50):
        _, labels = corrupt_sequences(item_ids, generator=generator)
        hits += (labels > 0).float().sum(0)
    rate = hits / (64 * 50)  # expected 4 / 20 = 0.2 at every position
    assert rate.min() > 0.15 and rate.max() < 0.25


def test_replacements_come_from_batch_and_differ_from_original():
    item_ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]])
    generator = torch.Generator().manual_seed(0)
    seen_from_other_row = False
    for _ in range(100):
        corrupted, labels = corrupt_sequences(item_ids, 0.0, 0.3, generator)
        check_consistent(item_ids, corrupted, labels)
        assert (labels == 1).sum() == 0
        assert ((labels == 2).sum(1) == torch.tensor([2, 3])).all()  # round(0.3*8)=2, round(0.3*10)=3
        seen_from_other_row |= bool((corrupted[0][labels[0] == 2] > 20).any())
    assert seen_from_other_row


def test_repeated_items_and_single_item_batches():
    # A row of one repeated item: shuffling cannot change anything, so all labels stay 0.
    same = torch.full((1, 20), 5)
    corrupted, labels = corrupt_sequences(same, generator=torch.Generator().manual_seed(0))
    assert torch.equal(corrupted, same) and (labels == 0).all()
    # In a batch with other items, replacements in that row still happen (with other items).
    batch = torch.cat([same, torch.arange(1, 21)[None, :] + 100])
    corrupted, labels = corrupt_sequences(batch, generator=torch.Generator().manual_seed(0))
    check_consistent(batch, corrupted, labels)
    assert (labels[0] == 1).sum() == 0 and (labels[0] == 2).sum() == 1


def test_short_rows_and_all_padding():
    item_ids = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 4], [0, 0, 3, 4], [1, 2, 3, 4]])
    corrupted, labels = corrupt_sequences(item_ids, generator=torch.Generator().manual_seed(0))
    check_consistent(item_ids, corrupted, labels)
    assert labels[0].tolist() == [-100] * 4
    assert torch.equal(corrupted[:3], item_ids[:3])  # rows with < 4 items: nothing to corrupt
    assert (labels[3] == 1).sum() == 2  # round(0.6) = 1 -> at least 2: the two swap


def test_deterministic_for_a_generator_state():
    item_ids = unique_item_batch(11)
    first = corrupt_sequences(item_ids, generator=torch.Generator().manual_seed(42))
    second = corrupt_sequences(item_ids, generator=torch.Generator().manual_seed(42))
    other = corrupt_sequences(item_ids, generator=torch.Generator().manual_seed(43))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    assert torch.equal(item_ids, unique_item_batch(11))  # input left untouched
