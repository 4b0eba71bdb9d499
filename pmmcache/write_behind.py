"""Stage 1's writer thread: cache rows are written while the next batch is being encoded.

The extraction loop hands each encoded batch to `BackgroundWriter.put` and goes on; a thread writes
the batches in order through `CacheWriter.write`, which marks a row done only after its states and
checksum are written, so a kill at any moment still leaves only whole rows done. The queue is bounded
(`depth` batches), so a slow disk slows encoding down instead of filling memory.

A write that fails stops the thread's writing; the error is raised in the extraction loop (by the
next `put`, or by `finish`) naming the rows and items of the batch. Ctrl-C or an error elsewhere calls
`stop`, which does not wait for queued batches: their rows stay pending and the rerun encodes them.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from pmmcache import cache as cache_io
from pmmcache.errors import PmmcacheError

SHOWN = 3  # item keys named in an error; the rest are counted


class BackgroundWriter:
    """Writes `(rows, arrays)` batches into `writer` on a thread, in the order they were put."""

    def __init__(self, writer: cache_io.CacheWriter, keys: list[str], path: Path, needed_bytes: int,
                 depth: int = 2):
        self._writer, self._keys, self._path, self._needed = writer, keys, path, needed_bytes
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._failed_rows: np.ndarray | None = None
        self._stopped = threading.Event()
        # A daemon: a Ctrl-C exits at once, even if the thread is inside a write (that row stays pending).
        self._thread = threading.Thread(target=self._run, name="pmmcache-cache-writer", daemon=True)
        self._thread.start()

    def put(self, rows: np.ndarray, arrays: dict[str, np.ndarray], ready: Callable[[], None] | None = None) -> None:
        """Queue one batch (blocks while `depth` batches wait). `ready` is called on the thread before
        the arrays are read: e.g. waiting for the device-to-host copy that fills them."""
        self._raise_if_failed()
        while not self._stopped.is_set():
            try:
                self._queue.put((rows, arrays, ready), timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()

    def finish(self) -> None:
        """Wait until every queued batch is written; raise the error of a failed write."""
        if not self._stopped.is_set():
            self._queue.put(None)
            self._thread.join()
        self._raise_if_failed()

    def stop(self) -> None:
        """Stop without waiting for queued batches (their rows stay pending)."""
        self._stopped.set()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stopped.is_set():
                return
            if self._error is not None:
                continue  # keep taking batches, so that a `put` never blocks on a dead thread
            rows, arrays, ready = item
            try:
                if ready is not None:
                    ready()
                with cache_io.explain_disk_full(self._path, self._needed):
                    self._writer.write(rows, arrays)
            except BaseException as err:  # raised in the extraction loop, which names the rows
                self._error, self._failed_rows = err, rows

    def _raise_if_failed(self) -> None:
        err = self._error
        if err is None:
            return
        self._stopped.set()
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise err
        rows = [int(r) for r in self._failed_rows]
        shown = ", ".join(f"{row} ({self._keys[row] or 'padding'})" for row in rows[:SHOWN])
        shown += f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
        raise PmmcacheError(f"writing {len(rows)} cache row(s) {shown} into {self._path} failed: {err} "
                            "(rows written before are kept; rerun the same command to resume)") from err
