"""Experiment tracking of stage 2 through Accelerate's trackers (`TrainConfig.log_with`, `train --log-with`).

Off by default; `metrics.jsonl` is written either way. With trackers on, the main process logs every
optimizer step's losses (`train/loss`, `train/<objective>`) and every epoch's metrics.jsonl record
(`epoch/<field>`), all against the global optimizer step, and the resolved config, flattened, as the
run's hyperparameters. Trackers that keep files (TensorBoard) write under `runs/<run>/trackers/`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from pmmcache.config import to_dict
from pmmcache.errors import ConfigError, PmmcacheError

TRACKERS = tuple(t.value for t in LoggerType)  # "all" = every tracker installed
PROJECT = "pmmcache"  # the project name trackers file the run under (wandb, mlflow, ...)
# What `pip install` gives each tracker; pmmcache's own extra for TensorBoard.
PACKAGES = {"tensorboard": "'pmmcache[tracking]' (tensorboard)", "comet_ml": "comet_ml"}


def check_tracker_names(names: tuple[str, ...]) -> None:
    """ConfigError naming a tracker Accelerate does not know."""
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"log_with = {', '.join(unknown)}: not a tracker; Accelerate knows {', '.join(TRACKERS)}")


def require_installed(names: tuple[str, ...]) -> None:
    """PmmcacheError naming a tracker whose package is missing (Accelerate would only warn and go on)."""
    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in names if name != "all" and name not in available]
    if missing:
        raise PmmcacheError(f"--log-with {','.join(missing)}: not installed; pip install "
                            + " ".join(PACKAGES.get(name, name) for name in missing))
    if "all" in names and not available:
        raise PmmcacheError("--log-with all: no tracker is installed; pip install 'pmmcache[tracking]' for TensorBoard")


def tracker_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "trackers"


def hyperparameters(config: Any) -> dict[str, bool | int | float | str]:
    """A config dataclass as flat {"objectives.nicl": 1.0, ...}: the value types every tracker stores
    (None, lists and paths as text)."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = str(value)

    walk("", to_dict(config))
    return flat


class RunTrackers:
    """The trackers of one training run; every method is a no-op when `log_with` is empty."""

    def __init__(self, accelerator: Accelerator, config: Any, run_dir: Path):
        self.accelerator = accelerator
        self.enabled = bool(config.log_with)
        if self.enabled:
            accelerator.init_trackers(PROJECT, config=hyperparameters(config),
                                      init_kwargs={"wandb": {"name": Path(run_dir).name}})

    def log_step(self, step: int, loss: float, losses: dict[str, Any]) -> None:
        """One optimizer step's weighted loss and each objective's (tensors read in one host sync)."""
        if not self.enabled:
            return
        values = torch.stack([value.detach().float() for value in losses.values()]).tolist() if losses else []
        self.accelerator.log({"train/loss": loss, **{f"train/{name}": v for name, v in zip(losses, values)}}, step=step)

    def log_epoch(self, step: int, record: dict[str, Any]) -> None:
        """The epoch's metrics.jsonl record, its finite numbers."""
        if self.enabled:
            self.accelerator.log({f"epoch/{key}": value for key, value in record.items()
                                  if isinstance(value, (int, float)) and math.isfinite(value)}, step=step)

    def finish(self) -> None:
        for tracker in self.accelerator.trackers:  # not end_training: that also ends the process group
            tracker.finish()
