"""Image stores: where an item's encoded image bytes (JPEG, PNG, ...) come from.

Three kinds, all opened lazily so a store can be built in one process and used in another
(DataLoader workers, `accelerate launch` ranks): a store pickles as its `spec()` and reopens there.

- `folder`: one file per item, named `<item key>.<image extension>` (the index is built once, on
  first use). A key that is a relative path inside the folder (`sub/x.png`) is read directly.
- `lmdb`: the PMMRec layout, key = item key in UTF-8 (or the released code's key, see
  `lmdb_records.released_key`), value = encoded image bytes, or the released code's pickled
  `LMDB_Image` record of raw pixels, read through a restricted unpickler and served as PNG bytes.
- `parquet`: a column of encoded image bytes in a parquet items table, keyed by its item column.

`decode_image` turns the bytes into an RGB image, with a limit on the pixels it decodes.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

from PIL import Image

from pmmcache.data.lmdb_records import is_pickle, record_png
from pmmcache.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Decoding takes width x height x 3 bytes, several times over while converting: an 11000 x 11000
# photo took ~2 GB. Above this many pixels a JPEG is decoded reduced (PIL's draft: 1/2, 1/4 or 1/8
# scale, still at least the encoder's image size) and any other image is refused.
MAX_IMAGE_PIXELS = 40_000_000


@runtime_checkable
class ImageStore(Protocol):
    """Read-only access to encoded image bytes by key."""

    def get_bytes(self, key: str) -> bytes | None:
        """The encoded image stored under `key`, or None when the store has none."""

    def keys(self) -> set[str]:
        """Every key the store can answer without a path lookup."""

    def spec(self) -> dict[str, Any]:
        """A JSON-able description from which `open_image_store` reopens this store."""

    def close(self) -> None:
        """Release files and handles held by this process."""


class FolderImageStore:
    """Images as files in one folder, each named by its item key plus an image extension."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise DataError("image folder not found", self.path)
        self._index: dict[str, str] | None = None  # key -> file name, built on first use

    def _files(self) -> dict[str, str]:
        if self._index is None:
            index: dict[str, str] = {}
            with os.scandir(self.path) as entries:
                for entry in entries:
                    stem, ext = os.path.splitext(entry.name)
                    if ext.lower() not in IMAGE_EXTENSIONS or not entry.is_file():
                        continue
                    if stem in index:
                        raise DataError(
                            f"two images for item {stem!r}: {index[stem]} and {entry.name}; keep one",
                            self.path,
                        )
                    index[stem] = entry.name
            self._index = index
        return self._index

    def _relative_file(self, key: str) -> Path | None:
        # Keys from a parquet path column are relative paths; never let one escape the folder.
        candidate = (self.path / key).resolve()
        if candidate.is_relative_to(self.path) and candidate.is_file():
            return candidate
        return None

    def get_bytes(self, key: str) -> bytes | None:
        name = self._files().get(key)
        if name is not None:
            return (self.path / name).read_bytes()
        path = self._relative_file(key)
        return path.read_bytes() if path is not None else None

    def has(self, key: str) -> bool:
        """Whether `get_bytes(key)` finds an image (by item key or relative path)."""
        return key in self._files() or self._relative_file(key) is not None

    def keys(self) -> set[str]:
        return set(self._files())

    def spec(self) -> dict[str, Any]:
        return {"kind": "folder", "path": str(self.path)}

    def close(self) -> None:
        self._index = None

    def __reduce__(self):
        return open_image_store, (self.spec(),)


# py-lmdb refuses to open one environment twice in a process, so stores of the same path share
# one handle: path -> [environment, number of stores using it]. Replaced in a forked child.
_SHARED_ENVS: dict[str, list] = {}
_SHARED_ENVS_PID = os.getpid()


def _acquire_env(path: Path):
    global _SHARED_ENVS_PID
    if _SHARED_ENVS_PID != os.getpid():
        # Handles inherited through fork must not be used by the child; closing the child's copy
        # only unmaps it here (lock=False: no shared lock table), and lets the path open again.
        for env, _ in _SHARED_ENVS.values():
            env.close()
        _SHARED_ENVS.clear()
        _SHARED_ENVS_PID = os.getpid()
    entry = _SHARED_ENVS.get(str(path))
    if entry is None:
        import lmdb

        try:
            env = lmdb.open(
                str(path), subdir=path.is_dir(), readonly=True, lock=False, readahead=False, meminit=False
            )
        except lmdb.Error as err:
            raise DataError(f"cannot open LMDB image store: {err}", path) from err
        entry = _SHARED_ENVS[str(path)] = [env, 0]
    entry[1] += 1
    return entry[0]


def _release_env(path: Path) -> None:
    entry = _SHARED_ENVS.get(str(path))
    if entry is not None and _SHARED_ENVS_PID == os.getpid():
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _SHARED_ENVS[str(path)]


