"""`mk export-trt`: an ONNX model artifact to a TensorRT engine, verified against ONNX Runtime.

The build follows TensorRT's documented Python API (10.x and 11.x): the ONNX
parser fills a network (explicit batch: the only mode since 10.0), one
optimization profile per input from `profiles.derive` (the dataset's token
lengths), the workspace pool limit, a timing cache read from and written back to
`--timing-cache`, `builder_optimization_level`, then `build_serialized_network`.

Precision. TensorRT 10 takes weak-typing flags (BuilderFlag.FP16 / BF16) and
lets the builder pick kernels; TensorRT 11 removed them and builds strongly typed
networks only, whose precision is the ONNX graph's. So `--fp16` sets the flag
where it exists and otherwise builds from an fp16 copy of the graph made with ONNX
Runtime's converter (the one `mk export-onnx --fp16` uses; inputs and outputs stay
fp32). `--bf16` needs the flag (TensorRT 10). `--int8` is explicit quantization
only: a QDQ model (`mk quant --method static`) built strongly typed where the flag
exists, with TensorRT's constraints on Q/DQ checked first (signed int8, zero
point 0), since the implicit calibrator is deprecated in 10 and gone in 11.

The engine then runs beside ONNX Runtime (CPU) on the dataset's test rows: the
largest logit difference (`--atol`) and the accuracy drop (`--max-drop`, judged
by core.gate as for mk quant) go into mk.json; a failed gate is exit 3
with the artifact kept. mk.json also records the TensorRT version, the GPU and its
compute capability, which the runtime checks before loading.

None of this has run in this project's CI (no TensorRT libraries there):
docs/gpu-results.md says what has been run where.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from mk.core.artifact import Artifact, human_bytes, open_artifact, write_manifest
from mk.core.compression import profiles
from mk.core.compression.onnx_io import copy_tokenizer_files, load_onnx, model_inputs, to_fp16
from mk.core.console import log
from mk.core.errors import BadInput, GateFailed, MkError
from mk.core.outputs import atomic_output, check_output

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_ATOL = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 1e-1, "int8": 2e-1}
MAX_OPT_LEVEL = 5


def check_options(precision: str, workspace: float | None, opt_level: int | None, atol: float | None,
                  max_drop: float) -> float:
    """Every option checked before anything loads; the tolerance to verify with."""
    if precision not in PRECISIONS:
        raise BadInput(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    problems = []
    if workspace is not None and workspace <= 0:
        problems.append(f"--workspace {workspace:g}: expected GiB above 0")
    if opt_level is not None and not 0 <= opt_level <= MAX_OPT_LEVEL:
        problems.append(f"--builder-optimization-level {opt_level}: expected 0 to {MAX_OPT_LEVEL}")
    if atol is not None and atol < 0:
        problems.append(f"--atol {atol:g}: a tolerance cannot be negative")
    if max_drop < 0:
        problems.append(f"--max-drop {max_drop:g}: a drop allowance cannot be negative")
    if problems:
        raise BadInput("; ".join(problems))
    return DEFAULT_ATOL[precision] if atol is None else atol


def qdq_problems(model) -> list[str]:
    """Why TensorRT would refuse this graph's Q/DQ nodes: TensorRT quantizes to signed
    int8 with zero point 0 (symmetric); empty when it has Q/DQ nodes that fit."""
    from onnx import TensorProto, numpy_helper

    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not nodes:
        return ["it has no QuantizeLinear/DequantizeLinear nodes (not an explicitly quantized model)"]
    inits = {t.name: t for t in model.graph.initializer}
    unsigned, nonzero = set(), set()
    for n in nodes:
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            continue
        if zp.data_type == TensorProto.UINT8:
            unsigned.add(n.name or n.output[0])
        elif np.any(numpy_helper.to_array(zp) != 0):
            nonzero.add(n.name or n.output[0])
    problems = []
    if unsigned:
        problems.append(f"{len(unsigned)} Q/DQ nodes quantize to uint8 (TensorRT quantizes to signed int8)")
    if nonzero:
        problems.append(f"{len(nonzero)} Q/DQ nodes have a non-zero zero point (TensorRT needs symmetric)")
    return problems


def check_int8_parent(art: Artifact) -> None:
    if art.format != "onnx":
        raise BadInput(f"{art.path}: --int8 builds from an explicitly quantized (QDQ) ONNX model, "
                       f"not a {art.format} one", hint="make one with `mk quant --method static`")
    problems = qdq_problems(load_onnx(art.path / "model.onnx", load_external_data=False))
    if problems:
        raise BadInput(f"{art.path}: TensorRT cannot build int8 from it: {'; '.join(problems)}",
                       hint="TensorRT takes symmetric signed-int8 Q/DQ (e.g. from NVIDIA ModelOpt); "
                            "mk quant's static QDQ targets ONNX Runtime's uint8 CPU kernels")


def _cuda_device(device: str) -> str:
    import torch
    from mk.core.device import resolve_device

    if device == "cpu":
        raise BadInput("--device cpu: a TensorRT engine is built for, and runs on, a CUDA GPU")
    if not torch.cuda.is_available():
        raise BadInput("TensorRT builds for a CUDA GPU and torch sees none here",
                       hint="run `mk doctor` to see what this machine has; build on the GPU it will serve on")
    return resolve_device("cuda" if device == "auto" else device)


# --------------------------------------------------------------------------- the build


def _parse(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    # parse_from_file finds external data (model.onnx.data) beside the file
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BadInput(f"{onnx_path}: TensorRT's ONNX parser refused it ({'; '.join(errors[:3]) or 'no detail'})",
                       hint="see `mk export-onnx --opset` and TensorRT's supported operators")
    return parser


def build_engine(trt, onnx_path: Path, shapes: dict, precision: str, workspace: float | None,
                 timing_cache: Path | None, opt_level: int | None) -> tuple[bytes, dict]:
    """A serialized engine for `onnx_path` with one profile ({input: [min, opt, max]});
    returns it and what was done."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 10: weak typing; 11: strongly typed only
    strongly_typed = precision == "int8" or not weak
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = _parse(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    if precision in ("fp16", "bf16") and weak:
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace * (1 << 30)))
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file()
                                       else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for name in names:
        if name not in shapes:
            raise BadInput(f"{onnx_path}: input {name!r} has no shape profile (mk profiles {', '.join(shapes)})")
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)
    tensors = [network.get_input(i) for i in range(network.num_inputs)] + \
        [network.get_output(i) for i in range(network.num_outputs)]
    io = {t.name: np.dtype(trt.nptype(t.dtype)).name for t in tensors}
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MkError(f"{onnx_path}: TensorRT failed to build an engine (its log above says why)",
                      hint="try a larger --workspace, or another precision")
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    del parser
    return bytes(serialized), {"io": io, "strongly_typed": strongly_typed, "weak_typing_flag": precision in ("fp16", "bf16")
                               and weak, "build_seconds": round(time.perf_counter() - start, 2)}


