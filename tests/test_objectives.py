"""PMMRec objectives against hand-computed values and naive per-position references."""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from pmmcache.objectives import (
    catalogue_dap_loss,
    dap_loss,
    in_batch_negative_mask,
    masked_mean_pool,
    nicl_loss,
    nid_loss,
    rcl_loss,
)

E = math.e


# ---------------------------------------------------------------- naive references (Python loops)


def naive_negatives(item_ids, user):
    """Flat candidate indices that are negatives for `user`: other users' non-pad, non-own items."""
    batch, length = item_ids.shape
    own = {int(i) for i in item_ids[user] if int(i) != 0}
    return [
        k * length + j
        for k in range(batch)
        for j in range(length)
        if int(item_ids[k, j]) != 0 and int(item_ids[k, j]) not in own
    ]


def naive_dap(user_states, item_vectors, item_ids, log_popularity=None, temperature=1.0):
    batch, length = item_ids.shape
    flat_vectors = item_vectors.reshape(batch * length, -1).double()
    flat_ids = item_ids.reshape(-1)
    losses = []
    for u in range(batch):
        negatives = naive_negatives(item_ids, u)
        for t in range(length - 1):
            if item_ids[u, t] == 0 or item_ids[u, t + 1] == 0:
                continue
            h = user_states[u, t].double()

            pool = int((flat_ids != 0).sum())

            def logit(column):  # logQ: a negative of item j counts 1 / (n p_j) of its mass
                value = float(h @ flat_vectors[column]) / temperature
                if log_popularity is not None:
                    value -= math.log(pool) + float(log_popularity[flat_ids[column]])
                return value

            positive = float(h @ flat_vectors[u * length + t + 1]) / temperature  # the label: never corrected
            denominator = math.exp(positive) + sum(math.exp(logit(c)) for c in negatives)
            losses.append(-positive + math.log(denominator))
    return sum(losses) / len(losses)


def naive_nicl(text_cls, image_cls, item_ids, variant="nicl", temperature=1.0, next_in_denominator=False):
    batch, length = item_ids.shape
    texts = F.normalize(text_cls.double(), dim=-1).reshape(batch * length, -1)
    images = F.normalize(image_cls.double(), dim=-1).reshape(batch * length, -1)

    def delta(a, b):
        return math.exp(float(a @ b) / temperature)

    losses = []
    for u in range(batch):
        negatives = naive_negatives(item_ids, u)
        for l in range(length):
            if item_ids[u, l] == 0:
                continue
            if variant == "nicl" and (l == length - 1 or item_ids[u, l + 1] == 0):
                continue
            row = u * length + l
            per_direction = []
            for anchors, other in ((texts, images), (images, texts)):
                a = anchors[row]
                numerator = delta(a, other[row])
                denominator = delta(a, other[row]) + sum(delta(a, other[c]) for c in negatives)
                if variant != "vcl":
                    denominator += sum(delta(a, anchors[c]) for c in negatives)
                if variant == "nicl":
                    extra = delta(a, other[row + 1]) + delta(a, anchors[row + 1])
                    numerator += extra
                    if next_in_denominator:
                        denominator += extra
                per_direction.append(-math.log(numerator / denominator))
            losses.append(sum(per_direction) / 2)
    return sum(losses) / len(losses)


def naive_rcl(original, corrupted, temperature=1.0, normalize=True):
    if normalize:
        original, corrupted = F.normalize(original, dim=-1), F.normalize(corrupted, dim=-1)
    total = 0.0
    for u in range(original.shape[0]):
        scores = [float(original[u] @ corrupted[k]) / temperature for k in range(original.shape[0])]
        total += -scores[u] + math.log(sum(math.exp(s) for s in scores))
    return total / original.shape[0]


