"""Atomic writes of small files and of directories: a reader sees the old one or the new one, never half of one."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a sibling temporary file, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented, key-sorted JSON, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# A directory is replaced in three renames: DEST -> DEST.old, DEST.tmp -> DEST, then DEST.old deleted.
# DEST.tmp is complete before the first rename, so after a crash at any moment one of them is whole.


def replace_dir(dest: str | Path, fill: Callable[[Path], None]) -> None:
    """Replace directory `dest` by what `fill(staging)` writes into an empty staging directory, so
    that a crash at any moment leaves the old or the new one whole (see `settled_dir`)."""
    dest = Path(dest)
    settle_dir(dest)
    staging, old = _staging(dest), _previous(dest)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fill(staging)
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)


def settled_dir(dest: str | Path) -> Path | None:
    """The whole copy of a directory written by `replace_dir` (read only: nothing is renamed):
    `dest`, or, after a crash between its renames, the staging copy (or the old one); None if none."""
    dest = Path(dest)
    if dest.is_dir():
        return dest
    if _previous(dest).is_dir():  # the first rename happened, so the staging copy was complete
        return _staging(dest) if _staging(dest).is_dir() else _previous(dest)
    return None


def settle_dir(dest: str | Path) -> None:
    """Finish a `replace_dir` a crash interrupted: the whole copy becomes `dest`, leftovers go."""
    dest = Path(dest)
    whole = settled_dir(dest)
    if whole is not None and whole != dest:
        os.replace(whole, dest)
    shutil.rmtree(_previous(dest), ignore_errors=True)


def _staging(dest: Path) -> Path:
    return dest.with_name(dest.name + ".tmp")


def _previous(dest: Path) -> Path:
    return dest.with_name(dest.name + ".old")