def _build_from(trt, parent: Artifact, tmp: Path, shapes: dict, precision: str, workspace, cache, opt_level):
    """build_engine on the parent's graph, or on an fp16 copy of it (in `tmp`, removed
    after) where TensorRT has no FP16 flag (11.x: strongly typed only)."""
    import shutil

    source = parent.path / "model.onnx"
    if precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
        (tmp / ".fp16").mkdir()
        to_fp16(source, tmp / ".fp16" / "model.onnx")
        source = tmp / ".fp16" / "model.onnx"
    try:
        return build_engine(trt, source, shapes, precision, workspace, cache, opt_level)
    finally:
        shutil.rmtree(tmp / ".fp16", ignore_errors=True)


# --------------------------------------------------------------------------- verification


def compare(reference, engine, split: dict, sequence: list[int], batch_size: int) -> dict:
    """Both runtimes on the same rows, each batch fitted to the profile's sequence
    bounds: the largest |logit difference| and each one's answers."""
    worst, ref_preds, got_preds = 0.0, [], []
    n = len(split["labels"])
    for i in range(0, n, batch_size):
        batch = profiles.fit_batch({k: v[i:i + batch_size] for k, v in split.items() if k != "labels"}, sequence)
        ref, got = reference(batch), engine(batch)
        worst = max(worst, float(np.max(np.abs(ref - got))) if ref.size else 0.0)
        ref_preds.append(ref.argmax(-1))
        got_preds.append(got.argmax(-1))
    longer = int(np.sum(split["attention_mask"].sum(axis=1) > sequence[2])) if "attention_mask" in split else 0
    return {"max_abs_diff": worst, "reference": np.concatenate(ref_preds), "engine": np.concatenate(got_preds),
            "rows_cut_to_max_seq": longer}


