"""PMMRec training objectives (paper section III, eq. 5-11) as pure functions of tensors.

Shapes: B users per batch, L positions per sequence, d hidden size. Item id 0 is padding.

Negatives follow the paper (eq. 5, reused by eq. 8 and 11): for user u, every item in the batch
except u's own items. "Own" is decided by item id, so an item of another user that equals one of
u's items is not a negative for u either. Padding is never a candidate. Duplicated negatives (the
same item in two other users' sequences) each count, as in the paper's sum over positions.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PADDING_ID = 0
NICL_VARIANTS = ("nicl", "icl", "vcl")


def own_item_mask(item_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: True where candidate m is one of user b's (non-padding) items.

    Built from a (B, U) bitmap over the U distinct ids of the batch and the candidates, then gathered
    per candidate: memory O(B (U + M)), not the O(B N M) of comparing every pair.

    Args:
        item_ids: (B, N) long, 0 = padding.
        candidate_ids: (M,) long ids of extra candidates.
    """
    batch, length = item_ids.shape
    distinct, slots = torch.unique(torch.cat([item_ids.reshape(-1), candidate_ids.reshape(-1)]), return_inverse=True)
    owned = torch.zeros(batch, len(distinct), dtype=torch.bool, device=item_ids.device)  # (B, U)
    owned.scatter_(1, slots[: batch * length].view(batch, length), True)  # user b has distinct id u
    owned &= (distinct != PADDING_ID)[None, :]  # padding is nobody's item
    return owned[:, slots[batch * length:]]  # (B, M)


def in_batch_negative_mask(item_ids: torch.Tensor) -> torch.Tensor:
    """Which in-batch items are valid negatives for each user.

    Args:
        item_ids: (B, N) long, item ids of every user's sequence, 0 = padding.

    Returns:
        (B, B*N) bool; entry [u, k*N + j] is True iff item_ids[k, j] is not padding and is not
        equal to any (non-padding) item of user u. The candidates are the batch flattened row by
        row, the same order as `item_ids.reshape(-1)`. A user's own positions are always False.
    """
    if item_ids.dim() != 2:
        raise ValueError(f"item_ids must be (B, N), got shape {tuple(item_ids.shape)}")
    candidates = item_ids.reshape(-1)  # (B*N,)
    return ~own_item_mask(item_ids, candidates) & (candidates != PADDING_ID)[None, :]


