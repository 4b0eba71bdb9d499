"""Preparation: raw source -> k-core filtered, chronological, leave-one-out-ready dataset.

A `PreparedDataset` holds one item index shared by every later stage (1..N, 0 = padding) and each
user's whole sequence, oldest first (`truncate=True` cuts it to its last `max_history + 1` items at
preparation, as the released code does at load). Leave-one-out splits: train = seq[:-2];
valid = (seq[:-2] -> seq[-2]); test = (seq[:-1] -> seq[-1]); every split keeps the last `max_history`
items of a history, so training and evaluation see the same inputs either way. The whole sequence
feeds what needs it: cold-start cases (every prefix ending in a cold item), training on every
window of a long sequence, and item popularity.
Item keys are `<source>/<raw item id>` and user keys `<source>/<raw user id>`, so sources combine
without collisions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pmmcache.config import from_dict, to_dict
from pmmcache.data.images import ImageStore, open_image_store
from pmmcache.data.readers import RawDataset
from pmmcache.errors import ConfigError, DataError, PmmcacheError

FORMAT_VERSION = 3  # 2: whole sequences by default (PrepareConfig.truncate); 3: image_sha256 per item
MIN_SEQUENCE = 3  # leave-one-out needs one training item, a validation target and a test target
PROBLEM_EXAMPLES = 20  # problems listed by name in reports; the rest are only counted
MAX_UNKNOWN_FRACTION = 0.5  # more interactions than this naming unknown items: the input is misread

ITEM_SCHEMA = pa.schema(
    [
        ("index", pa.int32()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("image_store", pa.int16()),  # position in `image_stores`, -1 = no image
        ("image_key", pa.string()),
    ]
)
# Appended to ITEM_SCHEMA by PreparedDataset: sha256 (hex) of each item's encoded image bytes, null
# without an image. Read once at preparation, so a replaced image changes the dataset's fingerprint.
IMAGE_DIGEST = "image_sha256"
ITEM_FINGERPRINT_BYTES = 16  # per-item fingerprint: the first bytes of sha256(text, image digest)
USER_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("items", pa.list_(pa.int32()))])


@dataclass(frozen=True)
class PrepareConfig:
    """How raw interactions become training sequences."""

    min_core: int = 5  # every kept user and item has at least this many interactions (0 = no filter)
    max_history: int = 20  # history items the splits keep before a target (the last ones)
    truncate: bool = False  # True: store only the last max_history + 1 items (released code)
    # Released code's preprocessing (src/data_utils/tools.py): each user's sequence cut to its last
    # max_seq_len + 3 = 23 items before anything else, items then in no sequence leave the catalogue
    # (0 = no cut); titles lower-cased before tokenising. With min_core = 0, as there: no k-core,
    # only users with fewer than 3 items dropped.
    keep_last: int = 0
    lowercase_text: bool = False
    # Files of the PMMRec layout, relative to the dataset folder (or absolute); None = found by suffix.
    users: str | None = None
    texts: str | None = None
    images: str | None = None

    def __post_init__(self):
        if self.min_core < 0:
            raise ConfigError(f"min_core must be >= 0, got {self.min_core}")
        if self.keep_last and self.keep_last < MIN_SEQUENCE:
            raise ConfigError(f"keep_last must be 0 (no cut) or >= {MIN_SEQUENCE}, got {self.keep_last}")
        if self.max_history < MIN_SEQUENCE - 1:
            raise ConfigError(f"max_history must be >= {MIN_SEQUENCE - 1}, got {self.max_history}")


@dataclass
class PreparedDataset:
    """Items, user sequences and image stores of one or several sources, in one index space.

    `items`: one row per item, ordered by `index` (1..N): key, source, text (null = none),
    image_store (position in `image_stores`, -1 = none), image_key (key inside that store).
    `users`: key, source, items (list<int32>, oldest first; at most max_history + 1 long if truncated).
    """

    name: str
    items: pa.Table
    users: pa.Table
    image_stores: list[dict[str, Any]]
    config: PrepareConfig
    report: dict[str, Any]
    fingerprint: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        digests = (self.items.column(IMAGE_DIGEST) if IMAGE_DIGEST in self.items.column_names
                   else pa.array(image_digests(self.items, self.image_stores), pa.string()))
        self.items = self.items.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA).append_column(IMAGE_DIGEST, digests)
        self.users = self.users.cast(USER_SCHEMA)
        if not self.fingerprint:
            self.fingerprint = content_fingerprint(self.items, self.users)

    # ------------------------------------------------------------ sizes and lookups

    @property
    def num_items(self) -> int:
        """N, the number of catalogue items; indices run 1..N and 0 is padding."""
        return self.items.num_rows

    @property
    def num_users(self) -> int:
        return self.users.num_rows

    @property
    def sources(self) -> list[str]:
        """Source names in the order their items appear."""
        return list(dict.fromkeys(self.items.column("source").to_pylist()))

    def item_keys(self) -> list[str]:
        """Item keys in index order: `item_keys()[i - 1]` is the key of index i."""
        return self.items.column("key").to_pylist()

    def item_fingerprints(self) -> np.ndarray:
        """(N, ITEM_FINGERPRINT_BYTES) uint8, row i - 1 for index i: what the cached states of an item
        depend on (its text and its image bytes), so a changed item is found by comparing these."""
        texts = self.items.column("text").to_pylist()
        digests = self.items.column(IMAGE_DIGEST).to_pylist()
        out = np.zeros((len(texts), ITEM_FINGERPRINT_BYTES), np.uint8)
        for row, (text, digest) in enumerate(zip(texts, digests)):
            entry = json.dumps([text, digest], ensure_ascii=False).encode("utf-8")
            out[row] = np.frombuffer(hashlib.sha256(entry).digest()[:ITEM_FINGERPRINT_BYTES], np.uint8)
        return out

    def open_image_stores(self) -> list[ImageStore]:
        """The image stores, opened in this process, in `image_store` order."""
        return [open_image_store(spec) for spec in self.image_stores]

    # ------------------------------------------------------------ split arrays

    def _sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        column = self.users.column("items").combine_chunks()
        offsets = column.offsets.to_numpy().astype(np.int64)
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int32)
        return values, offsets[:-1], offsets[1:]

    def prefix_cases(self, ends_with: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Every prefix of a complete user sequence whose last item is one of `ends_with` ((N + 1,)
        bool by item index) and that has something before it: its history ((C, max_len) int32, the
        last max_len items before it, left-padded with 0) and that last item ((C,) int32 targets)."""
        values, starts, ends = self._sequences()
        positions = _ranges(starts, ends)  # (V,) every position of every sequence in `values`
        owners = np.repeat(np.arange(len(starts)), ends - starts)  # (V,) its user
        case = ends_with[values[positions]] & (positions > starts[owners])  # a chosen item with something before it
        positions, owners = positions[case], owners[case]
        return _left_padded(values, starts[owners], positions, max_len), values[positions].astype(np.int32)

    def split_arrays(
        self, split: Literal["train", "valid", "test"], max_len: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Padded numpy arrays for one leave-one-out split, one row per user.

        Rows are LEFT-padded with 0, so the last column always holds the most recent item;
        histories longer than `max_len` (default: config.max_history) keep their last items.
        - "valid": histories (U, max_len) = seq[:-2], targets (U,) = seq[-2].
        - "test":  histories (U, max_len) = seq[:-1], targets (U,) = seq[-1].
        - "train": inputs (U, max_len) = seq[:-3], targets (U, max_len) = seq[1:-2], aligned
          position by position (next-item targets of the training sequence seq[:-2]).
        """
        max_len = self.config.max_history if max_len is None else max_len
        if max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {max_len}")
        values, starts, ends = self._sequences()
        if split == "valid":
            return _left_padded(values, starts, ends - 2, max_len), _at(values, ends - 2)
        if split == "test":
            return _left_padded(values, starts, ends - 1, max_len), _at(values, ends - 1)
        if split == "train":
            inputs = _left_padded(values, starts, ends - 3, max_len)
            return inputs, _left_padded(values, starts + 1, ends - 2, max_len)
        raise ConfigError(f"split must be 'train', 'valid' or 'test', got {split!r}")

    def train_sequences(self, max_len: int | None = None) -> np.ndarray:
        """Whole training sequences seq[:-2], (U, max_len) int32, left-padded with 0."""
        max_len = self.config.max_history if max_len is None else max_len
        values, starts, ends = self._sequences()
        return _left_padded(values, starts, ends - 2, max_len)

    def train_windows(self, length: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every training sequence seq[:-2] cut into left-padded windows of `length` items, newest first.

        Window k of a user ends `k * stride` items before the end of its training sequence. The
        default stride, `length - 1`, makes consecutive windows overlap by one item (the first input
        of a later window is the last item of an earlier one), so every training target is in
        exactly one window, with at most `length - 1` items of history. A smaller stride overlaps
        the windows: each target then counts only in the window where it has the longest history
        (the last `stride` targets of a window; all targets of a user's oldest window), so every
        target is still predicted once but with at least `length - 1 - stride` items of history
        (stride 1: every target with its full history, as RecBole's prefixes).

        Returns windows (W, length) int32, the row of the user each window belongs to (W,), and
        the first target slot each window owns (W,) int64: target slot j (0..length-2) is the item
        in column j + 1, so window w predicts the targets of slots >= first[w].
        """
        if length < 2:
            raise ConfigError(f"window length must be >= 2, got {length}")
        stride = length - 1 if stride is None else stride
        if not 1 <= stride <= length - 1:
            raise ConfigError(f"window stride must be in [1, {length - 1}], got {stride}")
        values, starts, ends = self._sequences()
        ends = ends - 2
        # Windows until the oldest reaches the start: 1 + ceil((n - length) / stride), at least 1.
        counts = 1 + np.maximum(0, -(-(ends - starts - length) // stride))
        owners = np.repeat(np.arange(len(starts)), counts)
        k = np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts)  # window number, 0 = newest
        window_ends = ends[owners] - k * stride
        window_starts = np.maximum(starts[owners], window_ends - length)
        oldest = k == counts[owners] - 1
        first = np.where(oldest, 0, length - 1 - stride).astype(np.int64)
        return _left_padded(values, window_starts, window_ends, length), owners, first

    def train_prefixes(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """One left-padded window of `length` items per training target, ending at it (RecBole's
        prefix samples): its last `length - 1` items of history, then the target. Returns windows
        (W, length) int32, W = the training items that have an item before them, and the row of the
        user each belongs to (W,)."""
        if length < 2:
            raise ConfigError(f"window length must be >= 2, got {length}")
        values, starts, ends = self._sequences()
        ends = ends - 2
        targets = _ranges(starts + 1, ends)  # (W,) position in `values` of every target with a history
        owners = np.repeat(np.arange(len(starts)), np.maximum(ends - starts - 1, 0))
        return _left_padded(values, np.maximum(starts[owners], targets + 1 - length), targets + 1, length), owners

    def train_item_counts(self) -> np.ndarray:
        """(N + 1,) int64: how often each index occurs in the training sequences (popularity)."""
        values, starts, ends = self._sequences()
        return np.bincount(values[_ranges(starts, ends - 2)], minlength=self.num_items + 1).astype(np.int64)

    # ------------------------------------------------------------ persistence

    def manifest(self) -> dict[str, Any]:
        """The content of dataset.json: what this dataset is and how it was made."""
        _, starts, ends = self._sequences()
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "sources": self.sources,
            "image_stores": self.image_stores,
            "config": to_dict(self.config),
            "counts": {
                "items": self.num_items, "users": self.num_users, "interactions": int((ends - starts).sum())
            },
            "report": self.report,
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
        }

    def save(self, directory: str | Path) -> Path:
        """Write items.parquet, users.parquet and dataset.json into `directory`, atomically.

        Everything is written into a temporary sibling folder that then replaces `directory`,
        so readers see the old complete copy or the new complete copy, never a mix.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        retired = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
        try:
            pq.write_table(self.items, staging / "items.parquet")
            pq.write_table(self.users, staging / "users.parquet")
            (staging / "dataset.json").write_text(json.dumps(self.manifest(), indent=2, sort_keys=True))
            # rename() cannot replace a non-empty folder: move the old copy aside first.
            if directory.exists():
                os.replace(directory, retired)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(retired, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "PreparedDataset":
        """Read a dataset written by `save`; a damaged or foreign copy raises DataError."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        try:
            items = pq.read_table(directory / "items.parquet")
            users = pq.read_table(directory / "users.parquet")
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"cannot read prepared dataset: {err}", directory) from err
        dataset = cls(
            name=manifest["name"],
            items=items,
            users=users,
            image_stores=manifest["image_stores"],
            config=from_dict(PrepareConfig, manifest["config"]),
            report=manifest["report"],
            fingerprint=manifest["fingerprint"],
            provenance=manifest.get("provenance", {}),
        )
        actual = content_fingerprint(dataset.items, dataset.users)
        if actual != dataset.fingerprint:
            raise DataError(
                f"content fingerprint {actual[:12]} differs from the recorded {dataset.fingerprint[:12]}; "
                "the copy is damaged, delete the folder to rebuild it",
                directory,
            )
        return dataset


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """dataset.json of a saved dataset; DataError when absent, unreadable or of another format."""
    path = Path(directory) / "dataset.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read: {err}", path) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"not a prepared dataset of format {FORMAT_VERSION}", path)
    return manifest


