"""Training batches: prefetching on a background thread changes nothing, and duplicate items in a batch
are encoded once with the same vectors as encoding every position.

Runs on the tiny toy cache of test_train (2-block BERT + tiny ViT, d = 32).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pmmcache import train
from pmmcache.batches import Prefetcher, prepare_batch, trim_padding
from pmmcache.runs import setup

from helpers.toy import read_history, train_config


def test_training_with_and_without_prefetch_gives_the_same_losses_and_weights(toy, tmp_path):
    results = {}
    for prefetch in (True, False):
        config = train_config(toy, tmp_path / "runs", f"prefetch-{prefetch}", epochs=2, prefetch=prefetch)
        results[prefetch] = train.run(config, show_progress=False)
    with_prefetch, plain = (read_history(results[p].run_dir) for p in (True, False))
    losses = [{k: v for k, v in r.items() if k.startswith("train_")} for r in plain]
    assert {"train_dap", "train_nicl", "train_nid", "train_rcl"} <= set(losses[0])  # corruption is exercised
    assert [{k: v for k, v in r.items() if k.startswith("train_")} for r in with_prefetch] == losses
    assert results[True].metrics == results[False].metrics
    from safetensors.torch import load_file
    got, want = (load_file(str(results[p].run_dir / "best" / "item_tower.safetensors")) for p in (True, False))
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_prefetched_batches_equal_plain_ones_in_order(toy):
    config = train_config(toy, toy.cache_dir.parent / "unused-runs", "x")
    s = setup(config, torch.device("cpu"))
    sequences = torch.from_numpy(s.dataset.train_sequences(config.max_len + 1)).long()
    batches = train.epoch_batches(len(sequences), 8, epoch=0, seed=1)

    def prepared(enabled: bool) -> list:
        generator = torch.Generator().manual_seed(7)
        return list(Prefetcher(batches, lambda users: prepare_batch(
            sequences, users, s.store, torch.device("cpu"), (0.3, 0.2), generator), enabled=enabled))

    fast, slow = prepared(True), prepared(False)
    assert len(fast) == len(slow) == len(batches)
    for a, b, users in zip(fast, slow, batches):
        assert torch.equal(a.ids, trim_padding(sequences[torch.from_numpy(users)]))
        for name in ("ids", "inverse", "corrupted_inverse", "labels"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.states.text, b.states.text) and torch.equal(a.states.image, b.states.image)
        assert a.num_items == b.num_items == int((a.ids > 0).sum())
        assert (a.labels != 0).any()  # the corruption really happened


def test_prefetcher_raises_the_error_of_its_item_and_stops_when_closed():
    def prepare(x: int) -> int:
        if x == 3:
            raise ValueError("bad item 3")
        return x * 10

    fetcher = Prefetcher(range(6), prepare, depth=2)
    assert [next(fetcher), next(fetcher), next(fetcher)] == [0, 10, 20]
    with pytest.raises(ValueError, match="bad item 3"):
        next(fetcher)
    with pytest.raises(StopIteration):
        next(fetcher)

    started = threading.active_count()
    fetcher = Prefetcher(range(10**6), lambda x: x, depth=1)
    assert next(fetcher) == 0
    fetcher.close()
    fetcher._thread.join(timeout=5)
    assert not fetcher._thread.is_alive() and threading.active_count() <= started
    assert list(Prefetcher([], lambda x: x)) == [] and list(Prefetcher([1, 2], lambda x: -x, enabled=False)) == [-1, -2]


def test_duplicate_items_encoded_once_give_the_vectors_of_encoding_every_position(toy):
    config = train_config(toy, toy.cache_dir.parent / "unused-runs", "x")
    s = setup(config, torch.device("cpu"))
    model = s.model.eval()  # no dropout: both paths must be the same function
    ids = torch.tensor([[0, 0, 3, 5, 3], [5, 7, 7, 3, 1], [0, 2, 2, 2, 9]])  # repeats within and across users
    unique, inverse = torch.unique(ids, return_inverse=True)
    assert len(unique) < ids.numel()
    with torch.no_grad():
        deduplicated = model.encode_items(s.store.get(unique)).vector[inverse]  # (B, N, d)
        every_position = model.encode_items(s.store.get(ids.reshape(-1))).vector.reshape(*ids.shape, -1)
    torch.testing.assert_close(deduplicated, every_position, atol=1e-6, rtol=1e-5)
    assert np.isfinite(deduplicated.numpy()).all()


def test_prefetcher_close_can_wait_for_its_thread_to_leave():
    """Before the interpreter exits (Ctrl-C in extraction): a thread still inside torch would abort it."""
    import time

    prefetcher = Prefetcher(range(10), lambda i: time.sleep(0.2) or i, depth=1)
    assert next(prefetcher) == 0
    prefetcher.close(wait=5.0)
    assert not any(t.name == "pmmcache-prefetch" for t in threading.enumerate())
