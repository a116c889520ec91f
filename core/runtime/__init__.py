"""One runtime interface over torch, ONNX Runtime and TensorRT.

`load_runtime(artifact)` picks the implementation from the artifact's format.
Every runtime is called with a batch of numpy arrays (`input_ids`,
`attention_mask`, optionally `token_type_ids`, or `pixel_values`) and returns
float32 logits as numpy; `mk bench`, `mk serve` and the accuracy gates all go
through it, so a number measured by one is the number the others run at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from mk.core.artifact import Artifact, open_artifact
from mk.core.errors import BadInput


class Runtime(Protocol):
    name: str          # "torch", "onnxruntime" or "tensorrt"
    device: str        # e.g. "cpu", "cuda:0"
    threads: int | None

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray: ...

    def describe(self) -> dict: ...


def load_runtime(model: Artifact | str | Path, device: str = "auto", threads: int | None = None,
                 spin: bool = True) -> Runtime:
    """The runtime of the artifact's format. `spin=False` (a server's choice) lets ONNX
    Runtime's threads sleep between calls instead of spinning."""
    art = model if isinstance(model, Artifact) else open_artifact(model, kind="model")
    if art.kind != "model":
        raise BadInput(f"{art.path}: is a {art.kind} artifact; a runtime needs a model")
    if art.format == "safetensors":
        from mk.core.runtime.torch_runtime import TorchRuntime
        return TorchRuntime.load(art, device, threads)
    if art.format == "onnx":
        from mk.core.runtime.onnx_runtime import OnnxRuntime
        return OnnxRuntime(art, device, threads, spin)
    if art.format == "tensorrt":
        from mk.core.runtime.tensorrt_runtime import TensorRTRuntime
        return TensorRTRuntime(art, device)
    raise BadInput(f"{art.path}: no runtime for format {art.format!r}")
