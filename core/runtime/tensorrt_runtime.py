"""TensorRT inference of a serialized engine (`model.plan` in the artifact).

Buffers are torch CUDA tensors, so no pycuda is needed, and the engine runs on
torch's current stream: `.cpu()` on the output then synchronises, as in the
torch runtime, and timings of the two are comparable. Uses the tensor-name API
of TensorRT 10 and later (set_input_shape / set_tensor_address /
execute_async_v3).
"""

from __future__ import annotations

import numpy as np

from mk.core.artifact import Artifact
from mk.core.device import resolve_device
from mk.core.errors import BadInput


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BadInput("TensorRT is not installed; a .plan engine needs it",
                       hint="pip install 'mk[gpu]' on a machine with an NVIDIA GPU") from None
    return trt


class TensorRTRuntime:
    name = "tensorrt"
    threads = None

    def __init__(self, art: Artifact, device: str = "auto"):
        import torch

        trt = _import_tensorrt()
        self.device = resolve_device("cuda" if device == "auto" else device)
        if not self.device.startswith("cuda"):
            raise BadInput(f"{art.path}: a TensorRT engine runs only on CUDA, not --device {device}")
        plan = art.path / "model.plan"
        if not plan.is_file():
            raise BadInput(f"{art.path}: TensorRT artifact without model.plan")
        torch.cuda.set_device(torch.device(self.device))
        self.artifact = art
        self._logger = trt.Logger(trt.Logger.ERROR)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BadInput(f"{plan}: TensorRT cannot deserialize it (built by another TensorRT version "
                           "or for another GPU?)", hint="rebuild it with `mk export-trt` on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.output = next(n for n in names if not is_input[n])
        self._dtypes = {n: _torch_dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # (min, opt, max) shapes of the first optimisation profile, per input
        self.profile = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
                        for n in self.inputs}

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        low, _, high = self.profile[name]
        if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
            raise BadInput(f"{self.artifact.path}: input {name} of shape {list(shape)} is outside the "
                           f"engine's profile (min {list(low)}, max {list(high)})",
                           hint="use batch sizes and lengths inside it, or rebuild the engine for them")

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        stream = torch.cuda.current_stream()
        feeds = {}
        for name in self.inputs:
            if name in batch:
                array = batch[name]
            elif name == "token_type_ids":
                array = np.zeros_like(batch["input_ids"])
            else:
                raise BadInput(f"{self.artifact.path}: the engine needs input {name!r} the data lacks")
            self._check_shape(name, array.shape)
            feeds[name] = torch.from_numpy(np.ascontiguousarray(array)).to(
                self.device, dtype=self._dtypes[name], non_blocking=True)
            self.context.set_input_shape(name, tuple(array.shape))
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)),
                          dtype=self._dtypes[self.output], device=self.device)
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.artifact.path}: TensorRT failed to run the engine")
        return out.float().cpu().numpy()  # .cpu() waits for the stream

    def describe(self) -> dict:
        return {"runtime": self.name, "device": self.device, "threads": None,
                "profile": {n: [list(s) for s in p] for n, p in self.profile.items()}}


def _torch_dtype(np_dtype):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
            np.dtype(np.int8): torch.int8, np.dtype(np.bool_): torch.bool}[np.dtype(np_dtype)]