def verify(parent: Artifact, engine_art: Artifact, test: dict, profile: dict, device: str, atol: float,
           max_drop: float, confidence: float, gate_test: str) -> tuple[dict, bool]:
    """The engine against ONNX Runtime on the test rows; the record for mk.json and
    whether it passed."""
    from mk.core.gate import judge
    from mk.core.runtime import load_runtime

    batch_size = min(profile["batch"][2], 32)
    check = compare(load_runtime(parent, "cpu"), load_runtime(engine_art, device), test, profile["sequence"],
                    batch_size)
    labels = test["labels"]
    verdict = judge(check["reference"] == labels, check["engine"] == labels, max_drop, confidence, gate_test)
    record = {"reference": "onnxruntime (CPU) on the ONNX parent", "rows": len(labels),
              "max_abs_diff": check["max_abs_diff"], "atol": atol,
              "prediction_agreement": float(np.mean(check["reference"] == check["engine"])),
              "rows_cut_to_max_seq": check["rows_cut_to_max_seq"], "gate": verdict.record()}
    passed = check["max_abs_diff"] <= atol and not verdict.failed
    record["passed"] = passed
    return record, passed


# --------------------------------------------------------------------------- the command


def export_trt(model: str | Path, out: str | Path, data: str | Path | None = None, precision: str = "fp32",
               workspace: float | None = None, timing_cache: str | Path | None = None,
               opt_level: int | None = None, max_batch_size: int = profiles.DEFAULT_MAX_BATCH,
               batch: tuple = (None, None, None), seq: tuple = (None, None, None),
               percentile: float = profiles.DEFAULT_PERCENTILE, atol: float | None = None,
               max_drop: float = 1.0, confidence: float = 0.95, gate_test: str = "paired",
               device: str = "cuda", force: bool = False, trust_pickle: bool = False,
               triton: dict | None = None) -> dict:
    """Build a TensorRT engine artifact at `out` from an ONNX (or safetensors) model
    artifact; verify it; return a result dict. `triton` ({"repo", "kind", "count"})
    also writes a Triton model repository. GateFailed (artifact kept) past --atol
    or --max-drop."""
    from mk.core.compression.quantize import check_gate_options, prepare_onnx_parent
    from mk.core.dataset import dataset_for, load_split
    from mk.core.runtime.tensorrt_runtime import import_tensorrt, machine

    atol = check_options(precision, workspace, opt_level, atol, max_drop)
    check_gate_options(confidence, gate_test)
    art = open_artifact(model, kind="model", trust_pickle=trust_pickle)
    out = check_output(Path(out), force, inputs=[art.path, data])
    if triton:
        from mk.core.compression.triton import check_triton
        triton = check_triton(triton, out, force, inputs=[art.path, data])
    if art.format not in ("onnx", "safetensors"):
        raise BadInput(f"{art.path}: a {art.format} model cannot be built into an engine; give its ONNX parent")
    if art.task != "text-classification":
        raise BadInput(f"{art.path}: export-trt builds text classifiers; this is a {art.task} model")
    if precision == "int8":
        check_int8_parent(art)
    ds = dataset_for(art, data)
    config = art.config()
    profile = profiles.derive(profiles.token_lengths(load_split(ds, "train")), max_batch_size, percentile,
                              config.get("max_position_embeddings"), batch, seq)
    test = load_split(ds, "test")
    trt = import_tensorrt()
    device = _cuda_device(device)
    here = machine(trt, device)
    cache = Path(timing_cache) if timing_cache else None

    parent, exported = prepare_onnx_parent(art, out, ds.path, force, trust_pickle, "mk export-trt")
    names = model_inputs(load_onnx(parent.path / "model.onnx", load_external_data=False))
    shapes = profiles.input_shapes(profile, names)
    with atomic_output(out, force) as tmp:
        plan, done = _build_from(trt, parent, tmp, shapes, precision, workspace, cache, opt_level)
        (tmp / "model.plan").write_bytes(plan)
        copy_tokenizer_files(parent.path, tmp)
        record = {**here, "precision": precision, **done, "profile": {**profile, "inputs": shapes},
                  "workspace_gib": workspace, "builder_optimization_level": opt_level,
                  "timing_cache": str(cache) if cache else None}
        engine_art = Artifact(tmp, {"kind": "model", "format": "tensorrt", "task": art.task,
                                    "labels": art.labels, "tensorrt": record})
        check, passed = verify(parent, engine_art, test, profile, device, atol, max_drop, confidence, gate_test)
        metrics = {"max_abs_logit_diff": check["max_abs_diff"], "accuracy": check["gate"]["accuracy"],
                   "parent_accuracy": check["gate"]["parent_accuracy"],
                   "accuracy_drop_points": check["gate"]["drop_points"]}
        write_manifest(tmp, kind="model", format="tensorrt", task=art.task, labels=art.labels, parent=parent,
                       dataset=ds, metrics=metrics, tensorrt={**record, "verification": check},
                       size={"parent_bytes": (parent.path / "model.onnx").stat().st_size, "bytes": len(plan)})
    result = {"path": str(out), "precision": precision, "exported_first": exported, "tensorrt": record,
              "verification": check, "size_bytes": len(plan)}
    log.info("built %s (%s, TensorRT %s on %s, %s): max |logit difference| %.2e against ONNX Runtime",
             out, precision, here["version"], here["gpu"], human_bytes(len(plan)), check["max_abs_diff"])
    if not passed:
        raise GateFailed(f"{out}: the engine differs from ONNX Runtime beyond the gate (max |logit difference| "
                         f"{check['max_abs_diff']:.3g} against --atol {atol:g}; accuracy drop "
                         f"{check['gate']['drop_points']:.2f} points against --max-drop {max_drop:g})",
                         path=out, result=result, hint="the artifact was kept; see tensorrt.verification "
                                                       "in its mk.json")
    if triton:
        result["triton_repo"] = str(write_plan_repo(open_artifact(out), triton, force))
    return result


def write_plan_repo(art: Artifact, triton: dict, force: bool) -> Path:
    """The engine as a Triton model (TensorRT backend): tensors and types from the engine."""
    from mk.core.compression.triton import config_text, model_name, write_repo

    record = art.manifest["tensorrt"]
    profile = record["profile"]
    name = model_name(triton.get("name") or art.path.name)
    inputs = [(n, t, [-1]) for n, t in record["io"].items() if n in profile["inputs"]]
    outputs = [(n, t, [len(art.labels)]) for n, t in record["io"].items() if n not in profile["inputs"]]
    text = config_text(name, "plan", inputs, outputs, profile["batch"][2],
                       profiles.preferred_batch_sizes(profile), triton.get("kind", "gpu"),
                       triton.get("count", 1), labels=bool(art.labels))
    return write_repo(Path(triton["repo"]), name, "plan", [art.path / "model.plan"], text, art.labels, force)