def random_batch(seed, batch=4, length=6, dim=8, num_items=9, pad_rows=(1,)):
    """Random ids with repeats across users (small catalogue) and left padding in some rows."""
    generator = torch.Generator().manual_seed(seed)
    item_ids = torch.randint(1, num_items + 1, (batch, length), generator=generator)
    for row in pad_rows:
        item_ids[row, :2] = 0
    item_ids[2 % batch, 1] = 0  # a hole inside a row: both neighbours lose a target or an input
    vectors = torch.randn(batch, length, dim, generator=generator)
    states = torch.randn(batch, length - 1, dim, generator=generator)
    images = torch.randn(batch, length, dim, generator=generator)
    return item_ids, vectors, states, images


# ---------------------------------------------------------------- negative mask


def test_negative_mask_excludes_own_items_duplicates_and_padding():
    item_ids = torch.tensor([[1, 2, 0], [3, 2, 4]])
    mask = in_batch_negative_mask(item_ids)
    # user 0 owns {1, 2}: from user 1 only items 3 and 4 are negatives (item 2 is his own).
    assert mask[0].tolist() == [False, False, False, True, False, True]
    # user 1 owns {3, 2, 4}: item 1 of user 0 is the only negative; padding never counts.
    assert mask[1].tolist() == [True, False, False, False, False, False]


# ---------------------------------------------------------------- DAP


def tiny_dap_batch():
    # Rows are [pad, input, target]; the pad column has huge vectors that must not matter.
    item_ids = torch.tensor([[0, 1, 2], [0, 3, 2]])
    item_vectors = torch.tensor(
        [
            [[50.0, 50.0], [0.0, 1.0], [1.0, 0.0]],  # user 0: pad, item 1, item 2
            [[50.0, 50.0], [2.0, 0.0], [3.0, 0.0]],  # user 1: pad, item 3, item 2
        ]
    )
    user_states = torch.tensor([[[9.0, 9.0], [1.0, 0.0]], [[9.0, 9.0], [0.0, 2.0]]])  # (B, S=2, d)
    return user_states, item_vectors, item_ids


def test_dap_hand_computed_with_own_item_and_padding_masks():
    user_states, item_vectors, item_ids = tiny_dap_batch()
    # user 0 (h = (1, 0)) predicts item 2 (score 1); negatives: item 3 of user 1 (score 2) only,
    #   user 1's item 2 is his own item -> log(1 + e).
    # user 1 (h = (0, 2)) predicts item 2 (score 0); negatives: item 1 of user 0 (score 2) only,
    #   user 0's item 2 is his own -> log(1 + e^2).
    expected = (math.log(1 + E) + math.log(1 + E**2)) / 2
    loss = dap_loss(user_states, item_vectors, item_ids)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert naive_dap(user_states, item_vectors, item_ids) == pytest.approx(expected, abs=1e-9)


def test_dap_paper_layout_without_separate_target_matches_stage2_layout():
    user_states, item_vectors, item_ids = tiny_dap_batch()
    # N == S (paper form): the extra last state has no target and must not matter.
    full_states = torch.cat([user_states, torch.randn(2, 1, 2)], dim=1)  # (B, 3, d)
    assert dap_loss(full_states, item_vectors, item_ids).item() == pytest.approx(
        dap_loss(user_states, item_vectors, item_ids).item(), abs=1e-6
    )


def test_dap_log_popularity_correction():
    user_states, item_vectors, item_ids = tiny_dap_batch()
    log_popularity = torch.tensor([0.0, 0.5, -1.0, 2.0])  # items 0..3
    # n = 4 in-batch candidates; a negative of item j is shifted by log(4 e^{lp_j}), the positive is not.
    # user 0: positive item 2 -> 1; negative item 3 -> 2 - log 4 - 2: log(1 + e^-1 / 4).
    # user 1: positive item 2 -> 0; negative item 1 -> 2 - log 4 - 0.5: log(1 + e^1.5 / 4).
    expected = (math.log(1 + E**-1 / 4) + math.log(1 + E**1.5 / 4)) / 2
    loss = dap_loss(user_states, item_vectors, item_ids, log_popularity=log_popularity)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # Uniform popularity (p = 1/3 over 3 items): every negative is shifted by log(4/3), nothing else.
    uniform = torch.full((4,), math.log(1 / 3))
    shifted = (math.log(1 + E**1 * 3 / 4) + math.log(1 + E**2 * 3 / 4)) / 2
    assert dap_loss(user_states, item_vectors, item_ids, log_popularity=uniform).item() == pytest.approx(shifted, abs=1e-6)
    # A more popular negative is penalised harder, so it costs less.
    more_popular = log_popularity.clone()
    more_popular[3] += 1.0
    assert dap_loss(user_states, item_vectors, item_ids, log_popularity=more_popular) < loss