def negative_logit_bias(allowed: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user additive mask over candidates: -shift (logQ) for a negative, -inf for the rest.

    Args:
        allowed: (B, C) bool, which candidates are user b's negatives.
        shift: (C,) what each negative's logit loses (zeros without logQ).

    Returns:
        bias (B, C) float and has_negative (B,) bool. A user without any negative gets a bias of zeros
        (a row of -inf only would give logsumexp a NaN gradient); callers drop that row's sum.
    """
    has_negative = allowed.any(1)  # (B,)
    bias = torch.where(allowed, -shift.float()[None, :], float("-inf"))  # (B, C)
    return bias.masked_fill(~has_negative[:, None], 0.0), has_negative


def log_expected_copies(log_popularity: torch.Tensor, candidate_ids: torch.Tensor, uniform_draws: int = 0) -> torch.Tensor:
    """(num_items + 1,) log of each item's expected number of copies among sampled negatives (logQ).

    Each negative copy of item j stands for 1 / E[copies of j] of the catalogue's mass, with
    E = n p_j over the n non-padding in-batch candidates (drawn in proportion to popularity p) plus
    M / num_items over `uniform_draws` = M uniform catalogue draws. Subtracting log E from a
    negative's logit makes the sampled softmax estimate the full softmax.

    Args:
        log_popularity: (num_items + 1,) log sampling probability per item id (sums to 1 over 1..N).
        candidate_ids: the in-batch candidate ids, any shape, 0 = padding (not counted).
        uniform_draws: M, the number of extra candidates drawn uniformly from the catalogue.
    """
    pool = max(1, int((candidate_ids != PADDING_ID).sum()))
    uniform = uniform_draws / (len(log_popularity) - 1)
    return torch.log(pool * log_popularity.float().exp() + uniform)


def dap_loss(
    user_states: torch.Tensor,
    item_vectors: torch.Tensor,
    item_ids: torch.Tensor,
    log_popularity: torch.Tensor | None = None,
    temperature: float = 1.0,
    extra_vectors: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
    predict: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense auto-regressive prediction (eq. 5): every position predicts the next item.

    Args:
        user_states: (B, S, d) user-encoder outputs h over the input items.
        item_vectors: (B, N, d) item vectors e of the whole sequence, N = S + 1 (input items plus
            the final target, as stage 2 calls it) or N = S (the paper's form: the last state has
            no target). State t is scored against item t + 1 of the same row.
        item_ids: (B, N) long ids of `item_vectors`, 0 = padding.
        log_popularity: optional (num_items + 1,) log sampling probability per item id (log of its
            share of the training occurrences; must sum to 1 over items 1..num_items). When given,
            each negative's logit is reduced by the log of its item's expected number of copies in
            the candidate pool (logQ correction; the released code has a variant of it), so the
            sampled softmax estimates the full softmax instead of a popularity-discounted one.
        temperature: logits are dot products divided by this (paper: 1, raw dot products).
        extra_vectors: optional (M, d) vectors of extra negatives drawn uniformly from the catalogue
            (mixed negative sampling); with `log_popularity`, every negative of item j is corrected by
            log(n p_j + M / num_items), its expected copies over both pools (n in-batch candidates).
        extra_ids: (M,) long ids of `extra_vectors`; a user's own items are never its negatives.
        predict: optional (B, N - 1) bool, which targets count (e.g. the new targets of overlapping
            training windows); default: every target.

    Returns:
        Scalar: mean cross-entropy over positions t whose input item t and target item t + 1 are
        both non-padding (and `predict`), i.e. 1 / (B (L-1)) with L = N in the paper's notation when
        nothing is padded. Candidates are all B*N items of the batch, masked by
        `in_batch_negative_mask` except the positive (the target at its own position), plus the
        extra candidates. No ℓ2-normalisation: eq. 5 and the released code use raw dot products h·e.
    """
    batch, steps, dim = user_states.shape
    length = item_vectors.shape[1]
    if item_vectors.shape[0] != batch or item_vectors.shape[2] != dim:
        raise ValueError(f"item_vectors {tuple(item_vectors.shape)} does not match user_states {tuple(user_states.shape)}")
    if item_ids.shape != (batch, length):
        raise ValueError(f"item_ids must be {(batch, length)}, got {tuple(item_ids.shape)}")
    if length not in (steps, steps + 1):
        raise ValueError(f"item_vectors must have S or S + 1 positions (S = {steps}), got {length}")
    if (extra_vectors is None) != (extra_ids is None):
        raise ValueError("extra_vectors and extra_ids go together")
    predicting = length - 1  # states 0 .. N-2 each have a target
    if predict is not None and predict.shape != (batch, predicting):
        raise ValueError(f"predict must be {(batch, predicting)}, got {tuple(predict.shape)}")
    queries = user_states[:, :predicting].float() / temperature  # (B, N-1, d)
    candidate_ids = item_ids.reshape(-1)  # (B*N,)
    candidates = item_vectors.reshape(batch * length, dim).float()  # (B*N, d)
    allowed = in_batch_negative_mask(item_ids)  # (B, B*N)
    if extra_vectors is not None:  # extra candidates: every one but the user's own items
        candidates = torch.cat([candidates, extra_vectors.float()])  # (B*N + M, d)
        allowed = torch.cat([allowed, ~own_item_mask(item_ids, extra_ids)], dim=1)  # (B, B*N + M)
        candidate_ids = torch.cat([candidate_ids, extra_ids])
    shift = torch.zeros(len(candidate_ids), device=queries.device)
    if log_popularity is not None:
        extra_count = len(extra_ids) if extra_ids is not None else 0
        shift = log_expected_copies(log_popularity, item_ids, extra_count)[candidate_ids]  # (C,)
    bias, has_negative = negative_logit_bias(allowed, shift)  # (B, C), (B,)

    # The positive (item t + 1 of the same row) is the label, not a draw: no logQ shift (the released
    # code also shifts it, which inflates popular targets once their other copies are masked as own).
    positive = (queries * item_vectors[:, 1:].float()).sum(-1)  # (B, N-1)
    negatives = torch.logsumexp((queries @ candidates.T) + bias[:, None, :], dim=2)  # (B, N-1)
    negatives = negatives.masked_fill(~has_negative[:, None], float("-inf"))
    losses = torch.logaddexp(positive, negatives) - positive  # cross-entropy of the positive

    valid = (item_ids[:, :-1] != PADDING_ID) & (item_ids[:, 1:] != PADDING_ID)  # (B, N-1)
    if predict is not None:
        valid = valid & predict.to(valid.device)
    if not valid.any():
        return (user_states.sum() + item_vectors.sum()) * 0.0
    return losses[valid].mean()


def catalogue_dap_loss(
    user_states: torch.Tensor,
    catalogue: torch.Tensor,
    item_ids: torch.Tensor,
    log_popularity: torch.Tensor | None = None,
    temperature: float = 1.0,
    predict: torch.Tensor | None = None,
) -> torch.Tensor:
    """DAP with every catalogue item as a candidate (cross-entropy over all items, as RecBole's SASRec).

    Args:
        user_states: (B, S, d) user-encoder outputs; state t predicts item t + 1 of `item_ids`.
        catalogue: (N, d) vectors of items 1..N (row i - 1 is item i; padding is never a candidate).
        item_ids: (B, S + 1) or (B, S) long ids of the sequence, 0 = padding.
        log_popularity: optional (N + 1,) log popularity per item id, subtracted from each logit
            (the full softmax needs no sampling correction: stage 2 passes None).
        temperature: logits are dot products divided by this.
        predict: optional (B, S) bool, which targets count; default: every target.

    Returns:
        Scalar mean cross-entropy over positions whose input and target are both non-padding.
        Unlike `dap_loss`, a user's own other items stay candidates (RecBole does the same).
    """
    predicting = item_ids.shape[1] - 1
    valid = (item_ids[:, :-1] != PADDING_ID) & (item_ids[:, 1:] != PADDING_ID)  # (B, S')
    if predict is not None:
        valid = valid & predict.to(valid.device)
    if not valid.any():
        return (user_states.sum() + catalogue.sum()) * 0.0
    queries = user_states[:, :predicting][valid].float()  # (V, d)
    logits = queries @ catalogue.float().T / temperature  # (V, N)
    if log_popularity is not None:
        logits = logits - log_popularity.float()[1:]
    return F.cross_entropy(logits, item_ids[:, 1:][valid] - 1)


def nicl_loss(
    text_cls: torch.Tensor,
    image_cls: torch.Tensor,
    item_ids: torch.Tensor,
    variant: Literal["nicl", "icl", "vcl"] = "nicl",
    temperature: float = 1.0,
    next_item_in_denominator: bool = False,
    log_popularity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-modal contrastive alignment of item texts and images (eq. 6-9).

    Both modalities are ℓ2-normalised; δ(a, b) = exp(a·b / temperature).
    For the text anchor t_l of user u (the image direction swaps t and v):
      - "vcl" (eq. 6): -log δ(t_l, v_l) / [δ(t_l, v_l) + Σ_neg δ(t_l, v_neg)]
      - "icl" (eq. 7): the denominator also sums the intra-modality negatives Σ_neg δ(t_l, t_neg)
      - "nicl" (eq. 8): ICL whose numerator adds the next item's image and text,
        δ(t_l, v_l) + δ(t_l, v_{l+1}) + δ(t_l, t_{l+1}). Read literally, eq. 8 leaves those two
        extra positives out of the denominator, so the loss can go below zero (down to -log 3 at
        temperature 1); that literal form is the default. `next_item_in_denominator=True` adds
        them to the denominator (the usual multi-positive InfoNCE, always >= 0).
    Negatives are `in_batch_negative_mask`: items of other users that are not u's own items.
    They are drawn in proportion to popularity, so with `log_popularity` each negative's logit is
    lowered by the log of its expected copies (`log_expected_copies`, logQ); positives are not.

    Args:
        text_cls: (B, L, d) text-encoder CLS vectors t.
        image_cls: (B, L, d) vision-encoder CLS vectors v.
        item_ids: (B, L) long, 0 = padding.
        temperature: paper 1; cosines at 1 give a nearly flat softmax and almost no gradient, so
            stage 2 defaults to CLIP's range (0.1).
        log_popularity: optional (num_items + 1,) log sampling probability per item id (logQ).

    Returns:
        Scalar: mean over valid positions of (L^{T,V} + L^{V,T}) / 2 (eq. 9). Valid means a
        non-padding item, and for "nicl" also a non-padding next item (positions 1..L-1).
    """
    if variant not in NICL_VARIANTS:
        raise ValueError(f"variant must be one of {NICL_VARIANTS}, got {variant!r}")
    batch, length, dim = text_cls.shape
    if image_cls.shape != text_cls.shape or item_ids.shape != (batch, length):
        raise ValueError(
            f"shapes differ: text {tuple(text_cls.shape)}, image {tuple(image_cls.shape)}, ids {tuple(item_ids.shape)}"
        )
    texts = F.normalize(text_cls.float(), dim=-1).reshape(batch * length, dim)  # (B*L, d)
    images = F.normalize(image_cls.float(), dim=-1).reshape(batch * length, dim)  # (B*L, d)

    present = item_ids != PADDING_ID  # (B, L)
    if variant == "nicl":
        valid = torch.zeros_like(present)
        valid[:, :-1] = present[:, :-1] & present[:, 1:]
    else:
        valid = present
    rows = valid.reshape(-1).nonzero().squeeze(1)  # (R,) flat anchor positions
    if rows.numel() == 0:
        return (text_cls.sum() + image_cls.sum()) * 0.0

    shift = torch.zeros(batch * length, device=texts.device)
    if log_popularity is not None:  # (B*L,): subtracted from every negative logit
        shift = log_expected_copies(log_popularity, item_ids)[item_ids.reshape(-1)]
    bias, has_negative = negative_logit_bias(in_batch_negative_mask(item_ids), shift)  # (B, B*L), (B,)
    if variant != "vcl":  # intra-modality negatives: the same candidates in the anchor's own modality
        bias = torch.cat([bias, bias], dim=1)  # (B, 2 B*L)
    no_negative = ~has_negative[rows // length]  # (R,)

    def direction(anchors: torch.Tensor, same: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Per-anchor loss with `other` the paired modality and `same` the anchor's own."""
        pool = other if variant == "vcl" else torch.cat([other, same])  # (C, d) candidates
        # Every position is an anchor here, so the per-user bias broadcasts; the valid rows are kept after.
        scores = (anchors / temperature) @ pool.T  # (B*L, C)
        negatives = torch.logsumexp(scores.view(batch, length, -1) + bias[:, None, :], dim=2).reshape(-1)[rows]
        negatives = negatives.masked_fill(no_negative, float("-inf"))  # (R,)
        anchor = anchors[rows] / temperature  # (R, d)
        positive = (anchor * other[rows]).sum(-1)  # (R,): δ(t_l, v_l)
        denominator, numerator = [positive, negatives], [positive]
        if variant == "nicl":
            following = rows + 1  # next position of the same user
            next_items = [(anchor * other[following]).sum(-1), (anchor * same[following]).sum(-1)]
            numerator += next_items
            if next_item_in_denominator:
                denominator += next_items
        return torch.logsumexp(torch.stack(denominator, 1), 1) - torch.logsumexp(torch.stack(numerator, 1), 1)

    text_anchored = direction(texts, texts, images)  # L^{T,V}, (R,)
    image_anchored = direction(images, images, texts)  # L^{V,T}, (R,)
    return ((text_anchored + image_anchored) / 2).mean()


def nid_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, relu: bool = False) -> torch.Tensor:
    """Noised item detection (eq. 10): 3-way classification unchanged / shuffled / replaced.

    Default: softmax cross-entropy over the classifier's logits hW + b, a proper classifier.
    `relu=True` is eq. 10 as printed, ŷ = softmax(ReLU(hW + b)): ReLU clips every negative logit to
    0, so a class can never be ruled out and the gradient of a clipped logit is 0 (NID then sits
    above the label prior's entropy).

    Args:
        logits: (B, L, 3) classifier output hW + b on the corrupted sequence.
        labels: (B, L) long in {0 unchanged, 1 shuffled, 2 replaced}; `ignore_index` (padding)
            positions are left out of the mean.
        relu: apply eq. 10's ReLU before the softmax.

    Returns:
        Scalar: mean over non-ignored positions (eq. 10's 1 / (B L) when nothing is padded).
    """
    if logits.shape[:-1] != labels.shape or logits.shape[-1] != 3:
        raise ValueError(f"logits must be {tuple(labels.shape) + (3,)}, got {tuple(logits.shape)}")
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    logits = logits.float()
    if relu:
        logits = F.relu(logits)
    return F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1), ignore_index=ignore_index)


