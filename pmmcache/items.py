"""Stage 2's view of items: a prepared dataset's item indices mapped onto rows of an extracted cache.

The cache is keyed by item key, so a model trained on `demo/kitchen` reads the cache extracted for
`demo` (all domains), and items extracted later (new items) are found the same way.

`open_item_store` is where every stage-2 command (train, eval, recommend, coldstart, export-items)
opens the cache for a dataset; it checks there, once, that the cached states are of the items as they
are now (per-item fingerprints of text and image bytes) and samples the rows' checksums.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmmcache import cache as cache_io
from pmmcache.encoders import TextEncoder, VisionEncoder
from pmmcache.errors import CacheMismatchError, PmmcacheError
from pmmcache.integrity import check_sample

SHOWN = 5  # changed items named in a message; the rest are counted


def default_cache_dataset(dataset: str) -> str:
    """`demo/kitchen,demo/garden` -> `demo`: parts of one dataset read that dataset's cache."""
    bases = {name.strip().split("/")[0] for name in dataset.split(",") if name.strip()}
    return bases.pop() if len(bases) == 1 else dataset


def find_cache(cache_dir: Path, cache_dataset: str, text: TextEncoder | None, vision: VisionEncoder | None) -> Path:
    """The cache file for these encoders: the one named by their key, else any cache of the dataset
    whose manifest matches them (e.g. a text-only model reads the text part of a text+image cache, and
    any model reads an int8 cache, `<key>+int8.h5`, when there is no float16 one)."""
    path = cache_io.cache_path(cache_dir, cache_dataset,
                               cache_io.cache_key(text.spec if text else None, vision.spec if vision else None))
    if path.is_file():
        return path
    expected = expected_manifest(text, vision)
    for candidate in sorted(path.parent.glob("*.h5")):
        try:
            if not cache_io.manifest_differences(cache_io.read_manifest(candidate), expected):
                return candidate
        except PmmcacheError:
            continue  # unreadable or other format version: not a candidate
    raise PmmcacheError(
        f"no feature cache {path} for these encoders; run `pmmcache extract --dataset {cache_dataset}` "
        "with the same encoder options first")


def expected_manifest(text: TextEncoder | None, vision: VisionEncoder | None) -> dict[str, Any]:
    """What a cache must say about its encoders to feed a model built from `text` and `vision`."""
    entries = {"text": cache_io.encoder_entry(text), "image": cache_io.encoder_entry(vision)}
    return cache_io.fitting_manifest(entries, tuple(name for name, entry in entries.items() if entry is not None))


def open_item_store(path: Path, dataset: Any, expected: dict[str, Any], storage: cache_io.Storage = "auto",
                    device: str | torch.device = "cpu") -> "ItemStore":
    """The cached states of a prepared `dataset`'s items, from the cache at `path` made by the encoders
    `expected` describes. Refuses (CacheMismatchError) a cache whose states are of changed items, and
    (CacheCorruptError) one whose sampled rows fail their checksums."""
    reader = cache_io.CacheReader(path, expected=expected, storage=storage, device=device)
    check_sample(reader.path)
    store = ItemStore(reader, dataset.item_keys())
    store.check_current(dataset.item_fingerprints())
    return store


class ItemStore:
    """Cached states by dataset item index (0 = padding), through a key -> cache-row map."""

    def __init__(self, reader: cache_io.CacheReader, dataset_keys: list[str]):
        self.reader = reader
        rows_by_key = {key: row for row, key in enumerate(cache_io.read_keys(reader.path)) if key}
        missing = [key for key in dataset_keys if key not in rows_by_key]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise PmmcacheError(f"{len(missing)} item(s) are not in the cache {reader.path}: {shown}; "
                                "extract them first (`pmmcache extract`)")
        rows = np.zeros(len(dataset_keys) + 1, dtype=np.int64)
        rows[1:] = [rows_by_key[key] for key in dataset_keys]
        self.rows = torch.from_numpy(rows)  # (N + 1,) dataset index -> cache row; 0 -> 0 (padding row)

    @property
    def num_items(self) -> int:
        return len(self.rows) - 1

    def check_current(self, fingerprints: np.ndarray) -> None:
        """CacheMismatchError naming the items whose content changed since their states were extracted.

        `fingerprints`: (N, 16) uint8, `PreparedDataset.item_fingerprints()` in dataset index order.
        A cache without item hashes (older pmmcache) cannot be checked: a warning says so."""
        path = self.reader.path
        hashes = cache_io.open_maps(path, names={"item_hash"}).get("item_hash")
        if hashes is None:
            print(f"warning: {path} records no per-item fingerprints (made by an older pmmcache): it cannot be "
                  "checked against the current items; rerun `pmmcache extract` with --force to record them",
                  file=sys.stderr)
            return
        changed = np.flatnonzero((hashes[self.rows[1:].numpy()] != fingerprints).any(axis=1))  # dataset index - 1
        if not len(changed):
            return
        keys = cache_io.read_keys(path)
        names = [keys[int(self.rows[i + 1])] for i in changed]
        shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
        made_by = self.reader.manifest.get("extract", {}).get("dataset") or self.reader.manifest["dataset"]["name"]
        raise CacheMismatchError(
            f"{path} holds states of an older version of {len(names)} item(s) (their text or image changed "
            f"since extraction): {shown}; run `pmmcache extract --dataset {made_by}` with the options that made "
            "the cache to re-encode just those items")

    def get(self, indices: torch.Tensor, trim_text: bool = True) -> cache_io.ItemStates:
        """States of dataset items `indices`. `trim_text` drops token columns that are padding for
        every item of the batch: the cache stores 50 tokens, short titles use far fewer, and masked
        tokens change no output, so the top blocks and fusion just do less work."""
        states = self.reader.get(self.rows[indices.cpu()])
        if trim_text and states.text_mask is not None and states.text_mask.numel():
            used = states.text_mask.reshape(-1, states.text_mask.shape[-1]).any(0).nonzero()
            length = int(used[-1]) + 1 if len(used) else 1
            states.text = states.text[..., :length, :]
            states.text_mask = states.text_mask[..., :length]
        return states


def nonfinite_items(states: cache_io.ItemStates) -> torch.Tensor:
    """(U,) bool for the states of U items: True where an item's cached text or image states hold a
    NaN or an infinity (an fp16 overflow at extraction, a damaged file), which no training can mend."""
    bad = torch.zeros(states.modality.shape[0], dtype=torch.bool, device=states.modality.device)
    for tensor in (states.text, states.image):
        if tensor is not None:
            bad |= ~torch.isfinite(tensor).flatten(1).all(1)
    return bad


class IdItems:
    """The "store" of an ID-based model: an item's input is its index (there is no cache to read)."""

    def __init__(self, num_items: int):
        self._num_items = num_items

    @property
    def num_items(self) -> int:
        return self._num_items

    def get(self, indices: torch.Tensor, trim_text: bool = True) -> torch.Tensor:
        return indices.long()
