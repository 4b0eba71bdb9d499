"""A small tool of the extraction tests: edit a raw data file in place."""
from __future__ import annotations

from pathlib import Path


def rewrite_line(path: Path, number: int, text: str) -> None:
    """Replace line `number` (1-based) of a text file."""
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def write_spy_module(patches: str = "") -> str:
    """The source of a module that runs `python -m pmmcache` with every `CacheWriter.write` logged, as one
    line of row numbers per batch, to `$SPY_LOG_DIR/rank$RANK.txt`; `patches` is more code run before."""
    return '''
import os, runpy, time
import pmmcache.cache as cache_io

original = cache_io.CacheWriter.write

def logged_write(self, rows, arrays):
    with open(os.path.join(os.environ["SPY_LOG_DIR"], f"rank{os.environ['RANK']}.txt"), "a") as log:
        log.write(" ".join(str(int(r)) for r in rows) + "\\n")
    original(self, rows, arrays)

cache_io.CacheWriter.write = logged_write
''' + patches + '''
runpy.run_module("pmmcache", run_name="__main__", alter_sys=True)  # exactly `python -m pmmcache`
'''
