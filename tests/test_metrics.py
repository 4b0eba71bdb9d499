"""Full-ranking metrics on hand-made score matrices and against a naive per-user sort."""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from pmmcache.metrics import (
    full_rank_evaluate,
    full_rank_metrics,
    metric_names,
    rank_metrics,
    summarize,
    target_ranks,
)


def naive_metrics(scores, targets, ks, histories=None):
    """Per user: sort the candidates, placing the target after every item it ties with."""
    results = {name: [] for name in metric_names(ks)}
    for user in range(scores.shape[0]):
        target = int(targets[user])
        masked = {0}
        if histories is not None:
            masked |= {int(i) for i in histories[user]} - {target}
        candidates = [i for i in range(scores.shape[1]) if i not in masked]
        # Sort key: score descending, the target last among equals.
        ordered = sorted(candidates, key=lambda i: (-float(scores[user, i]), i == target))
        rank = ordered.index(target)
        for k in ks:
            hit = 1.0 if rank < k else 0.0
            results[f"HR@{k}"].append(hit)
            results[f"NDCG@{k}"].append(hit / math.log2(rank + 2))
    return {name: torch.tensor(values) for name, values in results.items()}


# Items 1..5; column 0 is padding and scores highest so it would win if it were ranked.
SCORES = torch.tensor([[100.0, 0.5, 0.9, 0.5, 0.1, 0.7]])


def test_ties_are_pessimistic_and_padding_is_never_ranked():
    # Target item 1 (0.5): items 2 and 5 score higher, item 3 ties -> rank 3 (0-based).
    assert target_ranks(SCORES, torch.tensor([1])).tolist() == [3]
    metrics = rank_metrics(SCORES, torch.tensor([1]), ks=(3, 4))
    assert metrics["HR@3"].tolist() == [0.0]
    assert metrics["HR@4"].tolist() == [1.0]
    assert metrics["NDCG@4"].item() == pytest.approx(1 / math.log2(5))
    # The tied item 3 is ranked as if it lost the tie too.
    assert target_ranks(SCORES, torch.tensor([3])).tolist() == [3]
    # The best real item is first although padding scores 100.
    assert target_ranks(SCORES, torch.tensor([2])).tolist() == [0]
    assert rank_metrics(SCORES, torch.tensor([2]), ks=(1,))["NDCG@1"].tolist() == [1.0]


def test_history_masking_keeps_the_target():
    history = torch.tensor([[2, 5, 0, 0]])  # 0 = history padding
    assert target_ranks(SCORES, torch.tensor([1]), history).tolist() == [1]  # only the tie remains
    metrics = rank_metrics(SCORES, torch.tensor([1]), ks=(1, 2), exclude=history)
    assert metrics["HR@1"].tolist() == [0.0] and metrics["HR@2"].tolist() == [1.0]
    assert metrics["NDCG@2"].item() == pytest.approx(1 / math.log2(3))
    # A re-consumed target listed in the history stays rankable.
    assert target_ranks(SCORES, torch.tensor([2]), torch.tensor([[2, 5]])).tolist() == [0]
    assert target_ranks(SCORES, torch.tensor([1]), torch.tensor([[1, 2, 5, 3]])).tolist() == [0]


def test_k_larger_than_catalogue():
    metrics = rank_metrics(SCORES, torch.tensor([4]), ks=(5, 50))
    # Item 4 is last of 5 candidates: rank 4.
    assert metrics["HR@5"].tolist() == [1.0] and metrics["HR@50"].tolist() == [1.0]
    assert metrics["NDCG@50"].item() == pytest.approx(1 / math.log2(6))
    assert rank_metrics(SCORES, torch.tensor([4]), ks=(4,))["HR@4"].tolist() == [0.0]


def test_invalid_targets_are_rejected():
    with pytest.raises(ValueError):
        rank_metrics(SCORES, torch.tensor([0]))
    with pytest.raises(ValueError):
        rank_metrics(SCORES, torch.tensor([6]))
    with pytest.raises(ValueError):
        rank_metrics(SCORES, torch.tensor([1, 2]))


