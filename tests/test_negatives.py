"""In-batch negatives from the per-user bitmap: the same losses and gradients as a naive loop over users
and candidates, and as the pairwise-mask implementation they replaced (`pmmcache.bench.pairwise`), for
every objective and option that uses the mask (DAP: logQ, temperature, mixed negatives, predict, both
layouts; NICL: every variant, next item in the denominator, logQ, temperature)."""
import itertools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from pmmcache import train
from pmmcache.bench.pairwise import (pairwise_dap_loss, pairwise_negative_mask, pairwise_nicl_loss,
                                     pairwise_objectives, pairwise_own_item_mask)
from pmmcache.objectives import dap_loss, in_batch_negative_mask, nicl_loss, own_item_mask

NUM_ITEMS = 9  # small: ids repeat within and across users


def batch_with_repeats(seed: int, batch: int = 4, length: int = 6, dim: int = 8):
    """Ids with repeats inside a row and across rows, left padding, a hole, and one user whose items
    are also another's (no negative of its own beyond theirs); float inputs for every objective."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM_ITEMS + 1, (batch, length), generator=generator)
    ids[1, :2] = 0  # left padding
    ids[2 % batch, 2] = 0  # a hole inside a row
    ids[0, 3] = ids[0, 1]  # a duplicate inside a row
    ids[-1] = ids[0]  # a whole row repeated: the same items are own items of two users

    def tensor(*shape):
        return torch.randn(*shape, generator=generator)

    return ids, generator, tensor


def log_probability(generator):
    return torch.log_softmax(torch.randn(NUM_ITEMS + 1, generator=generator), 0)


# ------------------------------------------------------------------ naive references (loops, autograd)


def own_items(ids, user):
    return {int(i) for i in ids[user] if int(i) != 0}


def naive_dap(states, vectors, ids, log_p=None, temperature=1.0, extra_vectors=None, extra_ids=None, predict=None):
    """Per user and position: the positive against every non-padding in-batch item that is not the
    user's own (and every extra one that is not), each negative lowered by log of its expected copies."""
    batch, length = ids.shape
    flat_vectors, flat_ids = vectors.reshape(batch * length, -1).double(), ids.reshape(-1)
    pool, extra_count = int((flat_ids != 0).sum()), 0 if extra_ids is None else len(extra_ids)

    def shift(item):
        return 0.0 if log_p is None else torch.log(pool * log_p[item].double().exp() + extra_count / NUM_ITEMS)

    losses = []
    for u in range(batch):
        own = own_items(ids, u)
        for t in range(length - 1):
            if ids[u, t] == 0 or ids[u, t + 1] == 0 or (predict is not None and not predict[u, t]):
                continue
            h = states[u, t].double() / temperature
            logits = [h @ flat_vectors[u * length + t + 1]]
            logits += [h @ flat_vectors[c] - shift(int(flat_ids[c])) for c in range(batch * length)
                       if int(flat_ids[c]) != 0 and int(flat_ids[c]) not in own]
            for m in range(extra_count):
                if int(extra_ids[m]) not in own:
                    logits.append(h @ extra_vectors[m].double() - shift(int(extra_ids[m])))
            logits = torch.stack(logits)
            losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def naive_nicl(texts, images, ids, variant="nicl", temperature=1.0, in_denominator=False, log_p=None):
    """Eq. 6-9 per anchor and direction, negatives = other users' items that are not the anchor user's."""
    batch, length = ids.shape
    texts = F.normalize(texts.double(), dim=-1).reshape(batch * length, -1)
    images = F.normalize(images.double(), dim=-1).reshape(batch * length, -1)
    flat_ids = ids.reshape(-1)
    pool = int((flat_ids != 0).sum())

    def shift(column):
        return 0.0 if log_p is None else torch.log(pool * log_p[flat_ids[column]].double().exp())

    losses = []
    for u in range(batch):
        own = own_items(ids, u)
        negatives = [c for c in range(batch * length) if int(flat_ids[c]) != 0 and int(flat_ids[c]) not in own]
        for position in range(length):
            nicl_needs_next = variant == "nicl" and (position == length - 1 or ids[u, position + 1] == 0)
            if ids[u, position] == 0 or nicl_needs_next:
                continue
            row = u * length + position
            directions = []
            for anchors, other in ((texts, images), (images, texts)):
                a = anchors[row] / temperature
                positive = a @ other[row]
                denominator = [positive] + [a @ other[c] - shift(c) for c in negatives]
                if variant != "vcl":
                    denominator += [a @ anchors[c] - shift(c) for c in negatives]
                numerator = [positive]
                if variant == "nicl":
                    following = [a @ other[row + 1], a @ anchors[row + 1]]
                    numerator += following
                    if in_denominator:
                        denominator += following
                directions.append(torch.logsumexp(torch.stack(denominator), 0)
                                  - torch.logsumexp(torch.stack(numerator), 0))
            losses.append((directions[0] + directions[1]) / 2)
    return torch.stack(losses).mean()


