"""The released PMMRec image LMDB: its key scheme and its pickled `LMDB_Image` records.

Facts from the released code (ICDE24/PMMRec `src/data_utils/tools.py`, `dataset.py`):
- Keys: item `v12345` is stored under `b"12345"` (the name with its `v` removed, as an integer,
  ASCII-encoded; so `v0012` -> `b"12"`). Stores made by other tools use the item name itself.
- Values: `pickle.dumps(LMDB_Image(...))`, an object with `channels` (int), `size` ((height, width)),
  `image` (the raw uint8 pixels, height x width x channels, row-major; not an encoded JPEG/PNG) and `id`.

A pickle can run any code it names, so records are read through a restricted unpickler (the
"restricting globals" pattern of Python's `pickle` documentation): the only globals it resolves are
a class named `LMDB_Image` (from any module, since the releases pickled it from their own scripts),
which becomes the inert `ImageRecord` below, and the builtins that protocols 0-2 need to rebuild a
plain object and its bytes (`copyreg._reconstructor`, `builtins.object`, `_codecs.encode`), each
restricted to that use. Anything else is refused naming the key, before it is called.

`pmmcache.data.convert` rewrites such a store as PNG bytes per key (same keys), so the unpickler and
the re-encoding are needed only once.
"""
from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pmmcache.errors import DataError

RECORD_CLASS = "LMDB_Image"
PICKLE_MAGIC = b"\x80"  # protocol 2+ starts with this byte; no image format does
_PROTOCOL_0_1 = (b"c", b"(")  # GLOBAL or MARK first: how protocols 0 and 1 start an object
_RELEASED_NAME = re.compile(r"^v?(\d+)$")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
MAX_RECORD_PIXELS = 40_000_000  # as images.MAX_IMAGE_PIXELS: raw pixels are never decoded reduced


def released_key(item: str) -> str | None:
    """The LMDB key the released code stores item `item` under: `v12345` -> `12345` (None if not `v<digits>`)."""
    match = _RELEASED_NAME.match(item)
    return str(int(match.group(1))) if match else None


class ImageRecord:
    """What a pickled `LMDB_Image` becomes: its attributes only, no methods that run anything."""

    channels: object = None
    size: object = None
    image: object = None
    id: object = None


class _RecordUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the LMDB_Image record and the builtins that rebuild it."""

    def __init__(self, data: bytes, key: str, where: Path):
        super().__init__(io.BytesIO(data))
        self.key, self.where = key, where

    def find_class(self, module: str, name: str) -> Callable:
        if name == RECORD_CLASS:
            return ImageRecord
        # Protocols 0-2 write Python 2's module names (copy_reg, __builtin__) for these.
        if (module, name) in (("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return _reconstruct
        if (module, name) in (("builtins", "object"), ("__builtin__", "object")):
            return object
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise DataError(f"the value for {self.key!r} is a Python pickle naming {module}.{name}; pmmcache unpickles "
                        f"only {RECORD_CLASS} records (refused, nothing was run)", self.where)


def _reconstruct(cls: type, base: type, state: object) -> object:
    """copyreg._reconstructor restricted to a plain object of the record class."""
    if cls is not ImageRecord or base is not object or state is not None:
        raise pickle.UnpicklingError("only a plain LMDB_Image object can be rebuilt")
    return object.__new__(ImageRecord)


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """_codecs.encode restricted to what protocols 0-2 use it for: a str holding bytes, latin-1."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only for bytes (a str, latin1)")
    return text.encode("latin1")


def is_pickle(value: bytes) -> bool:
    """Whether an LMDB value is a Python pickle rather than encoded image bytes."""
    return value[:1] == PICKLE_MAGIC or (value[:1] in _PROTOCOL_0_1 and b"\n" in value[:64])


def load_record(value: bytes, key: str, where: Path) -> ImageRecord:
    """The `LMDB_Image` record pickled in `value`; DataError naming the key for anything else."""
    try:
        record = _RecordUnpickler(value, key, where).load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any malformed pickle is one clear error naming the key
        raise DataError(f"the value for {key!r} is a Python pickle that is not a readable {RECORD_CLASS} record "
                        f"({type(err).__name__}: {err})", where) from err
    if not isinstance(record, ImageRecord):
        raise DataError(f"the value for {key!r} is a Python pickle of a {type(record).__name__}, not an "
                        f"{RECORD_CLASS} record; convert the store to encoded JPEG/PNG bytes per key", where)
    return record


def record_pixels(record: ImageRecord, key: str, where: Path) -> np.ndarray:
    """The record's pixels as a (height, width, channels) uint8 array, its fields checked."""
    size, channels, data = record.size, record.channels, record.image
    if (not isinstance(size, (tuple, list)) or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)
            or not isinstance(channels, int) or channels not in _MODES or not isinstance(data, bytes)):
        raise DataError(f"the {RECORD_CLASS} record of key {key!r} has size {size!r}, channels {channels!r} and "
                        f"image {type(data).__name__}; expected (height, width), 1/3/4 and raw bytes", where)
    height, width = size
    if height * width > MAX_RECORD_PIXELS:
        raise DataError(f"the image of key {key!r} is {width} x {height} pixels, more than the {MAX_RECORD_PIXELS} "
                        "pmmcache decodes; downscale it", where)
    if len(data) != height * width * channels:
        raise DataError(f"the {RECORD_CLASS} record of key {key!r} holds {len(data)} bytes, not height x width x "
                        f"channels = {height} x {width} x {channels}", where)
    return np.frombuffer(data, np.uint8).reshape(height, width, channels)


def record_png(value: bytes, key: str, where: Path) -> bytes:
    """A pickled `LMDB_Image` -> the same pixels as PNG bytes (lossless)."""
    pixels = record_pixels(load_record(value, key, where), key, where)
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, _MODES[pixels.shape[2]])
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)  # fast: the pixels, not the file size, are what count
    return out.getvalue()