def test_dap_temperature_scales_logits():
    user_states, item_vectors, item_ids = tiny_dap_batch()
    hot = dap_loss(user_states, item_vectors, item_ids, temperature=0.5)
    assert hot.item() == pytest.approx(dap_loss(user_states * 2, item_vectors, item_ids).item(), abs=1e-6)
    expected = (math.log(1 + E**2) + math.log(1 + E**4)) / 2
    assert hot.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_dap_matches_naive_reference(seed, temperature):
    item_ids, vectors, states, _ = random_batch(seed)
    log_popularity = torch.randn(10, generator=torch.Generator().manual_seed(seed + 100))
    for popularity in (None, log_popularity):
        loss = dap_loss(states, vectors, item_ids, log_popularity=popularity, temperature=temperature)
        reference = naive_dap(states, vectors, item_ids, popularity, temperature)
        assert loss.item() == pytest.approx(reference, abs=1e-5)


def test_dap_gradients_flow_and_no_valid_position_is_zero():
    item_ids, vectors, states, _ = random_batch(3)
    vectors.requires_grad_(True)
    states.requires_grad_(True)
    dap_loss(states, vectors, item_ids).backward()
    assert torch.isfinite(vectors.grad).all() and vectors.grad.abs().sum() > 0
    assert torch.isfinite(states.grad).all() and states.grad.abs().sum() > 0
    empty = torch.zeros_like(item_ids)
    assert dap_loss(states, vectors, empty).item() == 0.0


def test_dap_rejects_mismatched_lengths():
    item_ids, vectors, states, _ = random_batch(0)
    with pytest.raises(ValueError):
        dap_loss(states[:, :3], vectors, item_ids)


# ---------------------------------------------------------------- NICL


def tiny_nicl_batch():
    # user 0 items [1, 2], user 1 items [3, 1]: item 1 is shared, so it is no negative for either.
    item_ids = torch.tensor([[1, 2], [3, 1]])
    texts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 1.0]]])
    images = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, -1.0], [1.0, 0.0]]])
    return texts * 3.0, images * 0.5, item_ids  # scaling checks the ℓ2-normalisation


def test_nicl_hand_computed():
    texts, images, item_ids = tiny_nicl_batch()
    # Only position 0 has a next item. User 0, text anchor (1, 0): positives δ(t,v) = 1,
    # δ(t, v_next) = e, δ(t, t_next) = 1; negatives (user 1, item 3): δ = 1 (image), e^-1 (text).
    # The image anchor gives the same numbers; user 1's two directions give log(2+1/e) - log(2+1/e) = 0.
    expected = (math.log(2 + 1 / E) - math.log(2 + E)) / 2
    assert expected < 0  # eq. 8 read literally: next-item positives are not in the denominator
    assert nicl_loss(texts, images, item_ids).item() == pytest.approx(expected, abs=1e-6)
    # With the next items in the denominator: user 0 -> log(3+e+1/e) - log(2+e), user 1 -> log(3+2/e) - log(2+1/e).
    expected_in_den = (math.log(3 + E + 1 / E) - math.log(2 + E) + math.log(3 + 2 / E) - math.log(2 + 1 / E)) / 2
    loss = nicl_loss(texts, images, item_ids, next_item_in_denominator=True)
    assert loss.item() == pytest.approx(expected_in_den, abs=1e-6)
    assert loss.item() > 0


