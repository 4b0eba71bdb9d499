"""A run's per-epoch checkpoints: sealed with checksums, checked before resuming, the last two kept.

    checkpoints/epoch-N/   accelerate's state (model safetensors, optimizer, scheduler, RNG) and
                           train_state.json, then COMPLETE, written last:
                           {"epoch": N, "sha256": {file name: digest of every other file}}

A checkpoint counts once its COMPLETE record exists; it is intact when every file the record lists
has the digest it lists and it holds no pickle that accelerate would load in full. The last KEEP
complete checkpoints are kept, so that when the newest is unreadable (a disk error, a truncated
copy, a replaced file) `--resume` falls back to the one before it instead of starting over.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pmmcache.errors import PmmcacheError
from pmmcache.files import write_json

KEEP = 2  # complete checkpoints kept: the newest and one to fall back to
COMPLETE = "COMPLETE"
PREFIX = "epoch-"


def checkpoint_dir(checkpoints: Path, epoch: int) -> Path:
    return Path(checkpoints) / f"{PREFIX}{epoch:04d}"


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(checkpoint: Path, epoch: int) -> None:
    """Write COMPLETE with the digest of every file in `checkpoint`: from now on it counts."""
    files = sorted(p for p in Path(checkpoint).rglob("*") if p.is_file() and p.name != COMPLETE)
    write_json(Path(checkpoint) / COMPLETE,
               {"epoch": epoch, "sha256": {p.relative_to(checkpoint).as_posix(): file_digest(p) for p in files}})


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Checkpoints with a COMPLETE record, oldest first (intact or not: see `problem`)."""
    return sorted(p for p in Path(checkpoints).glob(f"{PREFIX}*") if (p / COMPLETE).is_file())


def latest_checkpoint(checkpoints: Path) -> Path | None:
    done = complete_checkpoints(checkpoints)
    return done[-1] if done else None


def problem(checkpoint: Path) -> str | None:
    """What makes `checkpoint` unfit to resume from, in a few words; None when it is intact.

    A checkpoint sealed before checksums were recorded (COMPLETE holds only the epoch) is checked by
    loading its files the way `Accelerator.load_state` does (safetensors; torch.load weights-only)."""
    checkpoint = Path(checkpoint)
    pickles = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*"))
    if pickles:  # accelerate would unpickle these in full: refuse rather than run what they hold
        return f"it holds {', '.join(pickles)}, a pickle that pmmcache does not load (it writes none)"
    try:
        record = json.loads((checkpoint / COMPLETE).read_text())
    except (OSError, ValueError) as err:
        return f"its {COMPLETE} record is unreadable ({err})"
    if isinstance(record, int) and not isinstance(record, bool):
        return _load_problem(checkpoint)
    digests = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        return f"its {COMPLETE} record is not one pmmcache writes"
    for name, expected in sorted(digests.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if file_digest(path) != expected:
            return f"{name} is not the file that was saved (its checksum differs)"
    return None


def _load_problem(checkpoint: Path) -> str | None:
    """Load every state file of an unsealed (older) checkpoint without unpickling code; the first failure."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix in (".bin", ".pkl"):
                load(str(path), map_location="cpu")  # weights_only=True
        except Exception as err:  # noqa: BLE001 - any failure to load means "unreadable", reported by name
            return f"{path.name} is unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})"
    return None


def remove(checkpoint: Path) -> None:
    """Delete a checkpoint, its COMPLETE record first: a half-deleted one never counts."""
    (Path(checkpoint) / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def prune(checkpoints: Path, keep: int = KEEP) -> None:
    """Keep the newest `keep` complete checkpoints; delete the older ones and any incomplete one."""
    kept = set(complete_checkpoints(checkpoints)[-keep:])
    for path in Path(checkpoints).glob(f"{PREFIX}*"):
        if path not in kept:
            remove(path)


# How a full disk shows through the writers a checkpoint uses: OSError (ENOSPC / EDQUOT), torch's
# "file write failed", safetensors' Rust IoError (os error 28, StorageFull).
DISK_FULL_SIGNS = ("no space left", "file write failed", "storagefull", "os error 28", "quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(sign in str(err).lower() for sign in DISK_FULL_SIGNS)


@contextmanager
def explain_disk_full(target: Path, last_good: Path | None) -> Iterator[None]:
    """A disk full while writing checkpoint `target` (or best/) becomes one message saying where, how much
    is free and what to do; the unsealed checkpoint is ignored by --resume, so the run loses at most an epoch."""
    try:
        yield
    except Exception as err:
        if isinstance(err, PmmcacheError) or not is_disk_full(err):
            raise
        where = Path(target)
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        raise PmmcacheError(
            f"disk full while saving the checkpoint {target} ({free / 1e6:.0f} MB free there; "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else err!r}). The last good "
            f"checkpoint is {last_good or 'none (no epoch finished)'}: free some space and rerun the same "
            "command with --resume") from err
