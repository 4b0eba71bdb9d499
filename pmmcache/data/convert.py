"""`pmmcache convert-images`: a released PMMRec image LMDB (pickled `LMDB_Image` records of raw pixels,
see `lmdb_records`) rewritten as an LMDB of PNG bytes under the same keys, so that the records are
unpickled (through the restricted unpickler) and re-encoded once instead of at every read."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pmmcache.data.images import LmdbImageStore
from pmmcache.data.lmdb_records import is_pickle, record_png
from pmmcache.errors import DataError


def convert_store(source: Path, target: Path) -> dict[str, int]:
    """Copy every key of the LMDB `source` into a new LMDB folder `target`, each `LMDB_Image` record as
    PNG bytes (encoded images are copied as they are). Written to a sibling folder, then renamed: a
    failure leaves no half-written `target`. Returns {"keys", "converted", "bytes"}."""
    import lmdb

    source, target = Path(source), Path(target)
    if target.exists():
        raise DataError("already exists; choose another destination or remove it", target)
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    store = LmdbImageStore(source)
    counts = {"keys": 0, "converted": 0, "bytes": 0}
    map_size = max(1 << 26, 4 * _store_size(source))
    try:
        env = lmdb.open(str(staging), map_size=map_size, subdir=True)
        try:
            pending: list[tuple[bytes, bytes]] = []
            for raw_key, value in store.stored_values():
                key = raw_key.decode("utf-8", "replace")
                converted = record_png(value, key, store.path) if is_pickle(value) else value
                counts["keys"] += 1
                counts["converted"] += converted is not value
                counts["bytes"] += len(converted)
                pending.append((raw_key, converted))
                if len(pending) >= 256:
                    map_size = _write(env, pending, map_size)
                    pending = []
            _write(env, pending, map_size)
        finally:
            env.close()
        os.replace(staging, target)
    finally:
        store.close()
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _store_size(path: Path) -> int:
    data = path / "data.mdb" if path.is_dir() else path
    return data.stat().st_size if data.exists() else 0


def _write(env, pending: list[tuple[bytes, bytes]], map_size: int) -> int:
    """Write one batch, doubling the map when it is full; returns the map size now."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in pending:
                    txn.put(key, value)
            return map_size
        except lmdb.MapFullError:
            map_size *= 2
            env.set_mapsize(map_size)
