"""TensorRT inference of a serialized engine (`model.plan` in the artifact).

An engine is specific to the TensorRT version that built it and to the GPU model
(TensorRT's developer guide: engines are not portable across devices or versions
by default). `mk export-trt` records both in mk.json (`tensorrt.version`,
`tensorrt.gpu`, `tensorrt.compute_capability`), and this runtime compares them
with the machine before deserializing, so a mismatch is one clear line naming
both sides (exit 2) instead of a crash or a `None` engine; shapes outside the
engine's profile are refused the same way.

The tensor-name API of TensorRT 10 and later (set_input_shape /
set_tensor_address / execute_async_v3); buffers are torch CUDA tensors (no
pycuda), allocated once at the profile's largest shape and reused across calls as
views; one CUDA stream of the runtime's own. Written against TensorRT's
documented API and run only where a GPU and TensorRT are present (tests marked
`gpu`; docs/gpu-results.md says what has run).
"""

from __future__ import annotations

import numpy as np
from mk.core.artifact import Artifact
from mk.core.device import resolve_device
from mk.core.doctor import INSTALL
from mk.core.errors import BadInput


def import_tensorrt():
    """The tensorrt module, or one line naming what is missing and how to install it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BadInput(f"TensorRT is not installed ({e})", hint=INSTALL["tensorrt"]) from None
    return trt


def machine(trt, device: str) -> dict:
    """What an engine built or loaded here is tied to."""
    import torch

    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return {"version": trt.__version__, "gpu": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}"}


def portability_problems(record: dict, here: dict) -> list[str]:
    """How the machine differs from the one the engine was built on (empty: it may load).
    Both are dicts with `version`, `gpu` and `compute_capability`."""
    problems = []
    for key, what in (("version", "TensorRT"), ("gpu", "GPU"), ("compute_capability", "compute capability")):
        built, now = record.get(key), here.get(key)
        if built is None:
            problems.append(f"its mk.json does not record the {what} it was built with")
        elif str(built) != str(now):
            problems.append(f"built with {what} {built}, this machine has {now}")
    return problems


def check_portable(art: Artifact, here: dict) -> None:
    record = art.manifest.get("tensorrt") or {}
    problems = portability_problems(record, here)
    if problems:
        raise BadInput(f"{art.path}: the engine cannot run here: {'; '.join(problems)}",
                       hint="rebuild it on this machine with `mk export-trt` from its ONNX parent "
                            "(see `mk info --lineage`)")


def outside_profile(shapes: dict, name: str, shape) -> str | None:
    """Why `shape` of input `name` cannot run on an engine with these (min, opt, max)
    shapes per input (None: it can)."""
    if name not in shapes:
        return f"the engine has no input {name!r} (it takes {', '.join(shapes)})"
    low, _, high = shapes[name]
    shape = list(shape)
    if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
        return (f"input {name} of shape {shape} is outside the engine's profile "
                f"(min {list(low)}, max {list(high)})")
    return None



class TensorRTRuntime:
    name = "tensorrt"
    threads = None

    def __init__(self, art: Artifact, device: str = "auto"):
        import torch

        trt = import_tensorrt()
        self.device = resolve_device("cuda" if device == "auto" else device)
        if not self.device.startswith("cuda"):
            raise BadInput(f"{art.path}: a TensorRT engine runs only on CUDA, not --device {device}")
        plan = art.path / "model.plan"
        if not plan.is_file():
            raise BadInput(f"{art.path}: TensorRT artifact without model.plan")
        check_portable(art, machine(trt, self.device))
        torch.cuda.set_device(torch.device(self.device))
        self.artifact = art
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BadInput(f"{plan}: TensorRT cannot deserialize it", hint="rebuild it with `mk export-trt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.output = next(n for n in names if not is_input[n])
        self._dtypes = {n: _torch_dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # (min, opt, max) shapes of the first optimisation profile, per input
        self.profile = {n: [list(s) for s in self.engine.get_tensor_profile_shape(n, 0)] for n in self.inputs}
        self.stream = torch.cuda.Stream(device=self.device)
        self._buffers = {n: torch.empty(self.profile[n][2], dtype=self._dtypes[n], device=self.device)
                         for n in self.inputs}
        self._out = None  # sized on the first call, when the output's largest shape is known

    def _feed(self, batch: dict[str, np.ndarray]) -> None:
        import torch

        for name in self.inputs:
            if name in batch:
                array = batch[name]
            elif name == "token_type_ids":
                array = np.zeros_like(batch["input_ids"])
            else:
                raise BadInput(f"{self.artifact.path}: the engine needs input {name!r} the data lacks")
            why = outside_profile(self.profile, name, array.shape)
            if why:
                raise BadInput(f"{self.artifact.path}: {why}",
                               hint="use batch sizes and lengths inside it, or rebuild the engine for them")
            view = self._buffers[name].view(-1)[:array.size].view(array.shape)
            view.copy_(torch.from_numpy(np.ascontiguousarray(array)), non_blocking=True)
            self.context.set_input_shape(name, tuple(array.shape))
            self.context.set_tensor_address(name, view.data_ptr())

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        with torch.cuda.stream(self.stream):
            self._feed(batch)
            shape = tuple(self.context.get_tensor_shape(self.output))
            n = int(np.prod(shape))
            if self._out is None or self._out.numel() < n:
                self._out = torch.empty(n, dtype=self._dtypes[self.output], device=self.device)
            out = self._out[:n].view(shape)
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.artifact.path}: TensorRT failed to run the engine")
            result = out.float().cpu()  # .cpu() of a CUDA tensor waits for the stream
        return result.numpy()

    def describe(self) -> dict:
        return {"runtime": self.name, "device": self.device, "threads": None, "profile": self.profile}


def _torch_dtype(np_dtype):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
            np.dtype(np.int8): torch.int8, np.dtype(np.bool_): torch.bool}[np.dtype(np_dtype)]
