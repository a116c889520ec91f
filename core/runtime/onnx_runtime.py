"""ONNX Runtime inference of an exported model (`model.onnx` in the artifact)."""

from __future__ import annotations

import numpy as np

from mk.core.artifact import Artifact
from mk.core.console import quiet_onnxruntime
from mk.core.device import check_device
from mk.core.errors import BadInput, library_error

_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def providers_for(device: str) -> list:
    """ONNX Runtime's providers for `--device`: `cuda:N` runs on GPU N (`device_id`),
    `auto` on GPU 0 when this onnxruntime has CUDA, else the CPU."""
    import onnxruntime as ort

    check_device(device)
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        gpu = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"]
    if device == "auto":
        return ["CPUExecutionProvider"]
    raise BadInput(f"--device {device}: this onnxruntime has no CUDA provider ({', '.join(available)})",
                   hint="pip install 'mk[gpu]' (onnxruntime-gpu), or use --device cpu")


def session_device(session) -> str:
    """Where a session runs: `cuda:N` as its CUDA provider was given, else `cpu`."""
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return "cpu"
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return f"cuda:{options.get('device_id', 0)}"


def open_session(path, device: str = "auto", threads: int | None = None, spin: bool = True):
    """An InferenceSession. `spin=False` stops the worker threads spinning when a run
    returns, instead of busy-waiting for the next one: a server needs those cycles for
    its event loop. They still spin between the operators of a run, which turning
    spinning off altogether would also stop (scripts/bench_serve_parts.py, a 16-token
    call every 2 ms on 2 Xeon cores: 2.35 ms and 4.5 ms of CPU a call, against 2.75 ms
    and 4.1 ms never spinning, 2.42 ms and 7.1 ms spinning throughout)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = quiet_onnxruntime()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers_for(device))
    except Exception as e:  # onnxruntime raises its own untyped errors for bad files
        raise library_error(e, path, "ONNX Runtime cannot load it") from None


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, art: Artifact, device: str = "auto", threads: int | None = None, spin: bool = True):
        path = art.path / "model.onnx"
        if not path.is_file():
            raise BadInput(f"{art.path}: ONNX artifact without model.onnx")
        self.artifact = art
        self.session = open_session(path, device, threads, spin)
        self.device = session_device(self.session)
        self.threads = threads
        self.inputs = {i.name: _NUMPY_TYPES.get(i.type, np.int64) for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0].name

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: np.ascontiguousarray(batch[k], dtype=t) for k, t in self.inputs.items() if k in batch}
        if "token_type_ids" in self.inputs and "token_type_ids" not in batch:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"], dtype=self.inputs["token_type_ids"])
        missing = set(self.inputs) - set(feed)
        if missing:
            raise BadInput(f"{self.artifact.path}: the model needs inputs {sorted(missing)} the data lacks")
        return self.session.run([self.output], feed)[0].astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {"runtime": self.name, "device": self.device, "threads": self.threads,
                "providers": self.session.get_providers()}
