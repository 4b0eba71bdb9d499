"""Where this process runs: CPU or CUDA, alone or as one of `accelerate launch`'s processes."""
from __future__ import annotations

import torch
from accelerate.utils import parse_flag_from_env

from pmmcache.errors import ConfigError


def check_device(device: str, option: str = "--device") -> None:
    """Refuse a device name torch does not know, or CUDA on a machine without it, naming the option."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{option} {device!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} {device!r}: this machine has no CUDA device; use cpu or auto")


def use_cpu(device: str = "auto") -> bool:
    """Whether Accelerate must be told to run on the CPU.

    Without CUDA, Accelerate joins the launched processes (gloo) only when told it runs on the CPU;
    otherwise each process of `accelerate launch --multi_gpu` believes it is alone.
    """
    return (device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            or parse_flag_from_env("ACCELERATE_USE_CPU"))