def random_problem(seed, users=37, items=25, dim=4, history=6):
    generator = torch.Generator().manual_seed(seed)
    # Rounded vectors make ties frequent.
    user_vectors = torch.randint(-2, 3, (users, dim), generator=generator).float()
    item_table = torch.randint(-2, 3, (items + 1, dim), generator=generator).float()
    targets = torch.randint(1, items + 1, (users,), generator=generator)
    histories = torch.randint(0, items + 1, (users, history), generator=generator)
    histories[::3, 0] = targets[::3]  # some users re-consume their target
    return user_vectors, item_table, targets, histories


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_metrics_match_naive_sort(seed):
    user_vectors, item_table, targets, histories = random_problem(seed)
    scores = user_vectors @ item_table.T
    ks = (1, 5, 10, 50)
    for history in (None, histories):
        fast = rank_metrics(scores, targets, ks, history)
        slow = naive_metrics(scores, targets, ks, history)
        for name in metric_names(ks):
            assert torch.allclose(fast[name], slow[name], atol=1e-6), name


def test_chunked_evaluate_equals_unchunked():
    user_vectors, item_table, targets, histories = random_problem(2)
    ks = (1, 5, 10)
    whole = rank_metrics(user_vectors @ item_table.T, targets, ks, histories)
    for batch_size in (1, 4, 37, 1000):
        chunked = full_rank_metrics(user_vectors, item_table, targets, histories, ks, batch_size=batch_size)
        for name in metric_names(ks):
            assert torch.equal(chunked[name], whole[name]), (batch_size, name)
    means = full_rank_evaluate(user_vectors, item_table, targets, histories, ks, batch_size=5)
    assert means == summarize(whole)
    assert set(means) == set(metric_names(ks))
    assert all(isinstance(value, float) for value in means.values())


def test_history_masking_switch():
    user_vectors, item_table, targets, histories = random_problem(3)
    masked = full_rank_evaluate(user_vectors, item_table, targets, histories, ks=(5,))
    unmasked = full_rank_evaluate(user_vectors, item_table, targets, histories, ks=(5,), mask_history=False)
    assert unmasked == full_rank_evaluate(user_vectors, item_table, targets, None, ks=(5,), mask_history=False)
    assert masked["HR@5"] >= unmasked["HR@5"]  # removing competitors can only help the target
    assert masked != unmasked
    with pytest.raises(ValueError):
        full_rank_evaluate(user_vectors, item_table, targets, None)


def test_low_precision_inputs_are_scored_in_float32():
    user_vectors, item_table, targets, histories = random_problem(4)
    full = full_rank_evaluate(user_vectors, item_table, targets, histories, ks=(10,))
    half = full_rank_evaluate(user_vectors.bfloat16(), item_table.bfloat16(), targets, histories, ks=(10,))
    assert half == full  # small integer vectors are exact in bfloat16


def test_summarize():
    per_user = {"HR@10": torch.tensor([1.0, 0.0, 1.0, 1.0]), "NDCG@10": torch.tensor([1.0, 0.0, 0.5, 0.5])}
    assert summarize(per_user) == {"HR@10": 0.75, "NDCG@10": 0.5}
    empty = full_rank_metrics(torch.zeros(0, 3), torch.zeros(4, 3), torch.zeros(0, dtype=torch.long), None, (10,), mask_history=False)
    assert empty["HR@10"].numel() == 0 and math.isnan(summarize(empty)["HR@10"])


def test_a_nan_score_ranks_last_and_never_scores_a_hit():
    from pmmcache.metrics import target_ranks

    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0], [0.0, 3.0, float("nan"), 1.0]])
    ranks = target_ranks(scores, torch.tensor([1, 1]))
    assert ranks.tolist() == [2, 0]  # a NaN target goes below every real item; a NaN rival does not beat it


def test_popularity_diagnostics_percentiles_and_coverage():
    from pmmcache.metrics import popularity_diagnostics, popularity_percentiles, top_k_items

    counts = torch.tensor([0, 1, 5, 5, 9])  # items 1..4; items 2 and 3 tie
    percent = popularity_percentiles(counts)
    assert percent.tolist() == pytest.approx([0.0, 0.0, 50.0, 50.0, 100.0])
    scores = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.9], [0.0, 0.8, 0.1, 0.7, 0.2]])
    top = top_k_items(scores, 2, exclude=torch.tensor([[4], [0]]))
    assert top.tolist() == [[3, 2], [1, 3]]
    out = popularity_diagnostics(top, percent, 4, ks=(1, 2))
    assert out["PopPct@1"] == pytest.approx(25.0) and out["Coverage@2"] == pytest.approx(0.75)