def masked_mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `states` (B, L, d) over positions where `mask` (B, L) is true -> (B, d).

    A row with no true position pools to zeros.
    """
    weights = mask.to(states.dtype)[:, :, None]  # (B, L, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def rcl_loss(
    original: torch.Tensor,
    corrupted: torch.Tensor,
    temperature: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Robustness-aware contrastive learning (eq. 11).

    User u's pooled original sequence h_u is the anchor; its corrupted sequence h~_u is the positive
    and the corrupted sequences h~_k of the other users in the batch are the negatives (one
    direction, as written in eq. 11).

    Eq. 11 does not say whether h is normalised. We ℓ2-normalise by default, like NICL: pooled
    Transformer states have norm ~sqrt(d) after LayerNorm, so raw dot products would be of order d
    and saturate the softmax. `normalize=False` gives the literal raw dot products.

    Args:
        original: (B, d) pooled states of the original sequences.
        corrupted: (B, d) pooled states of the corrupted sequences, same user order.

    Returns:
        Scalar: mean over the B users.
    """
    if original.shape != corrupted.shape or original.dim() != 2:
        raise ValueError(f"original {tuple(original.shape)} and corrupted {tuple(corrupted.shape)} must be equal (B, d)")
    anchors, others = original.float(), corrupted.float()
    if normalize:
        anchors, others = F.normalize(anchors, dim=-1), F.normalize(others, dim=-1)
    logits = anchors @ others.T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(original.shape[0], device=original.device))
