"""`--triton-repo DIR`: a model artifact laid out as Triton Inference Server loads it.

    DIR/<name>/config.pbtxt
    DIR/<name>/labels.txt          (the classes, for Triton's classification extension)
    DIR/<name>/1/model.onnx        (+ model.onnx.data)   -- ONNX Runtime backend
    DIR/<name>/1/model.plan                              -- TensorRT backend

config.pbtxt is protobuf text of Triton's `ModelConfig` (model_config.proto):
inputs and outputs without the batch axis, `max_batch_size` and the dynamic
batcher's preferred sizes from the shape profile, one instance group. It is
written by hand here (a few fixed fields) so that writing needs no tritonclient;
the tests parse it with the real `ModelConfig` message from tritonclient, and so
does `parse_config` when tritonclient is installed.

A repository holds many models, so mk writes only DIR/<name>: a new name is added
to a repository (missing, empty, or holding only model folders) without --force;
--force replaces that one model folder, if mk wrote it, and never the others.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mk.core.errors import BadInput
from mk.core.outputs import atomic_output, check_output, describe

# numpy dtype names (ONNX and TensorRT tensors map to them) to Triton's DataType
TRITON_TYPES = {"bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
                "bfloat16": "TYPE_BF16"}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}
KINDS = ("auto", "gpu", "cpu")
MAX_QUEUE_DELAY_US = 100
LABELS_FILE = "labels.txt"


def config_text(name: str, platform: str, inputs: list[tuple[str, str, list[int]]],
                outputs: list[tuple[str, str, list[int]]], max_batch_size: int, preferred: list[int],
                kind: str = "auto", count: int = 1, labels: bool = False) -> str:
    """config.pbtxt for a model; inputs/outputs are (name, numpy dtype name, dims without batch)."""
    if platform not in PLATFORMS:
        raise BadInput(f"Triton platform {platform!r}: expected {' or '.join(PLATFORMS)}")
    check_instances(kind, count)

    def tensor(t, label):
        n, dtype, dims = t
        if dtype not in TRITON_TYPES:
            raise BadInput(f"tensor {n}: type {dtype} has no Triton data type")
        extra = f' label_filename: "{LABELS_FILE}"' if label else ""
        return f'  {{ name: "{n}" data_type: {TRITON_TYPES[dtype]} dims: [ {", ".join(map(str, dims))} ]{extra} }}'

    platform_name, filename = PLATFORMS[platform]
    batching = (f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] "
                f"max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US} }}")
    lines = [f'name: "{name}"', f'platform: "{platform_name}"', f'default_model_filename: "{filename}"',
             f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(tensor(t, False) for t in inputs), "]",
             "output [", ",\n".join(tensor(t, labels and i == 0) for i, t in enumerate(outputs)), "]",
             batching,
             f"instance_group [ {{ count: {count} kind: KIND_{kind.upper()} }} ]"]
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """The config parsed into Triton's own ModelConfig protobuf (needs tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def model_name(name: str) -> str:
    """A Triton model name: the folder's name, with what a path cannot hold replaced."""
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    if not clean:
        raise BadInput(f"{name!r}: no usable Triton model name", hint="pass --triton-name NAME")
    return clean


def _is_model_folder(path: Path) -> bool:
    """A Triton model folder: its config.pbtxt, or a numbered version folder (Triton
    can derive an ONNX or TensorRT model's config without config.pbtxt)."""
    return path.is_dir() and any(
        e.name == "config.pbtxt" or (e.name.isdigit() and e.is_dir()) for e in os.scandir(path))


def repo_blocker(repo: Path) -> str | None:
    """Why mk may not add a model to `repo`: None for a folder that is empty or holds only
    model folders (a Triton model repository, mk's or not). Hidden entries are skipped:
    mk's own temporaries (`.NAME.tmp-PID`) stand there while a model is put in place."""
    what = describe(repo)
    if what != "a folder":
        return what
    others = sorted(e.name for e in os.scandir(repo) if not e.name.startswith(".") and not _is_model_folder(Path(e.path)))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return f"a folder that is not a Triton model repository ({shown}: not a model folder)"
    return None