def loss_and_grads(loss_fn, inputs, **options):
    """The loss and its gradient with respect to every float input (fresh leaves each call)."""
    leaves = [x.clone().requires_grad_(True) for x in inputs[:2]]
    loss = loss_fn(*leaves, *inputs[2:], **options)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def assert_same(result, reference, **tolerance):
    loss, grads = result
    ref_loss, ref_grads = reference
    torch.testing.assert_close(loss, ref_loss.to(loss.dtype), **tolerance)  # default: float32's tolerances
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad.to(grad.dtype), **tolerance)


LOOSE = {"rtol": 1e-4, "atol": 1e-5}  # float32 vs the float64 loops


def dap_inputs(seed, length=6):
    ids, generator, tensor = batch_with_repeats(seed, length=length)
    return ids, generator, (tensor(4, length - 1, 8), tensor(4, length, 8), ids)


def nicl_inputs(seed):
    ids, generator, tensor = batch_with_repeats(seed)
    return ids, generator, (tensor(4, 6, 8) * 3.0, tensor(4, 6, 8) * 0.5, ids)


# ------------------------------------------------------------------ the mask


@pytest.mark.parametrize("seed", range(4))
def test_bitmap_masks_equal_the_pairwise_comparison(seed):
    ids, generator, _ = batch_with_repeats(seed, batch=6, length=7)
    assert torch.equal(in_batch_negative_mask(ids), pairwise_negative_mask(ids))
    extra = torch.randint(0, NUM_ITEMS + 3, (11,), generator=generator)  # ids outside the batch, padding too
    assert torch.equal(own_item_mask(ids, extra), pairwise_own_item_mask(ids, extra))
    assert not own_item_mask(ids, torch.zeros(3, dtype=torch.long)).any()  # padding is nobody's item


# ------------------------------------------------------------------ DAP


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("logq, temperature, mixed, predicted", [
    (False, 1.0, False, False), (True, 1.0, False, False), (True, 0.3, True, False), (False, 2.0, True, True),
    (True, 1.0, False, True),
])
def test_dap_losses_and_gradients_equal_the_naive_loop(seed, logq, temperature, mixed, predicted):
    ids, generator, inputs = dap_inputs(seed)
    options = {"temperature": temperature, "log_popularity": log_probability(generator) if logq else None}
    if mixed:  # extra ids include the users' own items, which must not count as negatives
        options["extra_ids"] = torch.cat([ids[0, 2:4], torch.randint(1, NUM_ITEMS + 1, (4,), generator=generator)])
        options["extra_vectors"] = torch.randn(6, 8, generator=generator)
    if predicted:
        options["predict"] = torch.rand(4, 5, generator=generator) > 0.3
    new = loss_and_grads(dap_loss, inputs, **options)
    naive = loss_and_grads(lambda s, v, i, log_popularity, **rest: naive_dap(s, v, i, log_popularity, **rest),
                           inputs, **options)
    assert_same(new, naive, **LOOSE)


