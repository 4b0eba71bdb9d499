"""The item feature cache: one HDF5 file per (dataset, encoders) with contiguous, memory-mappable datasets.

Layout of `cache/<dataset>/<key>.h5` (row i = item index i of the prepared dataset; row 0 = padding):

    /keys             (N+1,)        item keys, "" for row 0
    /text/states      (N+1, L, d)   float16 (or int8), input of text block n-k  (absent for image-only data)
    /text/scale       (N+1, L)      float16 per-token scale, int8 caches only
    /text/mask        (N+1, L)      uint8 attention mask
    /image/states     (N+1, P, d)   float16 (or int8), input of vision block n-k (absent for text-only data)
    /image/scale      (N+1, P)      float16 per-token scale, int8 caches only
    /modality         (N+1, 2)      uint8: [text usable, image usable]
    /flags            (N+1,)        uint8 bit field of problems (see FLAG_*)
    /item_hash        (N+1, 16)     uint8 fingerprint of the item content the row was encoded from
                                    (`PreparedDataset.item_fingerprints`; zeros for row 0)
    /checksum         (N+1,)        uint32 CRC-32 of the row in every other per-row dataset (sorted by name)
    /done             (N+1,)        uint8: row fully written
    /complete         (1,)          uint8: every row done and the report written
    attrs: format_version, manifest (JSON)

Why this shape: h5py fancy indexing on chunked data is ~100x too slow to feed training, so
every dataset is contiguous, allocated when the file is created, and then written and read through
`np.memmap` at the dataset's byte offset. After creation no HDF5 metadata is ever modified, so a
process killed at any moment leaves a readable file; a row counts only once its `done` byte is set,
which happens after its states, item hash and checksum were written. An item whose content changed
is re-encoded in place: its `done` byte (and `complete`) are cleared first, then it is written again.
The file is allocated on disk when created (`posix_fallocate`), so a write through a memory map
cannot fail with SIGBUS on a full disk. Caches of older pmmcache versions lack `item_hash` and
`checksum`: they are read, with a warning that they cannot be checked.

int8 caches (`pmmcache extract --cache-dtype int8`) halve the file: each token row of d values is
stored as int8 with one float16 scale, symmetric (x ~ q * scale, scale = max|x| / 127), and the
reader dequantises to float16 on read, on the training device. The manifest records the dtype
(`storage_dtype`); stage 2 does not compare it, so a model trained on a float16 cache reads an int8
cache of the same encoders and vice versa.

A sharded cache (`pmmcache extract --shards`, see `pmmcache.shards`) is an index file at the same path
(manifest, keys, the list of shard files) and one file of the layout above per contiguous range of
rows. `open_maps`, `is_complete`, `CacheWriter` and `CacheReader` take the index path and treat the
shards as one cache, so nothing that reads a cache needs to know which kind it is.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import h5py
import numpy as np
import torch

from pmmcache.errors import CacheMismatchError, PmmcacheError
from pmmcache.shards import EveryShard, RowConcat, Shard, plan_shards

if TYPE_CHECKING:  # the specs are only named here: cache.py sits below the encoders
    from pmmcache.encoders import TextEncoderSpec, VisionEncoderSpec


# ---- where a cache lives: its file name says what made its states

def _slug(text: str) -> str:
    """A file-name-safe name: hub ids as they are, local paths by their last two folders."""
    if os.sep in text:
        text = "-".join(Path(text).parts[-2:])
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def cache_key(text: TextEncoderSpec | None, vision: VisionEncoderSpec | None, storage_dtype: str = "float16") -> str:
    """File stem naming the encoders, split and storage, e.g. `text-xlm-roberta-base-k2-L50+image-ViT-B-32-openai-k2-224`.

    Whatever changes the stored states is in the name, so caches of other settings sit side by side
    instead of `--force` overwriting one with the other: a random vision init with a seed other than 0
    adds `-seed<N>` to the image part, a storage dtype other than float16 adds `+<dtype>`. The default
    settings keep the short name, so caches made before these parts existed are still found."""
    parts = []
    if text is not None:
        parts.append(f"text-{_slug(text.name)}-k{text.top_blocks}-L{text.max_length}")
    if vision is not None:
        seeded = vision.weights == "random" and vision.seed != 0  # the seed means nothing for loaded weights
        parts.append(f"image-{_slug(vision.name)}-{_slug(vision.weights)}-k{vision.top_blocks}-{vision.image_size}"
                     + (f"-seed{vision.seed}" if seeded else ""))
    if storage_dtype != "float16":
        parts.append(storage_dtype)
    return "+".join(parts)


def cache_path(cache_dir: Path, dataset: str, key: str) -> Path:
    return Path(cache_dir) / dataset.replace("/", "_").replace(",", "+") / f"{key}.h5"


FORMAT_VERSION = 1

FLAG_TEXT_EMPTY = 1  # no text or only whitespace
FLAG_TEXT_TRUNCATED = 2  # longer than the token budget; kept, truncated
FLAG_IMAGE_MISSING = 4  # no image under the item key
FLAG_IMAGE_UNREADABLE = 8  # bytes present but not decodable
FLAG_NAMES = {
    FLAG_TEXT_EMPTY: "empty text",
    FLAG_TEXT_TRUNCATED: "over-long text (truncated)",
    FLAG_IMAGE_MISSING: "missing image",
    FLAG_IMAGE_UNREADABLE: "unreadable image",
}

# Manifest fields that do not change the cached states; they are recorded but never compared.
# (Where a model lives is informational: its weights are compared through their fingerprint.)
INFORMATIONAL_FIELDS = {"created_by", "extract", "text.resolved_path", "text.spec.name", "image.spec.name",
                        "image.weights_file"}

# What a modality's cached states depend on as a model reads them: the lower blocks' weights and the
# block they were cut at. A cache that agrees on these for every modality a model reads can feed it.
FITTING_FIELDS = ("lower_fingerprint", "n_blocks", "split_block")


def encoder_entry(encoder: Any) -> dict[str, Any] | None:
    """The manifest's record of a text or vision encoder (None for none): its `describe()` and
    `split_block`, the block whose input the cache holds."""
    if encoder is None:
        return None
    return {**encoder.describe(), "split_block": encoder.n_blocks - encoder.spec.top_blocks}


def fitting_manifest(entries: dict[str, Any], modalities: tuple[str, ...]) -> dict[str, Any]:
    """What a cache must say about its encoders to feed a model reading `modalities`: the
    FITTING_FIELDS of each modality's entry in `entries` (a manifest, or {"text": encoder_entry(...)})."""
    return {name: {field: entries[name][field] for field in FITTING_FIELDS} for name in modalities}