class LmdbImageStore:
    """A PMMRec image LMDB: key (UTF-8) -> encoded image bytes, or a pickled `LMDB_Image` record of raw
    pixels (released code), which is unpickled with only that class allowed and served as PNG bytes.

    Opened read-only without the lock file (several readers, possibly on read-only disks) and
    without readahead (random access). The environment is opened on first use in each process:
    one inherited through fork is never reused.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.exists():
            raise DataError("LMDB image store not found", self.path)
        self._env = None
        self._pid: int | None = None

    def _open(self):
        if self._env is None or self._pid != os.getpid():
            self._env = _acquire_env(self.path)
            self._pid = os.getpid()
        return self._env

    def get_bytes(self, key: str) -> bytes | None:
        with self._open().begin(write=False) as txn:
            value = txn.get(key.encode("utf-8"))
        if value is not None and is_pickle(value):
            return record_png(value, key, self.path)  # `pmmcache convert-images` does this once for good
        return value

    def keys(self) -> set[str]:
        with self._open().begin(write=False) as txn:
            return {k.decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)}

    def stored_values(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) as stored, in key order: records stay pickled (`pmmcache.data.convert`)."""
        with self._open().begin(write=False) as txn:
            for key, value in txn.cursor():
                yield bytes(key), bytes(value)

    def spec(self) -> dict[str, Any]:
        return {"kind": "lmdb", "path": str(self.path)}

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            _release_env(self.path)
        self._env = None
        self._pid = None

    def __reduce__(self):
        return open_image_store, (self.spec(),)


class ParquetImageStore:
    """Encoded images in a binary column of a parquet table, keyed by another column.

    The two columns are read on first use in each process and kept in memory.
    """

    def __init__(self, path: str | Path, key_column: str, bytes_column: str):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise DataError("parquet image table not found", self.path)
        self.key_column = key_column
        self.bytes_column = bytes_column
        self._rows: dict[str, int] | None = None
        self._values = None

    def _load(self) -> dict[str, int]:
        if self._rows is None:
            import pyarrow.parquet as pq

            table = pq.read_table(self.path, columns=[self.key_column, self.bytes_column])
            keys = table.column(self.key_column).to_pylist()
            values = table.column(self.bytes_column).combine_chunks()
            self._rows = {str(k): i for i, k in enumerate(keys) if values[i].is_valid}
            self._values = values
        return self._rows

    def get_bytes(self, key: str) -> bytes | None:
        row = self._load().get(key)
        return None if row is None else self._values[row].as_py()

    def keys(self) -> set[str]:
        return set(self._load())

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "parquet",
            "path": str(self.path),
            "key_column": self.key_column,
            "bytes_column": self.bytes_column,
        }

    def close(self) -> None:
        self._rows = None
        self._values = None

    def __reduce__(self):
        return open_image_store, (self.spec(),)


def decode_image(data: bytes, where: str, min_side: int) -> Image.Image:
    """Encoded image bytes -> an RGB image. One of more than MAX_IMAGE_PIXELS pixels is decoded
    reduced when it is a JPEG (no side below `min_side` that was not already below it) and a
    DataError naming `where` otherwise; bytes PIL cannot decode raise PIL's own errors."""
    with warnings.catch_warnings():  # PIL warns from 89 Mpixels; the size is judged here instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as err:
            raise DataError(f"{where}: too large to decode ({err}); downscale it") from err
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS and img.format == "JPEG":
                img.draft("RGB", (min(width, min_side), min(height, min_side)))
                width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(f"{where}: the image is {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                "pmmcache decodes (it would take gigabytes of memory); downscale it")
            return img.convert("RGB")


def is_lmdb_dir(path: Path) -> bool:
    """Whether `path` is an LMDB environment directory (holds `data.mdb`)."""
    return path.is_dir() and (path / "data.mdb").is_file()


def open_image_store(spec: dict[str, Any]) -> ImageStore:
    """Reopen a store from its `spec()`: {"kind": "folder"|"lmdb"|"parquet", "path": ...}."""
    kind = spec.get("kind")
    path = spec.get("path")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise DataError(f"image store spec needs an absolute 'path', got {spec!r}")
    if kind == "folder":
        return FolderImageStore(path)
    if kind == "lmdb":
        return LmdbImageStore(path)
    if kind == "parquet":
        return ParquetImageStore(path, spec["key_column"], spec["bytes_column"])
    raise DataError(f"unknown image store kind {kind!r} in {spec!r}; known: folder, lmdb, parquet")


def open_image_path(path: str | Path) -> ImageStore:
    """A store for a user-given path: an LMDB (directory with data.mdb, or a .mdb/.lmdb file) or a folder."""
    path = Path(path)
    if is_lmdb_dir(path) or (path.is_file() and path.suffix in (".mdb", ".lmdb")):
        return LmdbImageStore(path)
    if path.is_dir():
        return FolderImageStore(path)
    raise DataError("image path is neither a folder of images nor an LMDB", path)


# ---- decoding on the GPU (nvJPEG) ----------------------------------------------------------------

JPEG_MAGIC = b"\xff\xd8\xff"


def device_decodable(data: bytes) -> bool:
    """Whether `decode_jpegs` should take these bytes: a JPEG small enough to decode whole (a larger one
    goes through `decode_image`, which decodes it reduced). Reads the header only."""
    if not data.startswith(JPEG_MAGIC):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Exception:  # a damaged header: decode_image flags it unreadable
        return False
    return width * height <= MAX_IMAGE_PIXELS


def decode_jpegs(datas: list[bytes], device: Any) -> list[Any]:
    """JPEG bytes -> (3, H, W) uint8 RGB tensors on `device` (on CUDA: nvJPEG, in one batched call);
    None for an image that cannot be decoded there (e.g. a CMYK JPEG), which the caller decodes with PIL."""
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for data in datas]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders (for TorchCodec); they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the batch: decode them one by one
            decoded = []
            for tensor in encoded:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded
