"""Atomic small-file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
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