def image_digests(items: pa.Table, image_stores: list[dict[str, Any]]) -> list[str | None]:
    """sha256 (hex) of each item's encoded image bytes, None where the item has no image or its store
    none under the key (one read of every image)."""
    stores = [open_image_store(spec) for spec in image_stores]
    try:
        digests: list[str | None] = []
        for store, key in zip(items.column("image_store").to_pylist(), items.column("image_key").to_pylist()):
            data = stores[store].get_bytes(key) if store is not None and store >= 0 and key is not None else None
            digests.append(hashlib.sha256(data).hexdigest() if data is not None else None)
        return digests
    finally:
        for store in stores:
            store.close()


def content_fingerprint(items: pa.Table, users: pa.Table) -> str:
    """sha256 of the item table (image digests included, so of the image bytes too; not of store
    locations) and the sequences."""
    digest = hashlib.sha256(f"pmmcache-dataset-{FORMAT_VERSION}\n".encode())
    for table in (items, users):
        for name in table.column_names:
            text = json.dumps([name, table.column(name).to_pylist()], ensure_ascii=False, separators=(",", ":"))
            digest.update(text.encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------- array helpers


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for every pair, without a Python loop."""
    lengths = np.maximum(ends - starts, 0)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first_out = np.cumsum(lengths) - lengths  # where each range starts in the output
    return np.arange(total, dtype=np.int64) + np.repeat(starts - first_out, lengths)


def _left_padded(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int) -> np.ndarray:
    """(U, max_len) int32: values[starts[u]:ends[u]], last max_len of them, right-aligned, 0 before."""
    lengths = np.clip(ends - starts, 0, max_len)  # (U,)
    pad = max_len - lengths  # (U,)
    columns = np.arange(max_len)  # (L,)
    source = (ends - lengths - pad)[:, None] + columns[None, :]  # (U, L) position in `values`
    filled = columns[None, :] >= pad[:, None]  # (U, L)
    if values.size == 0:
        return np.zeros((len(starts), max_len), np.int32)
    return np.where(filled, values[np.clip(source, 0, values.size - 1)], 0).astype(np.int32)


def _at(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return values[positions].astype(np.int32) if positions.size else np.zeros(0, np.int32)


def _list_column(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


def problem_lines(report: dict[str, Any]) -> list[str]:
    """What preparation dropped, per source, as lines for the screen (the report has the details)."""
    lines = []
    for source, entry in report.get("sources", {}).items():
        counts = entry.get("problems", {}).get("counts", {})
        examples = entry.get("problems", {}).get("examples", [])
        for kind, count in sorted(counts.items()):
            example = next((e for e in examples if e["kind"] == kind), None)
            where = ""
            if example:
                where = f" (first: {Path(example['path']).name} line {example['line']}: {example['message']})"
            lines.append(f"{source}: {count} {kind.replace('_', ' ')} problem(s){where}")
        raw, core = entry.get("raw", {}), entry.get("k_core", {})
        dropped = raw.get("interactions", 0) - core.get("interactions", 0)
        if dropped:
            lines.append(f"{source}: {core['k']}-core filtering dropped {dropped} of {raw['interactions']} "
                         f"interactions ({raw['users'] - core['users']} users, {raw['items'] - core['items']} items)")
        if entry.get("users_too_short"):
            lines.append(f"{source}: {entry['users_too_short']} user(s) with fewer than {MIN_SEQUENCE} items dropped")
    return lines


def _check_input(raw: RawDataset) -> None:
    """DataError naming the file when a source has no items or interactions, or was most likely misread
    (most interactions name items the items file lacks)."""
    interactions_file = raw.files[0] if raw.files else raw.source
    unknown = [p for p in raw.problems if p.kind == "unknown_item"]
    total = len(raw.interactions) + len(unknown)
    if not raw.items:
        items_file = raw.files[1] if len(raw.files) > 1 else interactions_file
        raise DataError(f"source {raw.source!r} has no items", items_file)
    if total == 0:
        raise DataError(f"source {raw.source!r} has no interactions (no user lists an item)", interactions_file)
    if len(unknown) > MAX_UNKNOWN_FRACTION * total:
        example = unknown[0].item or ""
        if any("," in (p.item or "") for p in unknown[:100]):
            cause = f"the sequence column looks comma-separated (e.g. {example!r}); separate a user's items with spaces"
        else:
            cause = (f"e.g. {example!r} is unknown; check that both files use the same item ids "
                     f"(the items file has e.g. {next(iter(raw.items))!r})")
        raise DataError(f"{len(unknown)} of {total} interactions name items that are not in the items file: {cause}",
                        unknown[0].path, unknown[0].line)


def _check_kept(raw: RawDataset, users: int, items: int, config: PrepareConfig) -> None:
    """DataError naming the interactions file when filtering leaves no user or no item."""
    if users and items:
        return
    raise DataError(
        f"source {raw.source!r}: nothing is left after {config.min_core}-core filtering and dropping users with "
        f"fewer than {MIN_SEQUENCE} items (read {len(raw.interactions)} interactions of {len(raw.items)} items); "
        "lower the threshold data.min_core, e.g. `pmmcache prepare --min-core 2`, `--set data.min_core=2` for train",
        raw.files[0] if raw.files else raw.source)


def _problem_summary(problems: list) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for problem in problems:
        counts[problem.kind] = counts.get(problem.kind, 0) + 1
    return {"counts": counts, "examples": [p.to_dict() for p in problems[:PROBLEM_EXAMPLES]]}


# ---------------------------------------------------------------- prepare one source


def check_source_name(source: str) -> None:
    """Keys are "<source>/<id>": a "/" inside a source name would make two sources collide, and a
    space would make keys that `pmmcache recommend --history` (keys separated by spaces) cannot name."""
    if not source or "/" in source or any(c.isspace() for c in source):
        raise PmmcacheError(f"source name {source!r} must be non-empty, without '/' or spaces: item keys are "
                            "<source>/<item> and `pmmcache recommend --history` separates keys by spaces")


def _last_per_user(user_idx: np.ndarray, times: np.ndarray, rows: np.ndarray, keep_last: int) -> np.ndarray:
    """(V,) bool: the interaction is among its user's last `keep_last` (by time, then file row)."""
    order = np.lexsort((rows, times, user_idx))  # by user, time, row
    users = user_idx[order]
    counts = np.bincount(users, minlength=int(user_idx.max()) + 1 if len(user_idx) else 0)
    position = np.arange(len(order)) - (np.cumsum(counts) - counts)[users]  # 0 = the user's oldest
    recent = np.zeros(len(order), bool)
    recent[order] = counts[users] - position <= keep_last
    return recent


def _expand(where: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A (len(where),) bool mask: `values` at the positions where `where` is true, False elsewhere."""
    out = np.zeros(len(where), bool)
    out[where] = values
    return out


def k_core(user_idx: np.ndarray, item_idx: np.ndarray, num_items: int, k: int) -> tuple[np.ndarray, int]:
    """Mask of interactions kept by iterated k-core filtering, and the number of rounds.

    Removing a sparse user can push an item below k and vice versa, so filtering repeats until
    every remaining user and item has at least k interactions.
    """
    keep = np.ones(len(user_idx), bool)
    num_users = int(user_idx.max()) + 1 if len(user_idx) else 0
    rounds = 0
    while True:
        rounds += 1
        user_counts = np.bincount(user_idx[keep], minlength=num_users)
        item_counts = np.bincount(item_idx[keep], minlength=num_items)
        survivors = keep & (user_counts[user_idx] >= k) & (item_counts[item_idx] >= k)
        if survivors.sum() == keep.sum():
            return keep, rounds
        keep = survivors


def prepare(raw: RawDataset, config: PrepareConfig | None = None) -> PreparedDataset:
    """Filter, order, truncate and index one raw source (see the module docstring).

    Order within a user: timestamp, then file row (stable for equal timestamps). The catalogue
    is every item that survives the k-core filter, in items-file order, even when truncation
    leaves it in no sequence. Users with fewer than 3 items after filtering are dropped.
    """
    config = config or PrepareConfig()
    source = raw.source
    check_source_name(source)
    _check_input(raw)
    item_ids = list(raw.items)
    item_pos = {item: i for i, item in enumerate(item_ids)}
    user_pos: dict[str, int] = {}

    known = [row for row in raw.interactions if row[1] in item_pos]
    timed = sum(ts is not None for _, _, ts, _ in known)
    if 0 < timed < len(known):
        raise DataError(f"source {source!r}: timestamps must be given for every interaction or for none")
    user_idx = np.array([user_pos.setdefault(user, len(user_pos)) for user, _, _, _ in known], np.int64)
    item_idx = np.array([item_pos[item] for _, item, _, _ in known], np.int64)
    times = np.array([ts if ts is not None else 0.0 for _, _, ts, _ in known], np.float64)
    rows = np.array([row for _, _, _, row in known], np.int64)
    user_ids = list(user_pos)

    recent = _last_per_user(user_idx, times, rows, config.keep_last) if config.keep_last else np.ones(len(known), bool)
    keep, rounds = k_core(user_idx[recent], item_idx[recent], len(item_ids), config.min_core)
    keep = _expand(recent, keep)
    item_counts = np.bincount(item_idx[keep], minlength=len(item_ids))
    # An item no kept sequence holds leaves the catalogue with keep_last (released code), else only by k-core.
    catalogue = np.flatnonzero(item_counts >= max(config.min_core, 1 if config.keep_last else 0))
    new_index = np.zeros(len(item_ids), np.int32)
    new_index[catalogue] = np.arange(1, len(catalogue) + 1, dtype=np.int32)

    kept = np.flatnonzero(keep)
    order = kept[np.lexsort((rows[kept], times[kept], user_idx[kept]))]  # by user, time, row
    sorted_users = user_idx[order]
    cuts = np.flatnonzero(np.diff(sorted_users)) + 1
    starts = np.r_[0, cuts].astype(np.int64) if len(order) else np.zeros(0, np.int64)
    ends = np.r_[cuts, len(order)].astype(np.int64) if len(order) else np.zeros(0, np.int64)
    long_enough = (ends - starts) >= MIN_SEQUENCE
    starts, ends = starts[long_enough], ends[long_enough]
    cut_starts = np.maximum(starts, ends - (config.max_history + 1)) if config.truncate else starts
    values = new_index[item_idx[order[_ranges(cut_starts, ends)]]]
    offsets = np.r_[0, np.cumsum(ends - cut_starts)].astype(np.int64)
    kept_users = sorted_users[starts]

    _check_kept(raw, len(kept_users), len(catalogue), config)
    has_store = raw.image_store is not None
    catalogue_ids = [item_ids[i] for i in catalogue]
    image_keys = [raw.image_keys.get(item) if has_store else None for item in catalogue_ids]
    texts = [raw.items[item] for item in catalogue_ids]
    if config.lowercase_text:  # released code: title.lower() before the tokenizer
        texts = [text.lower() if text is not None else None for text in texts]
    items = pa.table(
        {
            "index": pa.array(np.arange(1, len(catalogue) + 1), pa.int32()),
            "key": [f"{source}/{item}" for item in catalogue_ids],
            "source": [source] * len(catalogue),
            "text": pa.array(texts, pa.string()),
            "image_store": pa.array([0 if key is not None else -1 for key in image_keys], pa.int16()),
            "image_key": pa.array(image_keys, pa.string()),
        },
        schema=ITEM_SCHEMA,
    )
    users = pa.table(
        {
            "key": [f"{source}/{user_ids[u]}" for u in kept_users],
            "source": [source] * len(kept_users),
            "items": _list_column(values, offsets),
        },
        schema=USER_SCHEMA,
    )
    report = {
        "sources": {
            source: {
                "reader": raw.reader,
                "raw": {"users": len(user_ids), "items": len(item_ids), "interactions": len(known)},
                "k_core": {
                    "k": config.min_core,
                    "rounds": rounds,
                    "users": int(len(np.unique(user_idx[keep]))),
                    "items": int(len(catalogue)),
                    "interactions": int(keep.sum()),
                },
                "users_too_short": int((~long_enough).sum()),
                "interactions_cut_by_keep_last": int((~recent).sum()),
                "sequences_longer_than_history": int((ends - starts > config.max_history + 1).sum()),
                "sequences_truncated": int((cut_starts > starts).sum()),
                "prepared": {"users": len(kept_users), "items": len(catalogue), "interactions": int(values.size)},
                "items_without_text": sum(t is None for t in texts),
                "items_without_image": sum(k is None for k in image_keys),
                "problems": _problem_summary(raw.problems),
            }
        }
    }
    return PreparedDataset(
        name=source,
        items=items,
        users=users,
        image_stores=[raw.image_store.spec()] if has_store else [],
        config=config,
        report=report,
        provenance={"reader": raw.reader, "files": list(raw.files)},
    )


# ---------------------------------------------------------------- combine and select


def combine(datasets: list[PreparedDataset], name: str) -> PreparedDataset:
    """One dataset holding all items and users of `datasets`, indices shifted into one space.

    Item and user keys must be unique across the inputs (a collision raises); image stores are
    kept (identical specs merged) and `source` tags are preserved. All inputs share one config.
    """
    if not datasets:
        raise PmmcacheError("combine needs at least one dataset")
    config = datasets[0].config
    for dataset in datasets[1:]:
        if dataset.config != config:
            raise ConfigError(f"cannot combine {dataset.name!r}: prepared with {dataset.config}, not {config}")

    stores: list[dict[str, Any]] = []
    item_tables, user_tables = [], []
    item_owner: dict[str, str] = {}
    user_owner: dict[str, str] = {}
    sources_report: dict[str, Any] = {}
    offset = 0
    for dataset in datasets:
        for key in dataset.item_keys():
            if key in item_owner:
                raise PmmcacheError(f"item key {key!r} is in both {item_owner[key]!r} and {dataset.name!r}")
            item_owner[key] = dataset.name
        for key in dataset.users.column("key").to_pylist():
            if key in user_owner:
                raise PmmcacheError(f"user key {key!r} is in both {user_owner[key]!r} and {dataset.name!r}")
            user_owner[key] = dataset.name

        store_map = np.array([_store_position(stores, spec) for spec in dataset.image_stores] + [-1], np.int16)
        local_store = dataset.items.column("image_store").to_numpy()
        shifted_index = pa.array(dataset.items.column("index").to_numpy() + offset, pa.int32())
        item_tables.append(
            dataset.items.set_column(0, "index", shifted_index)
            .set_column(4, "image_store", pa.array(store_map[local_store], pa.int16()))
        )
        values, starts, ends = dataset._sequences()
        offsets = np.r_[0, np.cumsum(ends - starts)].astype(np.int64)
        shifted = (values[_ranges(starts, ends)] + offset).astype(np.int32)
        user_tables.append(dataset.users.set_column(2, "items", _list_column(shifted, offsets)))
        sources_report.update(dataset.report.get("sources", {}))
        offset += dataset.num_items

    return PreparedDataset(
        name=name,
        items=pa.concat_tables(item_tables),
        users=pa.concat_tables(user_tables),
        image_stores=stores,
        config=config,
        report={"sources": sources_report},
        provenance={
            "combined": [{"name": d.name, "fingerprint": d.fingerprint, **d.provenance} for d in datasets]
        },
    )


def _store_position(stores: list[dict[str, Any]], spec: dict[str, Any]) -> int:
    if spec not in stores:
        stores.append(spec)
    return stores.index(spec)


def select_sources(dataset: PreparedDataset, sources: list[str], name: str | None = None) -> PreparedDataset:
    """The users and items of `sources` only, re-indexed 1..N' in their previous order."""
    known = dataset.sources
    unknown = [s for s in sources if s not in known]
    if unknown:
        raise PmmcacheError(f"unknown source(s) {unknown} in {dataset.name!r}; known: {known}")
    wanted = set(sources)
    item_mask = np.array([s in wanted for s in dataset.items.column("source").to_pylist()], bool)
    user_mask = np.array([s in wanted for s in dataset.users.column("source").to_pylist()], bool)

    new_index = np.full(dataset.num_items + 1, -1, np.int64)  # old index -> new index, -1 = dropped
    new_index[0] = 0
    new_index[1:][item_mask] = np.arange(1, int(item_mask.sum()) + 1)
    values, starts, ends = dataset._sequences()
    starts, ends = starts[user_mask], ends[user_mask]
    mapped = new_index[values[_ranges(starts, ends)]]
    if (mapped < 0).any():
        raise PmmcacheError("a user of a selected source has items of another source; cannot split by source")
    offsets = np.r_[0, np.cumsum(ends - starts)].astype(np.int64)

    items = dataset.items.filter(pa.array(item_mask))
    used_stores = sorted({int(s) for s in items.column("image_store").to_numpy() if s >= 0})
    store_map = np.full(len(dataset.image_stores) + 1, -1, np.int16)  # last slot maps -1 to -1
    store_map[used_stores] = np.arange(len(used_stores))
    items = items.set_column(0, "index", pa.array(np.arange(1, items.num_rows + 1), pa.int32()))
    remapped_stores = store_map[items.column("image_store").to_numpy()]
    items = items.set_column(4, "image_store", pa.array(remapped_stores, pa.int16()))
    users = dataset.users.filter(pa.array(user_mask))
    users = users.set_column(2, "items", _list_column(mapped.astype(np.int32), offsets))

    return PreparedDataset(
        name=name or "+".join(sources),
        items=items,
        users=users,
        image_stores=[dataset.image_stores[i] for i in used_stores],
        config=dataset.config,
        report={"sources": {s: r for s, r in dataset.report.get("sources", {}).items() if s in wanted}},
        provenance={
            "selected_from": {"name": dataset.name, "fingerprint": dataset.fingerprint},
            "sources": list(sources),
        },
    )