@dataclass(frozen=True)
class ArraySpec:
    """One contiguous dataset of the cache."""

    name: str
    shape: tuple[int, ...]
    dtype: str


ITEM_HASH_BYTES = 16  # = prepare.ITEM_FINGERPRINT_BYTES
BOOKKEEPING = ("item_hash", "checksum", "done", "complete")  # not covered by the row checksum
ZEROED = ("modality", "flags", "item_hash", "checksum", "done", "complete")  # read before written
STATES_DTYPES = ("float16", "int8")  # how the states are stored (`storage_dtype` in the manifest)
INT8_MAX = 127  # symmetric: -127..127, so that q and -q are both representable


def cache_layout(num_rows: int, text: tuple[int, int] | None, image: tuple[int, int] | None,
                 states_dtype: str = "float16") -> list[ArraySpec]:
    """The datasets of a cache; `text` = (L, d) or None, `image` = (P, d) or None; states stored as
    `states_dtype` (int8 adds a float16 scale per token row)."""
    if states_dtype not in STATES_DTYPES:
        raise PmmcacheError(f"cache states dtype {states_dtype!r}: use one of {', '.join(STATES_DTYPES)}")
    scaled = states_dtype == "int8"
    specs = [
        ArraySpec("modality", (num_rows, 2), "uint8"),
        ArraySpec("flags", (num_rows,), "uint8"),
        ArraySpec("item_hash", (num_rows, ITEM_HASH_BYTES), "uint8"),
        ArraySpec("checksum", (num_rows,), "uint32"),
        ArraySpec("done", (num_rows,), "uint8"),
        ArraySpec("complete", (1,), "uint8"),
    ]
    if text is not None:
        length, dim = text
        specs += [ArraySpec("text/states", (num_rows, length, dim), states_dtype),
                  ArraySpec("text/mask", (num_rows, length), "uint8")]
        specs += [ArraySpec("text/scale", (num_rows, length), "float16")] if scaled else []
    if image is not None:
        tokens, dim = image
        specs += [ArraySpec("image/states", (num_rows, tokens, dim), states_dtype)]
        specs += [ArraySpec("image/scale", (num_rows, tokens), "float16")] if scaled else []
    return specs