def test_dap_options_equal_the_pairwise_implementation():
    for seed, logq, mixed, predicted, paper_layout in itertools.product(range(2), *[(False, True)] * 4):
        ids, generator, inputs = dap_inputs(seed, length=7)
        states, vectors, _ = inputs
        if paper_layout:  # N == S: the last state has no target
            states = torch.cat([states, torch.randn(4, 1, 8, generator=generator)], 1)
        options = {"temperature": 0.5, "log_popularity": log_probability(generator) if logq else None}
        if mixed:
            options["extra_ids"] = torch.randint(1, NUM_ITEMS + 1, (5,), generator=generator)
            options["extra_vectors"] = torch.randn(5, 8, generator=generator)
        if predicted:
            options["predict"] = torch.rand(4, 6, generator=generator) > 0.4
        assert_same(loss_and_grads(dap_loss, (states, vectors, ids), **options),
                    loss_and_grads(pairwise_dap_loss, (states, vectors, ids), **options))


# ------------------------------------------------------------------ NICL


@pytest.mark.parametrize("variant", ["nicl", "icl", "vcl"])
@pytest.mark.parametrize("logq", [False, True])
def test_nicl_losses_and_gradients_equal_the_naive_loop(variant, logq):
    for seed, temperature, in_denominator in itertools.product(range(2), (1.0, 0.2), (False, True)):
        ids, generator, inputs = nicl_inputs(seed)
        log_p = log_probability(generator) if logq else None
        new = loss_and_grads(nicl_loss, inputs, variant=variant, temperature=temperature,
                             next_item_in_denominator=in_denominator, log_popularity=log_p)
        naive = loss_and_grads(naive_nicl, inputs, variant=variant, temperature=temperature,
                               in_denominator=in_denominator, log_p=log_p)
        assert_same(new, naive, **LOOSE)


def test_nicl_options_equal_the_pairwise_implementation():
    for seed, variant, in_denominator, logq in itertools.product(range(2), ("nicl", "icl", "vcl"), *[(False, True)] * 2):
        ids, generator, inputs = nicl_inputs(seed)
        options = {"variant": variant, "temperature": 0.1, "next_item_in_denominator": in_denominator,
                   "log_popularity": log_probability(generator) if logq else None}
        assert_same(loss_and_grads(nicl_loss, inputs, **options), loss_and_grads(pairwise_nicl_loss, inputs, **options))


# ------------------------------------------------------------------ edge cases and the bench's seam


def test_users_without_any_negative_keep_finite_losses_and_gradients():
    """Every user holds the same items: no negatives anywhere (a logsumexp over nothing). The loss is
    the pairwise one (0 for DAP, the numerator's share for NICL) and no gradient is NaN."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.tensor([[0, 1, 2, 3], [0, 3, 2, 1], [0, 2, 1, 3]])
    states, vectors = torch.randn(3, 3, 8, generator=generator), torch.randn(3, 4, 8, generator=generator)
    texts, images = torch.randn(3, 4, 8, generator=generator), torch.randn(3, 4, 8, generator=generator)
    log_p = log_probability(generator)
    dap = loss_and_grads(dap_loss, (states, vectors, ids), log_popularity=log_p)
    assert_same(dap, loss_and_grads(pairwise_dap_loss, (states, vectors, ids), log_popularity=log_p))
    assert dap[0].item() == 0.0
    for variant in ("nicl", "icl", "vcl"):
        nicl = loss_and_grads(nicl_loss, (texts, images, ids), variant=variant, log_popularity=log_p)
        assert_same(nicl, loss_and_grads(pairwise_nicl_loss, (texts, images, ids), variant=variant, log_popularity=log_p))
        assert all(torch.isfinite(g).all() for g in nicl[1])


def test_the_bench_before_path_swaps_the_trainers_objectives_and_restores_them():
    with pairwise_objectives():
        assert (train.dap_loss, train.nicl_loss) == (pairwise_dap_loss, pairwise_nicl_loss)
    assert (train.dap_loss, train.nicl_loss) == (dap_loss, nicl_loss)
    with pytest.raises(RuntimeError), pairwise_objectives():
        raise RuntimeError("a failing step")
    assert (train.dap_loss, train.nicl_loss) == (dap_loss, nicl_loss)
