"""Stage-2 training batches: everything a step needs, prepared ahead of the step on a background thread.

A training step needs, per batch of users: their sequences with the all-padding columns dropped,
the unique items and each position's index among them (so a popular item is encoded once), the
NID/RCL corruption of the inputs, and the cached states of the unique items. `prepare_batch` does
all of that; `Prefetcher` runs it one batch ahead on a thread, so the data path overlaps the step
instead of stalling it (numpy indexing and torch ops release the GIL).

The result does not depend on prefetching: batches are prepared in order, by one thread, and the
corruption draws only from the epoch's own `torch.Generator`, never from the global RNG that
dropout uses on the training thread.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from pmmcache.cache import ItemStates
from pmmcache.corruption import corrupt_sequences
from pmmcache.items import ItemStore


@dataclass
class Batch:
    """One step's inputs, on the training device."""

    ids: torch.Tensor  # (B, N) left-padded item indices: N - 1 inputs, then the last target
    inverse: torch.Tensor  # (B, N) position of each item among the unique items of `states`
    states: ItemStates | None  # cached states of the U unique items (padding included); None: not read
    corrupted_inverse: torch.Tensor | None  # (B, N - 1) corrupted inputs as positions among the unique items
    labels: torch.Tensor | None  # (B, N - 1) NID labels of the corrupted inputs
    num_items: int  # non-padding positions, counted on the host (no device sync for the progress bar)
    predict: torch.Tensor | None = None  # (B, N - 1) bool: targets this batch trains on (None = all)
    negative_ids: torch.Tensor | None = None  # (M,) uniform catalogue negatives (mixed negatives)
    negative_inverse: torch.Tensor | None = None  # (M,) their positions among the unique items
    items: torch.Tensor | None = None  # (U,) the unique item indices, in the order of `states` (host)


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row (left-padded batches of short users);
    at least two columns (one input, one target) stay."""
    real = (ids > 0).any(0).nonzero()
    first = int(real[0]) if len(real) else ids.shape[1] - 2
    return ids[:, min(first, ids.shape[1] - 2):]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device; through pinned memory and an asynchronous copy on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def prepare_batch(sequences: torch.Tensor, users: np.ndarray, store: ItemStore, device: torch.device,
                  corruption: tuple[float, float] | None = None, generator: torch.Generator | None = None,
                  trim: Callable[[torch.Tensor], torch.Tensor] = trim_padding, predict: torch.Tensor | None = None,
                  uniform_negatives: int = 0, read_states: bool = True) -> Batch:
    """The batch of `users` (indices into `sequences` (U, N) of item indices, left-padded).

    `corruption` = (shuffle fraction, replace fraction) for NID/RCL, or None; `uniform_negatives`
    items are drawn uniformly from the catalogue as extra DAP negatives (encoded with the batch's
    own items). Both draw from `generator` (a host generator), so the same generator state gives the
    same batch. `predict` (U, N - 1) bool marks the targets each sequence trains on. `read_states=False`
    leaves the cache unread (`states` None): a step that encodes the whole catalogue takes the batch's
    items from the catalogue's vectors, so reading them again would be I/O for nothing.
    """
    rows = torch.from_numpy(np.asarray(users))
    ids = trim(sequences[rows])  # (B, N)
    negative_ids = None
    pool = ids.reshape(-1)
    if uniform_negatives > 0:
        negative_ids = torch.randint(1, store.num_items + 1, (uniform_negatives,), generator=generator)  # (M,)
        pool = torch.cat([pool, negative_ids])
    unique, inverse = torch.unique(pool, return_inverse=True)  # each item once: duplicates are encoded once
    negative_inverse = None
    if negative_ids is not None:
        inverse, negative_inverse = inverse[: ids.numel()], to_device(inverse[ids.numel():], device)
        negative_ids = to_device(negative_ids, device)
    inverse = inverse.reshape(ids.shape)
    corrupted_inverse = labels = None
    if corruption is not None:
        corrupted, labels = corrupt_sequences(ids[:, :-1], corruption[0], corruption[1], generator)
        corrupted_inverse = to_device(torch.searchsorted(unique, corrupted), device)
        labels = to_device(labels, device)
    if predict is not None:  # the same columns as the trimmed ids: the last N - 1 target slots
        predict = to_device(predict[rows][:, predict.shape[1] - (ids.shape[1] - 1):], device)
    states = store.get(unique) if read_states else None
    return Batch(ids=to_device(ids, device), inverse=to_device(inverse, device), states=states,
                 corrupted_inverse=corrupted_inverse, labels=labels, num_items=int((ids > 0).sum()),
                 predict=predict, negative_ids=negative_ids, negative_inverse=negative_inverse, items=unique)


Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
_DONE, _ERROR, _VALUE = "done", "error", "value"


class Prefetcher(Generic[Item, Prepared]):
    """Iterates `prepare(item)` for each of `items`, in order, computed up to `depth` items ahead on a
    background thread. An error in `prepare` is raised by the `next` call that would have returned
    its result. `enabled=False` prepares each item when it is asked for (the plain path).

    Stop early with `close()` (also called when the iterator is garbage collected); the thread is a
    daemon and never blocks interpreter exit.
    """

    def __init__(self, items: Iterable[Item], prepare: Callable[[Item], Prepared], depth: int = 1,
                 enabled: bool = True):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._items: Iterator[Item] = iter(items)
        self._prepare = prepare
        self._enabled = enabled
        self._finished = False
        if enabled:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._stop = threading.Event()
            # The thread gets what it needs, not `self`: otherwise it would keep the iterator alive.
            self._thread = threading.Thread(target=_produce, args=(self._items, prepare, self._queue, self._stop),
                                            name="pmmcache-prefetch", daemon=True)
            self._thread.start()

    def __iter__(self) -> "Prefetcher[Item, Prepared]":
        return self

    def __next__(self) -> Prepared:
        if self._finished:
            raise StopIteration
        if not self._enabled:
            try:
                return self._prepare(next(self._items))
            except StopIteration:
                self._finished = True
                raise
        kind, value = self._queue.get()
        if kind == _VALUE:
            return value
        self._finished = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self, wait: float = 0.0) -> None:
        """Stop the background thread (it finishes the item it is preparing, then exits); `wait` > 0
        waits up to that many seconds for it to exit: before the interpreter exits, since a thread
        still inside torch then aborts it ("terminate called without an active exception")."""
        self._finished = True
        if self._enabled:
            self._stop.set()
            while True:  # make room so that a blocked put returns at once
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            if wait > 0 and self._thread is not threading.current_thread():
                self._thread.join(wait)

    def __del__(self) -> None:
        if getattr(self, "_enabled", False):
            self.close()


def _produce(items: Iterator, prepare: Callable, out: queue.Queue, stop: threading.Event) -> None:
    """The background thread: prepare items in order into `out` until they run out or `stop` is set."""
    try:
        for item in items:
            if stop.is_set():
                return
            if not _put(out, (_VALUE, prepare(item)), stop):
                return
        _put(out, (_DONE, None), stop)
    except BaseException as err:  # handed to the consumer, which raises it
        _put(out, (_ERROR, err), stop)


def _put(out: queue.Queue, entry: tuple, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False