def quantize_int8(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token int8: states (..., d) float -> (q (..., d) int8, scale (...) float16).

    The scale is rounded to float16 first and q is computed with that rounded scale, so
    `dequantize_int8(q, scale)` is off by at most scale / 2 per value (plus float16 rounding).
    An all-zero row gets scale 0 and q = 0.
    """
    x = states.float()
    scale = (x.abs().amax(dim=-1) / INT8_MAX).to(torch.float16)  # (...)
    divisor = scale.float().unsqueeze(-1)
    q = torch.where(divisor > 0, x / divisor.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(x))
    return q.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (..., d) int8, scale (...) float16 -> float16 states (..., d), on q's device.

    The product of an int8 and a float16 is exact in float32, so the result (one rounding to
    float16) is the same on every device."""
    return (q.float() * scale.float().unsqueeze(-1)).to(torch.float16)


def layout_bytes(layout: list[ArraySpec], keys: list[str]) -> int:
    """Bytes a cache of this layout takes on disk (datasets, keys and a margin for HDF5 metadata)."""
    arrays = sum(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize for spec in layout)
    return arrays + sum(len(k.encode()) + 16 for k in keys) + (1 << 20)


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """PmmcacheError when the file system of `directory` has less than `needed` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise PmmcacheError(f"not enough disk space for {what}: it needs {_size(needed)}, {directory} has "
                            f"{_size(free)} free; free {_size(needed - free)} or pass another --cache-dir, "
                            "then rerun the same command")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def reserve_space(path: Path, shown: Path | None = None) -> None:
    """Allocate every block of the file now, so that writes through a memory map cannot hit a full disk
    (SIGBUS, no message) later. Already allocated blocks are kept: rerunning after freeing space works."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        with explain_disk_full(shown or path, size):
            os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # a file system without allocation: the free-space check before creation must do
    finally:
        os.close(fd)


@contextmanager
def explain_disk_full(path: Path, needed: int) -> Iterator[None]:
    """Turn a disk-full or quota OSError raised in the block into a message saying how much is needed
    and where; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise PmmcacheError(f"disk full while writing {path} ({err.strerror}): the cache needs {_size(needed)} "
                            f"on {path.parent}, {_size(shutil.disk_usage(path.parent).free)} free now; free space "
                            "or pass another --cache-dir, then rerun the same command (finished rows are kept)"
                            ) from err


def _tmp_owner_alive(tmp: Path) -> bool:
    """Whether the process named in a temporary file's name (`<name>.tmp<pid>-<id>`) still runs."""
    pid = tmp.name.rsplit(".tmp", 1)[-1].split("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_cache(path: Path, manifest: dict[str, Any], keys: list[str], layout: list[ArraySpec]) -> None:
    """Create the file with every dataset allocated on disk, atomically (temporary name, then rename).

    Checks the free space first; a temporary file of a process that still runs is never touched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name + ".tmp*"):  # left by a process killed while creating
        if not _tmp_owner_alive(stale):
            stale.unlink(missing_ok=True)
    needed = layout_bytes(layout, keys)
    check_free_space(path.parent, needed, f"the cache {path}")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with explain_disk_full(path, needed), h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
            for spec in layout:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # offsets exist now, for np.memmap
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # do not write zeros we will overwrite
                f.create_dataset(spec.name, shape=spec.shape, dtype=spec.dtype, dcpl=dcpl)
        reserve_space(tmp, shown=path)
        with open(tmp, "r+b") as raw:  # zero the small bookkeeping arrays (they are read before written)
            for spec, offset in _offsets(tmp, layout).items():
                if spec.name in ZEROED:
                    raw.seek(offset)
                    raw.write(bytes(int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _offsets(path: Path, layout: list[ArraySpec]) -> dict[ArraySpec, int]:
    with h5py.File(path, "r") as f:
        offsets = {}
        for spec in layout:
            offset = f[spec.name].id.get_offset()
            if offset is None:
                raise PmmcacheError(f"{path}: dataset {spec.name} is not allocated contiguously")
            offsets[spec] = offset
        return offsets


def _file_maps(path: Path, mode: Literal["r", "r+"], names: set[str] | None) -> dict[str, np.memmap]:
    return {spec.name: np.memmap(path, dtype=spec.dtype, mode=mode, offset=offset, shape=spec.shape)
            for spec, offset in _offsets(path, read_layout(path)).items() if names is None or spec.name in names}


def open_maps(path: Path, mode: Literal["r", "r+"] = "r", names: set[str] | None = None,
              shards: list[int] | None = None) -> dict[str, Any]:
    """Memory maps of the contiguous datasets of a cache (all, or those in `names`), indexed by cache row.

    For a sharded cache each is a `RowConcat` of the shards' maps (`shards`: which ones, default all)
    and `complete` an `EveryShard`."""
    index = read_shards(path)
    if index is None:
        return _file_maps(path, mode, names)
    chosen = list(range(len(index))) if shards is None else list(shards)
    opened = {i: _file_maps(shard_file(path, index[i]), mode, names) for i in chosen}
    return {name: EveryShard([opened[i][name] for i in chosen]) if name == "complete" else
            RowConcat({index[i].first_row: opened[i][name] for i in chosen}, index[-1].stop)
            for name in opened[chosen[0]]}


def pending_rows(maps: dict[str, Any]) -> np.ndarray:
    """Rows of `open_maps(...)` not yet done (row 0 included while not written)."""
    done = maps["done"]
    rows = done.covered() if isinstance(done, RowConcat) else np.arange(len(done))
    return rows[np.asarray(done[rows]) == 0]


# ---- sharded caches: an index file naming one cache file per range of rows

def read_shards(path: Path) -> list[Shard] | None:
    """The shards of the cache whose index is at `path`; None for a cache in one file."""
    with h5py.File(path, "r") as f:
        raw = f.attrs.get("shards")
    return None if raw is None else [Shard(**entry) for entry in json.loads(raw)]


def shard_file(index: Path, shard: Shard) -> Path:
    """Where a shard lives: beside its index. PmmcacheError when it is not there."""
    path = index.with_name(shard.file)
    if not path.is_file():
        raise PmmcacheError(f"{index}: its shard {shard.file} (rows {shard.first_row}-{shard.stop - 1}) is missing; "
                            "rerun `pmmcache extract` with the options that made it, or copy the shard beside the index")
    return path


def create_shard_index(path: Path, manifest: dict[str, Any], keys: list[str], shards: list[Shard]) -> None:
    """Write the index of a sharded cache atomically; the shard files are created by their writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
            f.attrs["shards"] = json.dumps([shard.__dict__ for shard in shards])
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_sharded_cache(path: Path, manifest: dict[str, Any], keys: list[str], layout: list[ArraySpec],
                         count: int) -> None:
    """Create a cache of `count` shard files (each as `create_cache` makes one, with its rows' keys and
    its place in the manifest's `shard`), then its index: an index on disk means every shard was made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, layout_bytes(layout, keys), f"the cache {path}")
    shards = plan_shards(path, len(keys), count)
    for i, shard in enumerate(shards):
        rows = slice(shard.first_row, shard.stop)
        shard_layout = [spec if spec.name == "complete" else ArraySpec(spec.name, (shard.rows,) + spec.shape[1:], spec.dtype)
                        for spec in layout]
        placed = {**manifest, "shard": {"index": i, "of": count, "first_row": shard.first_row, "rows": shard.rows}}
        create_cache(path.with_name(shard.file), placed, keys[rows], shard_layout)
    create_shard_index(path, manifest, keys, shards)


def cache_files(path: Path) -> list[Path]:
    """The files of a cache: itself, or the shard files its index names (missing ones included)."""
    index = read_shards(path) if path.is_file() else None
    return [path] if index is None else [path.with_name(shard.file) for shard in index]


def remove_cache(path: Path) -> None:
    """Delete a cache: its file, or its index and every shard file."""
    for file in cache_files(path):
        file.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def row_checksums(maps: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """(len(rows),) uint32: CRC-32 of each row's bytes in every per-row dataset but the bookkeeping
    ones, taken in name order: what `/checksum` holds for a row written whole."""
    names = sorted(name for name in maps if name not in BOOKKEEPING)
    out = np.zeros(len(rows), np.uint32)
    for j, row in enumerate(np.asarray(rows).tolist()):
        crc = 0
        for name in names:
            crc = zlib.crc32(np.ascontiguousarray(maps[name][row:row + 1]), crc)
        out[j] = crc
    return out


def read_layout(path: Path) -> list[ArraySpec]:
    """The contiguous datasets present in one cache file (a sharded cache: in one of its shards)."""
    specs = []
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and name != "keys":
                specs.append(ArraySpec(name, tuple(obj.shape), obj.dtype.name))
        f.visititems(visit)
    return specs


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise CacheMismatchError(
                    f"{path}: cache format version {version}, this pmmcache reads {FORMAT_VERSION}; "
                    "re-extract with --force")
            manifest = json.loads(f.attrs["manifest"])
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
            return manifest
    except (KeyError, ValueError) as err:  # no manifest attribute, or not JSON: written by something else
        raise PmmcacheError(f"{path}: its manifest is missing or damaged ({err}); re-extract with --force") from err
    except OSError as err:
        raise PmmcacheError(f"{path}: not a readable pmmcache cache ({err}); delete it or re-extract with --force") from err


def manifest_differences(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """Fields of `expected` whose value differs in `found` (nested, dotted names)."""
    diffs = []
    for key, want in expected.items():
        name = f"{prefix}{key}"
        if name in INFORMATIONAL_FIELDS:
            continue
        have = found.get(key, "<absent>") if isinstance(found, dict) else "<absent>"
        if isinstance(want, dict) and isinstance(have, dict):
            diffs += manifest_differences(have, want, name + ".")
        elif have != want:
            diffs.append(f"{name}: cache has {have!r}, expected {want!r}")
    return diffs


def check_manifest(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Raise CacheMismatchError naming every differing field; return the found manifest."""
    found = read_manifest(path)
    diffs = manifest_differences(found, expected)
    if diffs:
        raise CacheMismatchError(f"{path} was made with other settings:\n  " + "\n  ".join(diffs))
    return found


class CacheWriter:
    """Writes rows of an allocated cache through memory maps; safe to use from several processes at once
    as long as each writes its own rows. Of a sharded cache, opens the `shards` given (default all)."""

    def __init__(self, path: Path, shards: list[int] | None = None):
        self.path = path
        self.maps = open_maps(path, mode="r+", shards=shards)

    def has(self, name: str) -> bool:
        return name in self.maps

    def pending_rows(self) -> np.ndarray:
        """Row indices not yet done (row 0 included while not written)."""
        return pending_rows(self.maps)

    def write(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Write `arrays[name][j]` into row `rows[j]` and the rows' checksums, flush, then mark the rows
        done. The checksum covers what the rows hold then, so `arrays` should give every per-row dataset."""
        rows = np.asarray(rows)
        for name, values in arrays.items():
            self.maps[name][rows] = values
        if self.has("checksum"):
            self.maps["checksum"][rows] = row_checksums(self.maps, rows)
        for name in self.maps:
            if name != "done":
                self.maps[name].flush()
        self.maps["done"][rows] = 1
        self.maps["done"].flush()

    def mark_pending(self, rows: np.ndarray) -> None:
        """Make `rows` pending again (to re-encode them): the cache stops being complete first, so no
        reader takes it as whole while they are rewritten; a kill at any point leaves them pending."""
        self.maps["complete"][0] = 0
        self.maps["complete"].flush()
        self.maps["done"][np.asarray(rows)] = 0
        self.maps["done"].flush()

    def is_complete(self) -> bool:
        return bool(self.maps["complete"][0])

    def mark_complete(self) -> None:
        pending = self.pending_rows()
        if len(pending):
            raise PmmcacheError(f"{self.path}: cannot mark complete, {len(pending)} rows pending")
        self.maps["complete"][0] = 1
        self.maps["complete"].flush()

    def close(self) -> None:
        for mm in self.maps.values():
            mm.flush()
        self.maps.clear()


def read_keys(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [k.decode() if isinstance(k, bytes) else k for k in f["keys"][:]]


def is_complete(path: Path) -> bool:
    """True only for a cache whose every row was written (a partial file is never taken as whole)."""
    if not path.is_file():
        return False
    index = read_shards(path)
    if index is not None:
        return all(is_complete(shard_file(path, shard)) for shard in index)  # a missing shard: an error naming it
    spec, offset = next((s, o) for s, o in _offsets(path, read_layout(path)).items() if s.name == "complete")
    return bool(np.memmap(path, dtype=spec.dtype, mode="r", offset=offset, shape=spec.shape)[0])


@dataclass
class ItemStates:
    """Cached lower-block states for a batch of items (any leading shape S of the index tensor)."""

    text: torch.Tensor | None  # (*S, L, d) float16 (int8 caches are dequantised on read)
    text_mask: torch.Tensor | None  # (*S, L) bool
    image: torch.Tensor | None  # (*S, P, d) float16
    modality: torch.Tensor  # (*S, 2) bool: [text usable, image usable]


Storage = Literal["auto", "memmap", "ram", "gpu"]


class CacheReader:
    """Returns cached states for item indices, from a memory map, from RAM, or from GPU memory.

    `storage="auto"` puts the cache on the GPU when `device` is CUDA and it takes under
    `gpu_fraction` of free GPU memory, else in RAM when it takes under `ram_fraction` of available
    memory, else reads through the memory map (the OS page cache does the rest).
    """

    def __init__(self, path: str | Path, expected: dict[str, Any] | None = None, storage: Storage = "auto",
                 device: str | torch.device = "cpu", gpu_fraction: float = 0.5, ram_fraction: float = 0.5):
        self.path = Path(path)
        if not self.path.is_file():
            raise PmmcacheError(f"no feature cache at {self.path}; run `pmmcache extract` first")
        self.manifest = check_manifest(self.path, expected) if expected else read_manifest(self.path)
        if not is_complete(self.path):
            raise PmmcacheError(f"{self.path} is incomplete (extraction was interrupted); "
                                "rerun `pmmcache extract` with the same options to finish it")
        self.device = torch.device(device)
        wanted = {"text/states", "text/mask", "text/scale", "image/states", "image/scale", "modality"}
        self._maps = open_maps(self.path, names=wanted)
        self.num_rows = self._maps["modality"].shape[0]
        self.storage = self._choose_storage(storage, gpu_fraction, ram_fraction)
        # Host storage stays numpy: its fancy indexing into a fresh array is ~6x faster than
        # torch.index_select allocating one (measured on 2 cores, 672 x 50 x 768 fp16).
        self._arrays: dict[str, np.ndarray] = self._maps
        self._tensors: dict[str, torch.Tensor] = {}
        if self.storage == "ram":
            self._arrays = {name: np.array(mm) for name, mm in self._maps.items()}
        elif self.storage == "gpu":
            self._tensors = {name: torch.from_numpy(np.array(mm)).to(self.device) for name, mm in self._maps.items()}

    @property
    def nbytes(self) -> int:
        return sum(mm.nbytes for mm in self._maps.values())

    @property
    def has_text(self) -> bool:
        return "text/states" in self._maps

    @property
    def has_image(self) -> bool:
        return "image/states" in self._maps

    @property
    def states_dtype(self) -> str:
        """How the states are stored: "float16" or "int8" (dequantised to float16 by `get`)."""
        return "int8" if any(name.endswith("/scale") for name in self._maps) else "float16"

    def _choose_storage(self, storage: Storage, gpu_fraction: float, ram_fraction: float) -> str:
        if storage != "auto":
            if storage == "gpu" and self.device.type != "cuda":
                raise PmmcacheError("cache storage 'gpu' needs a CUDA device")
            return storage
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.nbytes < gpu_fraction * free:
                return "gpu"
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return "ram" if self.nbytes < ram_fraction * available else "memmap"

    def get(self, indices: torch.Tensor | np.ndarray) -> ItemStates:
        """States of items `indices` (any shape, values in [0, N]); tensors on the reader's device."""
        index = torch.as_tensor(indices, dtype=torch.long)
        shape = tuple(index.shape)
        flat = index.reshape(-1)
        if self._tensors:
            flat = flat.to(self.device)
            out = {name: t.index_select(0, flat) for name, t in self._tensors.items()}
        else:
            rows = flat.cpu().numpy()
            out = {name: self._gather(arr, rows) for name, arr in self._arrays.items()}

        def shaped(name: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
            if name not in out:
                return None
            t = out[name].to(self.device, non_blocking=True)
            t = t.reshape(shape + tuple(t.shape[1:]))
            return t.to(dtype) if dtype is not None else t

        def states(modality: str) -> torch.Tensor | None:
            values, scale = shaped(f"{modality}/states"), shaped(f"{modality}/scale")
            # int8 crosses to the device as int8 (half the bytes) and is dequantised there.
            return dequantize_int8(values, scale) if scale is not None else values

        return ItemStates(text=states("text"), text_mask=shaped("text/mask", torch.bool),
                          image=states("image"), modality=shaped("modality", torch.bool))

    def _gather(self, array: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """Rows of a host array; into pinned memory when they go on to a GPU, so the copy is asynchronous."""
        if self.device.type != "cuda" or not isinstance(array, np.ndarray):  # (a sharded cache's RowConcat)
            return torch.from_numpy(array[rows])
        out = torch.empty((len(rows),) + array.shape[1:], dtype=torch.from_numpy(array[:0]).dtype, pin_memory=True)
        np.take(array, rows, axis=0, out=out.numpy())
        return out