def test_vcl_and_icl_hand_computed():
    texts, images, item_ids = tiny_nicl_batch()
    # All four positions are anchors. VCL per anchor: log 2, log(1+1/e), log(1+1/e), log 2.
    vcl = (math.log(2) + math.log(1 + 1 / E)) / 2
    assert nicl_loss(texts, images, item_ids, variant="vcl").item() == pytest.approx(vcl, abs=1e-6)
    # ICL adds the intra-modality negatives: three anchors give log(2+1/e), user 1's last log(2+e).
    icl = (3 * math.log(2 + 1 / E) + math.log(2 + E)) / 4
    assert nicl_loss(texts, images, item_ids, variant="icl").item() == pytest.approx(icl, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", ["nicl", "icl", "vcl"])
def test_nicl_variants_match_naive_reference(seed, variant):
    item_ids, texts, _, images = random_batch(seed)
    for temperature in (1.0, 0.2):
        for in_den in (False, True):
            loss = nicl_loss(texts, images, item_ids, variant, temperature, next_item_in_denominator=in_den)
            reference = naive_nicl(texts, images, item_ids, variant, temperature, in_den)
            assert loss.item() == pytest.approx(reference, abs=1e-5)


def test_nicl_temperature_and_bad_variant():
    texts, images, item_ids = tiny_nicl_batch()
    # At temperature 0.5 user 0's terms double in the exponent; user 1 stays 0.
    expected = (math.log(1 + 1 + E**-2) - math.log(1 + E**2 + 1)) / 2
    assert nicl_loss(texts, images, item_ids, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        nicl_loss(texts, images, item_ids, variant="clip")


def test_nicl_logq_hand_computed():
    texts, images, item_ids = tiny_nicl_batch()
    # Popularity: items 1, 2, 3 have probability 1/2, 1/4, 1/4; n = 4 candidates, so the only
    # negative of user 0 (item 3) is expected once: log E = log(4 / 4) = 0 and nothing changes.
    log_pop = torch.log(torch.tensor([1.0, 0.5, 0.25, 0.25]))
    plain = nicl_loss(texts, images, item_ids)
    assert nicl_loss(texts, images, item_ids, log_popularity=log_pop).item() == pytest.approx(plain.item(), abs=1e-6)
    # Item 3 at probability 1/8: expected 0.5 copies, so its negative logits grow by log 2:
    # user 0 -> log(2 + 2 (1 + 1/e)) / 2 ... by hand: denominator δ(t,v) + 2 δ(t, v3) + 2 δ(t, t3).
    log_pop = torch.log(torch.tensor([1.0, 0.5, 0.375, 0.125]))
    user0 = math.log(1 + 2 * 1 + 2 / E) - math.log(2 + E)
    # User 1's negative is item 2 (p = 3/8, E = 1.5): both its anchors lose log 1.5 on the negatives.
    # text anchor item 3 (-1, 0): positive δ(t3, v3) = 1, negatives δ(t3, v2) = 1/e, δ(t3, t2) = 1; its
    # next item (item 1) adds δ(t3, v1) = 1 and δ(t3, t1) = 1/e to the numerator.
    user1_text = math.log(1 + (1 / E + 1) / 1.5) - math.log(1 + 1 + 1 / E)
    # image anchor item 3 (0, -1): δ(v3, t3) = 1, negatives δ(v3, t2) = 1/e, δ(v3, v2) = 1; next
    # item: δ(v3, t1) = 1, δ(v3, v1) = 1/e.
    user1_image = math.log(1 + (1 / E + 1) / 1.5) - math.log(1 + 1 + 1 / E)
    expected = (user0 + (user1_text + user1_image) / 2) / 2
    loss = nicl_loss(texts, images, item_ids, log_popularity=log_pop)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_nicl_ignores_padding_vectors():
    item_ids, texts, _, images = random_batch(4)
    loss = nicl_loss(texts, images, item_ids)
    noisy_texts, noisy_images = texts.clone(), images.clone()
    noisy_texts[item_ids == 0] = 100.0
    noisy_images[item_ids == 0] = -100.0
    assert nicl_loss(noisy_texts, noisy_images, item_ids).item() == pytest.approx(loss.item(), abs=1e-6)


# ---------------------------------------------------------------- NID


def test_nid_is_cross_entropy_over_logits_ignoring_padding():
    logits = torch.tensor([[[1.0, -1.0, 0.5], [-2.0, 3.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[0, 2, -100]])
    # Plain logits: [1, -1, 0.5] label 0 ; [-2, 3, 0] label 2; the padded position is ignored.
    first = -1.0 + math.log(E + E**-1 + E**0.5)
    second = -0.0 + math.log(E**-2 + E**3 + 1)
    assert nid_loss(logits, labels).item() == pytest.approx((first + second) / 2, abs=1e-6)
    # Eq. 10 as printed: ReLU -> [1, 0, 0.5] ; [0, 3, 0]: the negative logits are clipped to 0.
    first_relu = -1.0 + math.log(E + 1 + E**0.5)
    second_relu = -0.0 + math.log(1 + E**3 + 1)
    assert nid_loss(logits, labels, relu=True).item() == pytest.approx((first_relu + second_relu) / 2, abs=1e-6)
    assert nid_loss(logits, torch.full_like(labels, -100)).item() == 0.0
    with pytest.raises(ValueError):
        nid_loss(logits[..., :2], labels)


def test_nid_relu_cannot_rule_a_class_out():
    # A classifier sure of class 0 wants the other logits very negative; ReLU clips them to 0, so
    # its loss stays at log(1 + 2 e^-z) while plain logits reach ~0.
    logits = torch.tensor([[[5.0, -20.0, -20.0]]])
    labels = torch.tensor([[0]])
    assert nid_loss(logits, labels).item() < 1e-6
    assert nid_loss(logits, labels, relu=True).item() == pytest.approx(math.log(1 + 2 * E**-5), abs=1e-6)


# ---------------------------------------------------------------- RCL and pooling


def test_rcl_hand_computed():
    original = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corrupted = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    raw = (math.log(1 + E**-2) + math.log(1 + E**-1)) / 2
    assert rcl_loss(original, corrupted, normalize=False).item() == pytest.approx(raw, abs=1e-6)
    assert rcl_loss(original, corrupted).item() == pytest.approx(math.log(1 + E**-1), abs=1e-6)
    assert rcl_loss(original, corrupted, temperature=0.5).item() == pytest.approx(math.log(1 + E**-2), abs=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_rcl_matches_naive_reference(normalize):
    generator = torch.Generator().manual_seed(5)
    original, corrupted = torch.randn(6, 4, generator=generator), torch.randn(6, 4, generator=generator)
    for temperature in (1.0, 0.1):
        loss = rcl_loss(original, corrupted, temperature, normalize)
        assert loss.item() == pytest.approx(naive_rcl(original, corrupted, temperature, normalize), abs=1e-5)


def test_masked_mean_pool():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    pooled = masked_mean_pool(states, mask)
    assert pooled.tolist() == [[2.0, 3.0], [0.0, 0.0]]


# ------------------------------------------------------------- sampling correction and candidates


def naive_mixed_dap(user_states, item_vectors, item_ids, extra_vectors, extra_ids, log_probability, predict=None):
    """Mixed negatives by loops: each negative copy of item j is corrected by log(n p_j + M / N), its
    expected copies over n in-batch and M uniform draws; the positive is not corrected; a user's own
    items are never negatives."""
    batch, length = item_ids.shape
    flat_vectors = item_vectors.reshape(batch * length, -1).double()
    flat_ids = item_ids.reshape(-1)
    pool = int((flat_ids != 0).sum())
    num_items = len(log_probability) - 1
    losses = []
    for u in range(batch):
        own = {int(i) for i in item_ids[u] if int(i) != 0}
        negatives = naive_negatives(item_ids, u)
        for t in range(length - 1):
            if item_ids[u, t] == 0 or item_ids[u, t + 1] == 0 or (predict is not None and not predict[u, t]):
                continue
            h = user_states[u, t].double()

            def expected(item):
                return pool * math.exp(float(log_probability[item])) + len(extra_ids) / num_items

            logits = [float(h @ flat_vectors[u * length + t + 1])]
            logits += [float(h @ flat_vectors[c]) - math.log(expected(int(flat_ids[c]))) for c in negatives]
            logits += [float(h @ extra_vectors[m].double()) - math.log(expected(int(extra_ids[m])))
                       for m in range(len(extra_ids)) if int(extra_ids[m]) not in own]
            losses.append(-logits[0] + math.log(sum(math.exp(x) for x in logits)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_negatives_and_predict_mask_match_naive_reference(seed):
    item_ids, vectors, states, _ = random_batch(seed)
    generator = torch.Generator().manual_seed(seed + 7)
    log_probability = torch.log_softmax(torch.randn(10, generator=generator), 0)
    extra_ids = torch.randint(1, 10, (5,), generator=generator)
    extra_vectors = torch.randn(5, vectors.shape[-1], generator=generator)
    predict = torch.rand(item_ids.shape[0], item_ids.shape[1] - 1, generator=generator) > 0.3
    loss = dap_loss(states, vectors, item_ids, log_probability, extra_vectors=extra_vectors, extra_ids=extra_ids,
                    predict=predict)
    assert loss.item() == pytest.approx(
        naive_mixed_dap(states, vectors, item_ids, extra_vectors, extra_ids, log_probability, predict), abs=1e-5)


def test_logq_makes_the_in_batch_optimum_that_of_the_full_softmax():
    """Targets follow a skewed popularity p, and the in-batch candidates are the batch's own targets,
    so negatives are drawn in proportion to p. The full softmax's optimum is score_i = log p_i (+ c).
    Uncorrected, the in-batch loss learns a popularity-discounted score (nearly flat); with logQ it
    learns log p, as the full softmax does."""
    torch.manual_seed(0)
    num_items, batch = 6, 48
    p = torch.tensor([16.0, 8, 4, 2, 1, 1])
    p = p / p.sum()
    log_p = torch.cat([torch.zeros(1), p.log(), torch.zeros(1)])  # padding, items, the context item
    context = num_items + 1  # every user's first item: its own item, so never a candidate

    def fit(loss_of):
        scores = torch.zeros(num_items + 2, 1, requires_grad=True)  # item "vectors" in d = 1; the user state is 1
        optimizer = torch.optim.Adam([scores], lr=0.05)
        for _ in range(600):
            targets = torch.multinomial(p, batch, replacement=True) + 1  # (B,)
            ids = torch.stack([torch.full((batch,), context), targets], 1)  # (B, 2)
            loss = loss_of(torch.ones(batch, 1, 1), scores, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        learned = scores.detach()[1:num_items + 1, 0]
        return learned - learned.mean()

    full = fit(lambda h, table, ids: catalogue_dap_loss(h, table[1:num_items + 1], ids))
    corrected = fit(lambda h, table, ids: dap_loss(h, table[ids], ids, log_popularity=log_p))
    plain = fit(lambda h, table, ids: dap_loss(h, table[ids], ids))
    truth = p.log() - p.log().mean()
    assert (full - truth).abs().max() < 0.25, (full, truth)
    assert (corrected - full).abs().max() < 0.35, (corrected, full)
    # Without the correction the scores are popularity-discounted: far from the full softmax's.
    assert (plain - full).abs().max() > max(0.8, 3 * (corrected - full).abs().max()), (plain, corrected, full)
