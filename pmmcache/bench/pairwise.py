"""The in-batch objectives as they were before the per-user bitmap (main at a9f0fda): the negative mask
from a (B, N, B*N) comparison, dense (B, N-1, B*N) target and negative masks over the DAP logits, and a
gathered (R, B*L) mask over NICL's. Kept only as `bench step`'s "before" path and as the tests'
reference for `pmmcache.objectives`; training never calls it. Shapes and meaning as there."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from pmmcache import train
from pmmcache.objectives import PADDING_ID, log_expected_copies


def pairwise_own_item_mask(item_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """(B, M) bool, as `objectives.own_item_mask`, through a (B, N, M) comparison."""
    own_items = item_ids.masked_fill(item_ids == PADDING_ID, -1)  # (B, N); -1 never matches an id
    return (own_items[:, :, None] == candidate_ids[None, None, :]).any(dim=1)  # (B, M)


def pairwise_negative_mask(item_ids: torch.Tensor) -> torch.Tensor:
    """(B, B*N) bool, as `objectives.in_batch_negative_mask`."""
    candidates = item_ids.reshape(-1)  # (B*N,)
    return ~pairwise_own_item_mask(item_ids, candidates) & (candidates != PADDING_ID)[None, :]


def pairwise_dap_loss(user_states: torch.Tensor, item_vectors: torch.Tensor, item_ids: torch.Tensor,
                      log_popularity: torch.Tensor | None = None, temperature: float = 1.0,
                      extra_vectors: torch.Tensor | None = None, extra_ids: torch.Tensor | None = None,
                      predict: torch.Tensor | None = None) -> torch.Tensor:
    """`objectives.dap_loss` (same arguments, inputs assumed valid) with dense (B, N-1, B*N) masks."""
    batch, _, dim = user_states.shape
    length = item_vectors.shape[1]
    predicting = length - 1
    queries = user_states[:, :predicting].float()  # (B, N-1, d)
    candidates = item_vectors.reshape(batch * length, dim).float()  # (B*N, d)
    logits = queries @ candidates.T / temperature  # (B, N-1, B*N)
    candidate_ids = item_ids.reshape(-1)
    negatives = pairwise_negative_mask(item_ids)  # (B, B*N)
    users = torch.arange(batch, device=item_ids.device)
    positions = torch.arange(predicting, device=item_ids.device)
    target_columns = users[:, None] * length + positions[None, :] + 1  # (B, N-1)
    is_target = torch.zeros(batch, predicting, batch * length, dtype=torch.bool, device=item_ids.device)
    is_target.scatter_(2, target_columns[:, :, None], True)  # (B, N-1, B*N)
    extra_count = len(extra_ids) if extra_ids is not None else 0
    if log_popularity is not None:
        log_expected = log_expected_copies(log_popularity, candidate_ids, extra_count)
        logits = logits - torch.where(is_target, 0.0, log_expected[candidate_ids])
    logits = logits.masked_fill(~(negatives[:, None, :] | is_target), float("-inf"))
    if extra_vectors is not None:
        extra = queries @ extra_vectors.float().T / temperature  # (B, N-1, M)
        if log_popularity is not None:
            extra = extra - log_expected[extra_ids]
        extra = extra.masked_fill(pairwise_own_item_mask(item_ids, extra_ids)[:, None, :], float("-inf"))
        logits = torch.cat([logits, extra], dim=2)
    valid = (item_ids[:, :-1] != PADDING_ID) & (item_ids[:, 1:] != PADDING_ID)  # (B, N-1)
    if predict is not None:
        valid = valid & predict.to(valid.device)
    if not valid.any():
        return (user_states.sum() + item_vectors.sum()) * 0.0
    return F.cross_entropy(logits[valid], target_columns[valid])


def pairwise_nicl_loss(text_cls: torch.Tensor, image_cls: torch.Tensor, item_ids: torch.Tensor,
                       variant: str = "nicl", temperature: float = 1.0, next_item_in_denominator: bool = False,
                       log_popularity: torch.Tensor | None = None) -> torch.Tensor:
    """`objectives.nicl_loss` (same arguments, inputs assumed valid) with the (R, B*L) gathered mask."""
    batch, length, dim = text_cls.shape
    texts = F.normalize(text_cls.float(), dim=-1).reshape(batch * length, dim)
    images = F.normalize(image_cls.float(), dim=-1).reshape(batch * length, dim)
    present = item_ids != PADDING_ID
    if variant == "nicl":
        valid = torch.zeros_like(present)
        valid[:, :-1] = present[:, :-1] & present[:, 1:]
    else:
        valid = present
    rows = valid.reshape(-1).nonzero().squeeze(1)  # (R,)
    if rows.numel() == 0:
        return (text_cls.sum() + image_cls.sum()) * 0.0
    negatives = pairwise_negative_mask(item_ids)[rows // length]  # (R, B*L)
    shift = 0.0
    if log_popularity is not None:
        shift = log_expected_copies(log_popularity, item_ids)[item_ids.reshape(-1)]

    def direction(anchors: torch.Tensor, same: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        anchor = anchors[rows]
        to_other = anchor @ other.T / temperature  # (R, B*L)
        to_same = anchor @ same.T / temperature
        positive = to_other.gather(1, rows[:, None])
        denominator = [positive, (to_other - shift).masked_fill(~negatives, float("-inf"))]
        if variant != "vcl":
            denominator.append((to_same - shift).masked_fill(~negatives, float("-inf")))
        numerator = [positive]
        if variant == "nicl":
            following = (rows + 1)[:, None]
            next_items = [to_other.gather(1, following), to_same.gather(1, following)]
            numerator += next_items
            if next_item_in_denominator:
                denominator += next_items
        return torch.logsumexp(torch.cat(denominator, 1), 1) - torch.logsumexp(torch.cat(numerator, 1), 1)

    return ((direction(texts, texts, images) + direction(images, images, texts)) / 2).mean()


@contextmanager
def pairwise_objectives() -> Iterator[None]:
    """Within the block, the trainer's step (`pmmcache.train`) computes DAP and NICL the old way."""
    saved = train.dap_loss, train.nicl_loss
    train.dap_loss, train.nicl_loss = pairwise_dap_loss, pairwise_nicl_loss
    try:
        yield
    finally:
        train.dap_loss, train.nicl_loss = saved
