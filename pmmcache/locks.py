"""Exclusive file locks that say who holds them: a process that has to wait prints the holder (pid, host,
command, since when) instead of hanging silently, and gives up after a timeout when one is set
(`PMMCACHE_LOCK_TIMEOUT`, seconds; unset: wait as long as it takes)."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Iterator

from pmmcache.errors import PmmcacheError

TIMEOUT_VARIABLE = "PMMCACHE_LOCK_TIMEOUT"


def lock_timeout() -> float | None:
    """Seconds to wait for a held lock (PMMCACHE_LOCK_TIMEOUT), None = no limit."""
    raw = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise PmmcacheError(f"{TIMEOUT_VARIABLE}={raw!r} is not a number of seconds") from None


def _try_lock(handle: IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def holder(path: Path) -> str:
    """Who holds (or last held) the lock at `path`, as recorded in it."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
        return (f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def exclusive_lock(path: Path, what: str, timeout: float | None = None, poll: float = 0.2) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if absent) for the block; `what` says what it guards.

    Waits for a holder with a message on stderr; PmmcacheError naming the holder after `timeout` seconds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        if not _try_lock(handle):
            limit = f" (at most {timeout:g} s, {TIMEOUT_VARIABLE})" if timeout is not None else ""
            print(f"waiting for {what}: it is in use by {holder(path)}; lock {path}{limit}", file=sys.stderr,
                  flush=True)
            start = time.monotonic()
            while not _try_lock(handle):
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise PmmcacheError(f"gave up after {timeout:g} s waiting for {what}: {path} is held by "
                                        f"{holder(path)}; wait for it to finish or stop that process")
                time.sleep(poll)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(os.path.basename(a) if i == 0 else a
                                                     for i, a in enumerate(sys.argv))[:200],
                                 "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")}))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
