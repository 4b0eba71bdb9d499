"""Full-ranking metrics: HR@k and NDCG@k over the whole catalogue, vectorised and chunked.

Item 0 is padding: it is never ranked. A user's history can be masked (PMMRec's protocol) or not
(RecBole's default). The metrics are computed from the target's rank, not from a top-k list:

    rank = #{candidates scoring above the target} + #{other candidates scoring equal to it}

so ties are broken pessimistically (the target goes below every item it ties with) and the
result does not depend on sort order. A non-finite score (NaN from a diverged model or a corrupt
cache) counts as -inf: such an item ranks last, and a NaN target scores a miss, never a hit. Candidates are all items except padding and masked
history; the target itself is never masked, even when it is also in the history (a re-consumed
item in leave-one-out), because a masked target would score a miss no matter what the model does.
HR@k = [rank < k], NDCG@k = [rank < k] / log2(rank + 2) with one relevant item; a k at or above
the catalogue size simply makes HR@k = 1.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

PADDING_ID = 0
DEFAULT_KS = (10, 20, 50)


def metric_names(ks: Sequence[int]) -> list[str]:
    """Keys of the metric dicts, e.g. ["HR@10", "NDCG@10", ...]."""
    return [f"{name}@{k}" for k in ks for name in ("HR", "NDCG")]


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based pessimistic rank of each user's target among the candidates.

    Args:
        scores: (U, N+1) float, column i scores item i; column 0 is padding and ignored.
        targets: (U,) long in [1, N].
        exclude: optional (U, H) long item ids to leave out (history), 0 = padding; the target
            stays a candidate even if listed.

    Returns:
        (U,) long ranks.
    """
    users, columns = scores.shape
    if targets.shape != (users,):
        raise ValueError(f"targets must be ({users},), got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= columns):
        raise ValueError(f"targets must be item ids in [1, {columns - 1}]")
    candidate = torch.ones_like(scores, dtype=torch.bool)  # (U, N+1)
    candidate[:, PADDING_ID] = False
    if exclude is not None:
        if exclude.dim() != 2 or exclude.shape[0] != users:
            raise ValueError(f"exclude must be ({users}, H), got {tuple(exclude.shape)}")
        candidate.scatter_(1, exclude.long(), False)
    candidate.scatter_(1, targets[:, None], True)

    scores = scores.nan_to_num(nan=float("-inf"))  # NaN compares false both ways: it would rank first
    target_score = scores.gather(1, targets[:, None])  # (U, 1)
    above = (candidate & (scores > target_score)).sum(1)
    tied = (candidate & (scores == target_score)).sum(1) - 1  # the target ties with itself
    return above + tied.clamp(min=0)


def rank_metrics(
    scores: torch.Tensor,
    targets: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    exclude: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-user HR@k and NDCG@k from a score matrix.

    Args:
        scores: (U, N+1) float scores of every item (column 0 = padding, never ranked).
        targets: (U,) long target item per user.
        ks: cut-offs.
        exclude: optional (U, H) long history to mask, 0 = padding; the target is kept.

    Returns:
        {"HR@k": (U,) float, "NDCG@k": (U,) float} for every k, on scores' device.
    """
    ranks = target_ranks(scores, targets, exclude).float()  # (U,)
    discount = 1.0 / torch.log2(ranks + 2.0)
    metrics: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = (ranks < k).float()
        metrics[f"HR@{k}"] = hit
        metrics[f"NDCG@{k}"] = hit * discount
    return metrics


def full_rank_metrics(
    user_vectors: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    histories: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    mask_history: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-user HR@k / NDCG@k with dot-product scores against the whole item table.

    Users are scored `batch_size` at a time (`users @ items.T` on the tensors' device, in float32),
    so only a (batch_size, N+1) block exists at once.

    Args:
        user_vectors: (U, d) user representations.
        item_table: (N+1, d) item vectors, row 0 = padding.
        targets: (U,) long target item ids.
        histories: (U, H) long history item ids, 0 = padding; masked when `mask_history`.
        ks: cut-offs.
        batch_size: users per chunk.
        mask_history: set history items to -inf before ranking (PMMRec); False = RecBole default.

    Returns:
        {"HR@k": (U,), "NDCG@k": (U,)} float tensors on the tensors' device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if user_vectors.shape[0] != targets.shape[0]:
        raise ValueError(f"{user_vectors.shape[0]} user vectors but {targets.shape[0]} targets")
    if mask_history and histories is None:
        raise ValueError("mask_history=True needs histories")
    items = item_table.float()  # (N+1, d)
    chunks: list[dict[str, torch.Tensor]] = []
    for start in range(0, user_vectors.shape[0], batch_size):
        stop = start + batch_size
        scores = user_vectors[start:stop].float() @ items.T  # (b, N+1)
        exclude = histories[start:stop] if mask_history else None
        chunks.append(rank_metrics(scores, targets[start:stop], ks, exclude))
    if not chunks:
        return {name: user_vectors.new_zeros(0, dtype=torch.float32) for name in metric_names(ks)}
    return {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}


def summarize(per_user: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means of per-user metric tensors as plain floats (NaN for zero users)."""
    return {name: float(values.float().mean()) if values.numel() else float("nan") for name, values in per_user.items()}


def full_rank_evaluate(
    user_vectors: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    histories: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 1024,
    mask_history: bool = True,
) -> dict[str, float]:
    """Mean HR@k / NDCG@k over all users; `full_rank_metrics` gives the per-user values."""
    return summarize(full_rank_metrics(user_vectors, item_table, targets, histories, ks, batch_size, mask_history))


def popularity_percentiles(counts: torch.Tensor) -> torch.Tensor:
    """(N + 1,) percentile of each item's training popularity in the catalogue, 0 (rarest) .. 100.

    counts: (N + 1,) training occurrences, index 0 = padding (left out). Tied items share the mean
    of their positions, so the catalogue average is 50 whatever the ties.
    """
    values = counts[1:].double()
    n = values.numel()
    order = values.argsort()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    # mean position of each tie group: average the ranks over equal values
    unique, inverse = torch.unique(values, return_inverse=True)
    mean_rank = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(unique)).double()
    percent = mean_rank[inverse] / max(1, n - 1) * 100.0
    return torch.cat([torch.zeros(1, dtype=torch.float64), percent]).float()


def top_k_items(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(U, k) long ids of each user's k best-scored items (padding and `exclude` (U, H) left out)."""
    scores = scores.float().nan_to_num(nan=float("-inf")).clone()
    scores[:, PADDING_ID] = float("-inf")
    if exclude is not None:
        scores.scatter_(1, exclude.long(), float("-inf"))
        scores[:, PADDING_ID] = float("-inf")
    return scores.topk(min(k, scores.shape[1] - 1), dim=1).indices


def popularity_diagnostics(top_items: torch.Tensor, percentiles: torch.Tensor, num_items: int,
                           ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """How popular, and how varied, the recommendations are.

    Args:
        top_items: (U, K) long, every user's recommended items, best first (K >= max(ks)).
        percentiles: (N + 1,) popularity percentile per item (`popularity_percentiles`).
        num_items: N, the catalogue size.

    Returns:
        "PopPct@k": mean popularity percentile of the recommended top k (50 = the catalogue's mean;
        a popularity ranking scores near 100, a model that favours niche items far below 50);
        "Coverage@k": share of the catalogue that appears in at least one user's top k.
    """
    out: dict[str, float] = {}
    for k in ks:
        top = top_items[:, :k]
        out[f"PopPct@{k}"] = float(percentiles.to(top.device)[top].float().mean()) if top.numel() else float("nan")
        out[f"Coverage@{k}"] = float(torch.unique(top).numel() / max(1, num_items)) if top.numel() else float("nan")
    return out
