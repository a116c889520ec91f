"""`--device auto|cpu|cuda[:N]`, the same everywhere."""

from __future__ import annotations

import re

from mk.core.errors import BadInput

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(device: str = "auto") -> str:
    """`auto` is the first CUDA GPU when torch sees one, else the CPU."""
    if not _DEVICE.match(device):
        raise BadInput(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise BadInput(f"--device {device}: no CUDA GPU is visible to torch", hint="use --device cpu")
    return "cuda:0" if device in ("auto", "cuda") else device