def model_blocker(path: Path) -> str | None:
    """`--force` replaces only a model folder as mk writes it: config.pbtxt, labels.txt
    and version 1 holding the model's files."""
    what = describe(path)
    if what != "a folder":
        return what
    version = path / "1"
    model_files = {name for _, name in PLATFORMS.values()} | {f"{PLATFORMS['onnx'][1]}.data"}
    if not (path / "config.pbtxt").is_file() or set(os.listdir(path)) - {"config.pbtxt", LABELS_FILE, "1"} \
            or not version.is_dir() or version.is_symlink() or set(os.listdir(version)) - model_files:
        return "a folder that is not a Triton model folder written by mk"
    return None


def check_instances(kind: str, count: int) -> None:
    if kind not in KINDS:
        raise BadInput(f"--triton-instance-kind {kind!r}: expected one of {', '.join(KINDS)}")
    if count < 1:
        raise BadInput(f"--triton-instances {count}: needs at least 1")


def check_model_dir(repo: Path, name: str, force: bool, inputs=()) -> Path:
    """Refuse, before any work, a model folder REPO/NAME that must not be written: REPO
    must be missing or a model repository; REPO/NAME new, or with --force a model
    folder mk wrote (the other models in REPO are never touched)."""
    why = repo_blocker(Path(repo)) if os.path.lexists(repo) else None
    if why is not None:
        raise BadInput(f"--triton-repo {repo}: is {why}; mk adds models only to a Triton model repository",
                       hint="choose another --triton-repo (a new folder, or one holding only model folders)")
    return check_output(Path(repo) / name, force, inputs=inputs, blocker=model_blocker, flag="--triton-repo")


def check_triton(triton: dict, out: Path, force: bool, inputs=()) -> dict:
    """The --triton-* options checked before any work, so that a bad one costs no export
    and leaves nothing behind; returns them with the model's name settled (default: the
    -o folder's). `out` is not written yet, so the repository is kept apart from it here."""
    check_instances(triton.get("kind", "auto"), triton.get("count", 1))
    name = model_name(triton.get("name") or Path(out).resolve().name)
    model_dir, target = (Path(triton["repo"]) / name).resolve(), Path(out).resolve()
    if model_dir.is_relative_to(target) or target.is_relative_to(model_dir):
        raise BadInput(f"--triton-repo {triton['repo']}: its model folder {name} and -o {out} overlap",
                       hint="keep the Triton repository outside the artifact")
    check_model_dir(Path(triton["repo"]), name, force, inputs)
    return {**triton, "name": name}


def write_repo(repo: Path, name: str, platform: str, files: list[Path], config: str, labels: list[str],
               force: bool = False) -> Path:
    """Write the model folder REPO/NAME atomically (REPO made if missing); returns it."""
    model_dir = check_model_dir(Path(repo), name, force)
    with atomic_output(model_dir, force, blocker=model_blocker) as tmp:
        (tmp / "1").mkdir()
        for f in files:
            shutil.copy2(f, tmp / "1" / f.name)
        (tmp / "config.pbtxt").write_text(config)
        if labels:
            (tmp / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
    return model_dir


def write_onnx_repo(art, triton: dict, force: bool = False) -> Path:
    """An ONNX model artifact as a Triton model (ONNX Runtime backend); tensor types
    from the graph, dynamic batch up to triton["max_batch_size"] (default 32)."""
    from mk.core.compression.onnx_io import EXTERNAL_DATA_NAME, load_onnx, model_inputs
    from mk.core.compression.profiles import DEFAULT_MAX_BATCH, preferred_batch_sizes
    from onnx.helper import tensor_dtype_to_np_dtype

    model = load_onnx(art.path / "model.onnx", load_external_data=False)
    graph, feeds = model.graph, set(model_inputs(model))

    def dtype(value):
        return tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    inputs = [(v.name, dtype(v), [-1] * (len(v.type.tensor_type.shape.dim) - 1))
              for v in graph.input if v.name in feeds]
    outputs = [(v.name, dtype(v), [len(art.labels)] if art.labels else [-1]) for v in graph.output]
    batch = int(triton.get("max_batch_size") or DEFAULT_MAX_BATCH)
    name = model_name(triton.get("name") or art.path.name)
    text = config_text(name, "onnx", inputs, outputs, batch, preferred_batch_sizes({"batch": [1, batch, batch]}),
                       triton.get("kind", "auto"), triton.get("count", 1), labels=bool(art.labels))
    files = [p for p in (art.path / "model.onnx", art.path / EXTERNAL_DATA_NAME) if p.is_file()]
    return write_repo(Path(triton["repo"]), name, "onnx", files, text, art.labels, force)
