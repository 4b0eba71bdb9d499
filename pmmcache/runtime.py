"""Where this process runs: CPU or CUDA, alone or as one of `accelerate launch`'s processes."""
from __future__ import annotations

import torch
from accelerate.utils import parse_flag_from_env


def use_cpu(device: str = "auto") -> bool:
    """Whether Accelerate must be told to run on the CPU.

    Without CUDA, Accelerate joins the launched processes (gloo) only when told it runs on the CPU;
    otherwise each process of `accelerate launch --multi_gpu` believes it is alone.
    """
    return (device == "cpu" or (device == "auto" and not torch.cuda.is_available())
            or parse_flag_from_env("ACCELERATE_USE_CPU"))
