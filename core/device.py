"""`--device auto|cpu|cuda[:N]`, the same everywhere."""

from __future__ import annotations

import os
import re

from mk.core.errors import BadInput

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """`--device` spelled right; checked before anything loads, and by every runtime,
    so a typo is not misreported as a missing GPU."""
    if not _DEVICE.match(str(device)):
        raise BadInput(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def resolve_device(device: str = "auto") -> str:
    """`auto` is the first CUDA GPU when torch sees one, else the CPU."""
    check_device(device)
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise BadInput(f"--device {device}: no CUDA GPU is visible to torch", hint="use --device cpu")
    return "cuda:0" if device in ("auto", "cuda") else device


def default_threads() -> int:
    """The CPU threads a runtime uses unless told: one per physical core (ONNX Runtime's own
    default), but no more than the CPUs this process may run on (taskset, a container's cpuset)."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, min(cores, allowed))
