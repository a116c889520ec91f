"""`mk doctor`: what this machine can do for mk, and what each missing piece needs.

Each heavy library (torch, ONNX Runtime, TensorRT, tritonclient) is imported in
a subprocess of its own, all at once: a broken install (a missing CUDA library,
a segfaulting import) is then one failed probe in the report, not the end of
mk doctor, and the report's figures are each library's own answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from mk.core.errors import BadInput

PROBE_TIMEOUT_S = 120
INSTALL = {
    "torch": "pip install torch (the CPU wheel: --index-url https://download.pytorch.org/whl/cpu)",
    "cuda": "an NVIDIA GPU and driver, and torch built for CUDA: "
            "pip install torch --index-url https://download.pytorch.org/whl/cu128",
    "onnxruntime": "pip install onnxruntime",
    "onnxruntime-cuda": "pip uninstall onnxruntime && pip install onnxruntime-gpu (needs CUDA and cuDNN)",
    "tensorrt": "pip install 'mk[gpu]' --extra-index-url https://pypi.nvidia.com "
                "(TensorRT's libraries come from NVIDIA's index; needs an NVIDIA GPU and driver)",
    "tritonclient": "pip install 'tritonclient[grpc]' (only to check --triton-repo configs and talk to Triton)",
    "nvidia-smi": "the NVIDIA driver (it ships nvidia-smi)",
}
REQUIRABLE = ("torch", "cuda", "onnxruntime", "onnxruntime-cuda", "tensorrt", "tritonclient", "avx2", "avx512",
              "vnni", "amx")

# Each probe prints one JSON object on stdout; anything else it prints goes to stderr.
PROBES = {
    "torch": """
import json, torch
gpus = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                     "memory_bytes": p.total_memory})
print(json.dumps({"version": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(), "gpus": gpus}))
""",
    "onnxruntime": """
import json, onnxruntime as ort
print(json.dumps({"version": ort.__version__, "providers": ort.get_available_providers()}))
""",
    "tensorrt": """
import json, tensorrt as trt
print(json.dumps({"version": trt.__version__}))
""",
    "tritonclient": """
import json, importlib.metadata as md
from tritonclient.grpc import model_config_pb2
print(json.dumps({"version": md.version("tritonclient")}))
""",
}


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _finish(name: str, proc: subprocess.Popen) -> dict:
    """A probe's answer: {"ok": True, …} or {"ok": False, "error": the last line it said}."""
    try:
        out, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "error": f"importing {name} took over {PROBE_TIMEOUT_S} s"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return {"ok": True, **json.loads(lines[-1])}
    said = [line.strip() for line in err.splitlines() if line.strip()]
    if proc.returncode < 0:
        return {"ok": False, "error": f"importing {name} killed the process (signal {-proc.returncode})"}
    return {"ok": False, "error": said[-1] if said else f"exit status {proc.returncode}"}


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"ok": False, "error": "nvidia-smi not found"}
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "error": f"nvidia-smi failed ({type(e).__name__})"}
    if r.returncode != 0:
        return {"ok": False, "error": (r.stderr or r.stdout).strip().splitlines()[-1:] or "nvidia-smi failed"}
    gpus = [dict(zip(("name", "driver", "memory"), (c.strip() for c in line.split(","))))
            for line in r.stdout.splitlines() if line.strip()]
    return {"ok": True, "gpus": gpus}


def diagnose() -> dict:
    """The report: CPU, libraries (each probed in isolation), GPUs, what works, what to install."""
    from mk.core.cpu import int8_path, this_cpu

    running = {name: _start(code) for name, code in PROBES.items()}
    cpu = this_cpu()
    libs = {name: _finish(name, proc) for name, proc in running.items()}
    smi = _nvidia_smi()
    report = {"python": sys.version.split()[0],
              "cpu": {"model": cpu.model, "cores": os.cpu_count(), "flags": list(cpu.flags),
                      "int8_path": int8_path(cpu.flags)},
              "libraries": libs, "driver": smi}
    report["have"] = _have(report)
    report["works"] = _works(report["have"])
    report["missing"] = {k: INSTALL[k] for k in ("torch", "cuda", "onnxruntime", "onnxruntime-cuda", "tensorrt",
                                                   "tritonclient") if not report["have"][k]}
    return report


def _have(report: dict) -> dict:
    libs, flags = report["libraries"], set(report["cpu"]["flags"])
    torch, ort = libs["torch"], libs["onnxruntime"]
    return {"torch": torch["ok"], "cuda": torch["ok"] and torch.get("cuda_available", False),
            "onnxruntime": ort["ok"],
            "onnxruntime-cuda": ort["ok"] and "CUDAExecutionProvider" in ort.get("providers", []),
            "tensorrt": libs["tensorrt"]["ok"], "tritonclient": libs["tritonclient"]["ok"],
            "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), "amx": bool(flags & {"amx_int8", "amx_bf16"})}


def _works(have: dict) -> dict:
    """Which commands and --device choices will run here."""
    torch, ort, cuda = have["torch"], have["onnxruntime"], have["cuda"]
    return {"mk prep / tune / bench (torch) --device cpu": torch,
            "mk tune / bench / serve --device cuda": cuda,
            "mk export-onnx, mk quant": torch and ort,
            "ONNX models --device cuda": have["onnxruntime-cuda"],
            "mk export-trt, TensorRT engines": cuda and have["tensorrt"],
            "mk export-onnx --triton-repo": torch and ort}


def required(require: str | None) -> list[str]:
    """The names of `--require` (comma-separated), checked before any probing: exit 2 for
    a name mk does not know."""
    names = [n.strip().lower() for n in (require or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in REQUIRABLE]
    if unknown:
        raise BadInput(f"--require {','.join(unknown)}: unknown; expected names from {', '.join(REQUIRABLE)}")
    return names


def missing(report: dict, names: list[str]) -> list[str]:
    """The required pieces this machine lacks."""
    return [n for n in names if not report["have"][n]]
