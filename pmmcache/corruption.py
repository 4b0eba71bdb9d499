"""Sequence corruption for noised item detection (NID, paper III-D.1) and RCL.

Per user sequence: shuffle 15 % of the items among themselves, then replace another 5 % with random
items of the batch. Labels say what happened at each position.
"""
from __future__ import annotations

import torch

PADDING_ID = 0
UNCHANGED, SHUFFLED, REPLACED, IGNORED = 0, 1, 2, -100


def corruption_counts(lengths: torch.Tensor, shuffle_frac: float, replace_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """How many positions to shuffle and to replace for sequences of `lengths` (B,) non-pad items.

    Counts round half up (floor(frac * n + 0.5)); Python's round would go to even. Shuffling a single
    item moves nothing, so a shuffle count of 1 becomes 2 when the sequence has 2 items and 0
    otherwise. The replace count is capped by the positions left after shuffling.
    Returns (num_shuffled (B,), num_replaced (B,)) long.
    """
    lengths = lengths.long()
    num_shuffled = torch.floor(lengths.double() * shuffle_frac + 0.5).long().clamp(max=lengths)
    num_shuffled = torch.where((num_shuffled == 1) & (lengths >= 2), 2, num_shuffled)
    num_shuffled = torch.where(num_shuffled == 1, 0, num_shuffled)
    num_replaced = torch.floor(lengths.double() * replace_frac + 0.5).long()
    num_replaced = torch.minimum(num_replaced, lengths - num_shuffled)
    return num_shuffled, num_replaced


def corrupt_sequences(
    item_ids: torch.Tensor,
    shuffle_frac: float = 0.15,
    replace_frac: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt each user sequence by shuffling and replacing items.

    For each row with n non-padding items (counts from `corruption_counts`):
      1. shuffle: a random set of positions is chosen and their items are moved along one random
         cycle (position i takes the item of the next chosen position), so every chosen position
         receives an item from another position.
      2. replace: another random set, disjoint from the first, gets items drawn uniformly from the
         non-padding positions of the whole batch (so frequent items are drawn more often), among
         those whose item differs from the original item at that position.

    Labels follow the visible change: 1 (shuffled) or 2 (replaced) only where the item actually
    differs from the original. A shuffled position that received an equal item (a repeated item
    in the sequence) is labelled 0, since nothing there can be detected; a replacement with no
    different item in the batch keeps the original and is labelled 0 too. Padding stays padding
    with label -100. Padding may be anywhere in the row.

    Args:
        item_ids: (B, L) long, 0 = padding.
        shuffle_frac, replace_frac: fractions of each row's non-padding items.
        generator: torch.Generator on item_ids' device; the same generator state gives the same
            result.

    Returns:
        (corrupted (B, L) long, labels (B, L) long in {0, 1, 2, -100}).
    """
    if item_ids.dim() != 2:
        raise ValueError(f"item_ids must be (B, L), got shape {tuple(item_ids.shape)}")
    device = item_ids.device
    present = item_ids != PADDING_ID  # (B, L)
    num_shuffled, num_replaced = corruption_counts(present.sum(1), shuffle_frac, replace_frac)  # (B,)

    # A random order of each row's non-pad positions (padding sorts last); the first
    # num_shuffled in that order are shuffled, the next num_replaced are replaced.
    keys = torch.rand(item_ids.shape, generator=generator, device=device).masked_fill(~present, 2.0)
    order = keys.argsort(dim=1)  # (B, L) positions by random rank
    rank = order.argsort(dim=1)  # (B, L) random rank of each position
    to_shuffle = rank < num_shuffled[:, None]
    to_replace = (rank >= num_shuffled[:, None]) & (rank < (num_shuffled + num_replaced)[:, None])

    # Shuffle along the cycle of chosen ranks: rank i takes the item at rank (i + 1) mod m.
    source_rank = (rank + 1) % num_shuffled.clamp(min=1)[:, None]  # (B, L)
    source_position = order.gather(1, source_rank)
    corrupted = torch.where(to_shuffle, item_ids.gather(1, source_position), item_ids)

    # Replace from the batch's non-pad items, never with the item already there.
    rows, cols = to_replace.nonzero(as_tuple=True)  # (R,), (R,)
    if rows.numel() > 0:
        pool = item_ids[present]  # (P,)
        originals = item_ids[rows, cols]  # (R,)
        choices = (pool[None, :] != originals[:, None]).double()  # (R, P)
        possible = choices.sum(1) > 0
        # A row with no different item would break multinomial; draw anything and keep the original.
        choices[~possible] = 1.0
        drawn = pool[torch.multinomial(choices, 1, generator=generator).squeeze(1)]
        corrupted[rows, cols] = torch.where(possible, drawn, originals)

    changed = corrupted != item_ids
    labels = torch.full_like(item_ids, UNCHANGED)
    labels[to_shuffle & changed] = SHUFFLED
    labels[to_replace & changed] = REPLACED
    labels[~present] = IGNORED
    return corrupted, labels
