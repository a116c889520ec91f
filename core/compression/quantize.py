"""`mk quant`: int8 (dynamic or static QDQ) and fp16 ONNX models, gated on accuracy.

Everything numeric is ONNX Runtime's own tooling (`onnxruntime.quantization`
quantize_dynamic / quantize_static with a CalibrationDataReader, and the
`onnxruntime.transformers` fp16 converter); mk chooses the settings, feeds the
calibration rows from the dataset, and checks the result:

- the parent (fp32 ONNX) and the quantized model are evaluated on the dataset's
  test split through `load_runtime` + `evaluate` (what `mk bench` uses); both
  figures go into `mk.json` metrics, and a drop above `--max-drop` points raises
  GateFailed (exit 3) with the artifact kept;
- size before and after is recorded and reported.

A safetensors model given as input is first exported (with `core.export`, the
same as `mk export-onnx`) to a sibling artifact `<OUT>-onnx` beside the output;
the quantized artifact's `parent` is that export, whose own parent is the torch
model, so `mk info --lineage` shows tuned → export → quant. The sibling is
reused when it was exported from the same model (same parent digest), so Make
and repeated runs do not export twice.

Defaults, chosen by measurement (scripts/bench_quant.py; README "Quantization"):
dynamic int8, weights per channel, the MatMuls with constant weights and the
embedding Gathers (weights only: as fast as MatMul alone, 2.5x smaller), on the
plain export (no transformer fusions first). Per-channel and reduce-range are
chosen for the CPU at hand (`core.cpu.int8_settings`: 7-bit weights where int8
products are summed in saturating 16-bit pairs, i.e. no VNNI) unless given; the
CPU and the choice are recorded in mk.json, since the accuracy measured here is
that CPU's arithmetic.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mk.core.artifact import Artifact, human_bytes, open_artifact, write_manifest
from mk.core.console import log, quiet_onnxruntime
from mk.core.cpu import SATURATING, this_cpu
from mk.core.outputs import artifact_blocker, atomic_output, check_output
from mk.core.errors import BadInput, GateFailed
from mk.core.runtime.adapters import check_whole_model
from mk.core.tokenizer_match import check_same_tokenizer
from mk.core.compression.export import export_onnx
from mk.core.compression.onnx_io import (EXTERNAL_DATA_NAME, check_inputs, copy_tokenizer_files, load_onnx,
                                         onnx_bytes, optimize_transformer, save_onnx, to_fp16)

METHODS = ("dynamic", "static", "fp16")
CALIB_METHODS = ("minmax", "entropy", "percentile")
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
             "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QEmbedLayerNormalization",
             "QGemm", "DynamicQuantizeLSTM", "MatMulNBits"}
DEFAULT_METHOD = "dynamic"
EXPORT_SUFFIX = "-onnx"


@dataclass
class QuantSettings:
    """How to quantize; the defaults are the measured best. per_channel and reduce_range
    left None are chosen for this CPU (`core.cpu.int8_settings`)."""

    method: str = DEFAULT_METHOD
    per_channel: bool | None = None
    reduce_range: bool | None = None
    fuse: bool = False                  # ORT transformer fusions before quantizing
    op_types: list[str] = field(default_factory=lambda: ["MatMul", "Gather"])
    calib_size: int = 256
    calib_method: str = "minmax"
    calib_batch_size: int = 16
    matmul_const_b_only: bool = True    # never quantize activation x activation MatMuls


# --------------------------------------------------------------------------- checks


def quantized_nodes(model) -> list[str]:
    """Op types of quantized (or already converted) nodes in a graph."""
    from onnx import TensorProto

    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS or n.op_type.startswith("QLinear")})
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        ops.append("fp16 weights")
    return ops


def check_not_quantized(art: Artifact, model) -> None:
    record = art.manifest.get("quantization") or art.metrics.get("quantization")
    fp16_export = (art.manifest.get("onnx") or {}).get("fp16")
    found = quantized_nodes(model)
    if record or fp16_export or found:
        why = (f"its mk.json records a {record.get('method', '')} quantization" if isinstance(record, dict)
               else "it was exported in fp16" if fp16_export else f"its graph has {', '.join(found[:4])}")
        raise BadInput(f"{art.path}: the model is already quantized ({why})",
                       hint="quantize the fp32 parent instead (see `mk info --lineage`)")


def open_onnx_model(art: Artifact):
    """Load and validate an ONNX artifact's model.onnx (weights left on disk)."""
    path = art.path / "model.onnx"
    if not path.is_file():
        raise BadInput(f"{art.path}: ONNX artifact without model.onnx")
    model = load_onnx(path, load_external_data=False)
    check_inputs(model, path)
    return model


# --------------------------------------------------------------------------- calibration


# ONNX Runtime's calibrators keep every activation of the rows given to one
# collect_data call before reducing them (16 MB a row for MiniLM at 128 tokens: 256
# rows of `percentile` in one call peaked at 4 GB), and the histogram ones cannot mix
# batches of different sizes in a call. So they are fed one batch per call (the
# CalibStridedMinMax option, which every calibrator honours: min/max and histograms
# merge across calls): memory is bounded by --calib-batch-size, not --calib-size.
class DatasetCalibrationReader:
    """onnxruntime.quantization.CalibrationDataReader over the first `size` rows of a split."""

    def __init__(self, split: dict, input_names: list[str], size: int, batch_size: int = 16):
        rows = {k: v[:size] for k, v in split.items() if k != "labels"}
        if "attention_mask" in rows:  # one width for all batches: histogram calibrators need equal shapes
            width = max(int(rows["attention_mask"].sum(axis=1).max()), 1)
            rows = {k: (v[:, :width] if k != "pixel_values" else v) for k, v in rows.items()}
        n = len(next(iter(rows.values())))
        self._feeds = []
        for i in range(0, n, batch_size):
            feed = {k: (v[i:i + batch_size].astype(np.float32) if k == "pixel_values"
                        else v[i:i + batch_size].astype(np.int64))
                    for k, v in rows.items() if k in input_names}
            if "token_type_ids" in input_names and "token_type_ids" not in feed:
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            self._feeds.append(feed)
        self.rows, self.batch_size = n, batch_size
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def set_range(self, start_index: int, end_index: int):
        """The batches of one collect_data call (ONNX Runtime calls it with CalibStridedMinMax)."""
        self._it = iter(self._feeds[start_index:end_index])

    def rewind(self):
        self._it = iter(self._feeds)

    def __len__(self):
        return len(self._feeds)


# --------------------------------------------------------------------------- the ONNX Runtime calls


def quantize_file(src: Path, dst: Path, settings: QuantSettings, config: dict | None = None,
                  calibration: DatasetCalibrationReader | None = None, work: Path | None = None) -> dict:
    """Quantize one ONNX file with ONNX Runtime's tooling; returns what was done."""
    import contextlib
    import sys

    # the calibrators print their progress on stdout, which carries only mk's result
    with contextlib.redirect_stdout(sys.stderr):
        return _quantize_file(src, dst, settings, config, calibration, work)


def _quantize_file(src, dst, settings, config, calibration, work) -> dict:
    import tempfile

    quiet_onnxruntime()  # the calibrators' sessions log through ONNX Runtime's default logger

    work = Path(work or dst.parent)
    done: dict = {}
    # the tooling logs "consider pre-processing" on the root logger, on every call
    logging.getLogger().setLevel(logging.ERROR)
    if settings.method == "fp16":
        to_fp16(src, dst)
        return {"converter": "onnxruntime.transformers OnnxModel.convert_float_to_float16(keep_io_types=True)"}
    if settings.fuse:
        fused_path = work / "fused.onnx"
        done["fused_operators"] = optimize_transformer(src, fused_path, config or {})
        src = fused_path
    with tempfile.TemporaryDirectory(dir=work, prefix=".source-") as scratch:
        if not settings.fuse:
            src = _linked_into(Path(src), Path(scratch))
        done.update(_run_tooling(src, dst, settings, calibration))
    _single_file(dst)
    return done


def _run_tooling(src: Path, dst: Path, settings: QuantSettings, calibration) -> dict:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    done: dict = {}
    big = (Path(src).parent / EXTERNAL_DATA_NAME).is_file()
    extra = {"MatMulConstBOnly": settings.matmul_const_b_only,
             # fused contrib ops (SkipLayerNormalization, …) have no ONNX type inference
             "DefaultTensorType": onnx.TensorProto.FLOAT}
    if settings.method == "dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=settings.per_channel,
                         reduce_range=settings.reduce_range, op_types_to_quantize=settings.op_types or None,
                         use_external_data_format=big, extra_options=extra)
        done.update(weight_type="int8", activations="uint8, scale per batch at run time")
    elif settings.method == "static":
        if calibration is None or not len(calibration):
            raise BadInput("static quantization needs calibration rows", hint="pass --data DATASET")
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[settings.calib_method]
        quantize_static(str(src), str(dst), calibration, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=settings.op_types or None, per_channel=settings.per_channel,
                        reduce_range=settings.reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method, use_external_data_format=big,
                        extra_options={**extra, "CalibTensorRangeSymmetric": False,
                                       "CalibStridedMinMax": 1})
        done.update(weight_type="int8", activation_type="uint8", format="QDQ",
                    calibration={"method": settings.calib_method, "rows": settings.calib_size,
                                 "batches": len(calibration), "rows_per_call": calibration.batch_size})
    else:
        raise BadInput(f"--method {settings.method!r}: expected one of {', '.join(METHODS)}")
    return done


def _linked_into(src: Path, work: Path) -> Path:
    """`src` (and its external weights) linked into the scratch folder `work`: ONNX
    Runtime's tooling writes a shape-inferred copy beside the model it reads
    (`model-inferred.onnx`) and deletes it after, which must never happen inside the
    input artifact (read-only, or a file of that name there). Copied where links
    cannot be made."""
    import shutil

    for name in (src.name, EXTERNAL_DATA_NAME):
        if (src.parent / name).is_file():
            try:
                (work / name).symlink_to((src.parent / name).resolve())
            except OSError:
                shutil.copyfile(src.parent / name, work / name)
    return work / src.name


def _single_file(path: Path) -> None:
    """Whatever files the tooling wrote beside `path` (external weights under its own
    names) become model.onnx alone, or model.onnx + model.onnx.data past 2 GB."""
    import onnx

    path = Path(path)
    others = [p for p in path.parent.iterdir() if p != path]
    if not others:
        return
    model = onnx.load(str(path))
    for p in others:
        p.unlink()
    save_onnx(model, path)


# --------------------------------------------------------------------------- the command


def _other_settings(settings: QuantSettings) -> str:
    """What to try after a failed gate: only settings that differ from the ones just used."""
    tries = []
    if settings.method == "dynamic":
        tries.append("--method static with --calib-method entropy")
    elif settings.method == "static" and settings.calib_method != "entropy":
        tries.append("--calib-method entropy")
    if settings.method != "fp16" and settings.per_channel is False:
        tries.append("--per-channel")
    if settings.method != "fp16" and settings.reduce_range is False and this_cpu().int8_path == SATURATING:
        tries.append("--reduce-range (this CPU has no VNNI)")
    if settings.method != "fp16" and "Gather" in settings.op_types:
        tries.append("--op-types MatMul (embeddings stay fp32)")
    if settings.method != "fp16":
        tries.append("--method fp16")
    return ", ".join(tries) + (", or " if tries else "") + "a larger --max-drop"


def settings_for_this_cpu(settings: QuantSettings) -> dict:
    """Fill the int8 choices left open with the ones for this CPU; returns the record
    for mk.json (the CPU, what it calls for, what was given explicitly)."""
    from mk.core.cpu import int8_settings, settings_note

    cpu = this_cpu()
    chosen = int8_settings(cpu.flags, settings.method)
    given = {k: getattr(settings, k) for k in ("per_channel", "reduce_range") if getattr(settings, k) is not None}
    for key in ("per_channel", "reduce_range"):
        if getattr(settings, key) is None:
            setattr(settings, key, chosen.get(key, key == "per_channel"))
    note = settings_note(cpu.flags, settings.method)
    if note and any(k not in given for k in chosen if k != "weight_type"):
        log.info("%s: %s", cpu.model, note)
    return {"cpu": cpu.record(), "chosen_for_cpu": chosen, "given": given}


def prepare_onnx_parent(art: Artifact, out: Path, data, force: bool, trust_pickle: bool,
                        command: str = "mk quant") -> tuple[Artifact, bool]:
    """The fp32 ONNX parent: the input itself, or its export in the sibling `<out>-onnx`
    (reused when it was exported from the same model)."""
    if art.format == "onnx":
        return art, False
    if art.format != "safetensors":
        raise BadInput(f"{art.path}: a {art.format} model cannot be quantized; give the ONNX or safetensors model")
    check_whole_model(art.path, command)
    sibling = out.parent / f"{out.name}{EXPORT_SUFFIX}"
    if sibling.exists():
        try:
            prev = open_artifact(sibling, kind="model")
            same = (prev.format == "onnx" and (prev.manifest.get("parent") or {}).get("sha256") == art.digest()
                    and not (prev.manifest.get("onnx") or {}).get("fp16"))
        except BadInput:
            same = False
        if same:
            log.info("reusing the export %s of %s", sibling, art.path)
            return prev, False
        why = artifact_blocker(sibling)
        if not force or why is not None:
            raise BadInput(f"{sibling}: already exists and is not an fp32 export of {art.path}",
                           hint="pass --force to export again, or choose another -o" if why is None else
                           f"it is {why}, which --force does not replace; choose another -o")
    log.info("exporting %s to ONNX first: %s", art.path, sibling)
    export_onnx(art.path, sibling, data=data, force=True, trust_pickle=trust_pickle,
                step_of=f"{command}: a safetensors input is exported first (the export-onnx step)")
    return open_artifact(sibling, kind="model"), True


def quantize(model: str | Path, out: str | Path, method: str = DEFAULT_METHOD, data: str | Path | None = None,
             max_drop: float = 1.0, settings: QuantSettings | None = None, gate: bool = True,
             threads: int | None = None, batch_size: int = 32, force: bool = False,
             trust_pickle: bool = False, confidence: float = 0.95, gate_test: str = "paired",
             device: str = "cpu") -> dict:
    """Quantize a model artifact into `out`; evaluate parent and result on `device`;
    return a result dict.

    Raises BadInput (nothing written) for bad input and GateFailed (artifact kept) when
    accuracy dropped by more than `max_drop` points: with `confidence` on the paired
    answers (`gate_test` "paired", core.gate), or as observed ("point")."""
    settings = settings or QuantSettings(method=method)
    settings.method = method
    for_cpu = _check_options(settings, max_drop, confidence, gate_test)
    device = _evaluation_device(device) if gate else "cpu"
    art = open_artifact(model, kind="model", trust_pickle=trust_pickle)
    out = check_output(Path(out), force, inputs=[art.path, data])
    # ---- validate everything before anything is written
    _check_quantizable(art)
    ds, test = _dataset(art, data, method, gate)
    parent, exported = prepare_onnx_parent(art, out, ds.path if ds else data, force, trust_pickle)
    input_names = _check_op_types(parent, settings)
    calibration = _calibration(ds, input_names, settings) if method == "static" else None

    with atomic_output(out, force) as tmp:
        done = _write_quantized(tmp, parent, settings, calibration)
        size_before, size_after = onnx_bytes(parent.path), onnx_bytes(tmp)
        record = {**{k: v for k, v in asdict(settings).items()
                     if method == "static" or not k.startswith("calib")}, **done,
                  "onnxruntime": _ort_version(), "exported_first": exported, **for_cpu}
        if method == "fp16":
            record = {"method": "fp16", **done, "onnxruntime": _ort_version(), "exported_first": exported}
        metrics = {"size_bytes": size_after, "parent_size_bytes": size_before}
        if gate:
            quant_art = Artifact(tmp, {"kind": "model", "format": "onnx", "task": art.task, "labels": art.labels})
            verdict = _judge(parent, quant_art, test, len(art.labels) or len(ds.labels), (device, threads),
                             batch_size, max_drop, confidence, gate_test, metrics)
        write_manifest(tmp, kind="model", format="onnx", task=art.task, labels=art.labels, parent=parent,
                       dataset=ds, metrics=metrics, quantization=record,
                       size={"parent_bytes": size_before, "bytes": size_after})

    result = {"path": str(out), "method": method, "parent": str(parent.path), "exported_first": exported,
              "size_bytes": size_after, "parent_size_bytes": size_before,
              "size_ratio": round(size_after / max(size_before, 1), 4), "metrics": metrics, "quantization": record}
    log.info("quantized %s (%s): %s → %s (%.0f%%)", out, method, human_bytes(size_before), human_bytes(size_after),
             100 * size_after / max(size_before, 1))
    if gate:
        _enforce(verdict, out, result, settings, max_drop, confidence, gate_test)
    return result


def _check_options(settings: QuantSettings, max_drop: float, confidence: float, gate_test: str) -> dict:
    """Every option checked before anything is read; the settings chosen for this CPU."""
    if settings.method not in METHODS:
        raise BadInput(f"--method {settings.method!r}: expected one of {', '.join(METHODS)}")
    for_cpu = settings_for_this_cpu(settings)
    if settings.calib_method not in CALIB_METHODS:
        raise BadInput(f"--calib-method {settings.calib_method!r}: expected one of {', '.join(CALIB_METHODS)}")
    if settings.calib_size < 1:
        raise BadInput(f"--calib-size {settings.calib_size}: needs at least one row")
    if max_drop < 0:
        raise BadInput(f"--max-drop {max_drop}: a drop allowance cannot be negative (points of accuracy)")
    check_gate_options(confidence, gate_test)
    return for_cpu


def _evaluation_device(device: str) -> str:
    """`--device` resolved, and its ONNX Runtime provider present, before any work: the
    gate evaluates where the model will run (an fp16 model on the GPU, say)."""
    from mk.core.device import resolve_device
    from mk.core.runtime.onnx_runtime import providers_for

    device = resolve_device(device)
    providers_for(device)
    return device


def _check_quantizable(art: Artifact) -> None:
    if art.format == "onnx":
        check_not_quantized(art, open_onnx_model(art))
    elif art.format == "safetensors":
        if art.manifest.get("quantization"):
            check_not_quantized(art, _empty_graph())
    else:
        raise BadInput(f"{art.path}: a {art.format} model cannot be quantized; give the ONNX or safetensors model")


def _dataset(art: Artifact, data, method: str, gate: bool):
    """The dataset to calibrate and gate on (None when neither is asked for), and its
    test split when the gate needs it."""
    from mk.core.dataset import check_labels, dataset_for, load_split

    if not (gate or method == "static"):
        return None, None
    try:
        ds = dataset_for(art, data)
    except BadInput as e:
        if method == "static":
            raise BadInput(f"{e.message}; static quantization calibrates on it",
                           hint="pass --data DATASET (made by `mk prep`)") from None
        raise BadInput(f"{e.message}; the accuracy gate evaluates on its test split",
                       hint="pass --data DATASET, or --no-gate to skip the check") from None
    if art.task == "text-classification":
        check_same_tokenizer(ds, art.path)
    if gate:
        check_labels(art, ds, hint="gate on a dataset prepared with the model's labels, or pass --no-gate")
    test = load_split(ds, "test") if gate else None
    return ds, test


def _check_op_types(parent: Artifact, settings: QuantSettings) -> list[str]:
    """The parent graph's inputs; --op-types that match nothing in it are refused."""
    parent_model = open_onnx_model(parent)
    input_names = check_inputs(parent_model, parent.path / "model.onnx")
    if settings.method != "fp16" and settings.op_types and not settings.fuse:
        present = {n.op_type for n in parent_model.graph.node}
        if not present & set(settings.op_types):
            raise BadInput(f"--op-types {','.join(settings.op_types)}: no such operator in {parent.path}/model.onnx, "
                           "so nothing would be quantized",
                           hint=f"its graph has {', '.join(sorted(present & {'MatMul', 'Gemm', 'Gather', 'Conv', 'Attention'}) or sorted(present)[:8])}")
        for op in sorted(set(settings.op_types) - present):
            log.warning("--op-types %s: no such operator in %s/model.onnx", op, parent.path)
    return input_names


def _calibration(ds: Artifact, input_names: list[str], settings: QuantSettings) -> DatasetCalibrationReader:
    """The calibration rows of static quantization, capped at what the split holds (said)."""
    from mk.core.dataset import load_split

    split = next(s for s in ("train", "val", "test") if (ds.path / f"{s}.safetensors").is_file())
    calibration = DatasetCalibrationReader(load_split(ds, split, limit=settings.calib_size), input_names,
                                           settings.calib_size, settings.calib_batch_size)
    if calibration.rows < settings.calib_size:
        log.warning("--calib-size %d: the %s split holds %d rows; calibrating on those",
                    settings.calib_size, split, calibration.rows)
    settings.calib_size = calibration.rows
    return calibration


def _write_quantized(tmp: Path, parent: Artifact, settings: QuantSettings, calibration) -> dict:
    """The quantized model.onnx and the tokenizer files in `tmp`; what was done."""
    import shutil

    work, qdir = tmp / ".work", tmp / ".quant"
    work.mkdir()
    qdir.mkdir()
    done = quantize_file(parent.path / "model.onnx", qdir / "model.onnx", settings, parent.config(), calibration,
                         work)
    for p in qdir.iterdir():
        p.rename(tmp / p.name)
    qdir.rmdir()
    shutil.rmtree(work)
    copy_tokenizer_files(parent.path, tmp)
    load_onnx(tmp / "model.onnx", load_external_data=False)
    return done


def _enforce(verdict, out: Path, result: dict, settings: QuantSettings, max_drop: float, confidence: float,
             gate_test: str) -> None:
    """The gate's line on stderr; GateFailed (exit 3, artifact kept) when it failed."""
    from mk.core.gate import describe

    log.info("%s", describe(verdict))
    if verdict.warning:
        log.warning("%s", verdict.warning)
    if verdict.failed:
        how = (f"all of its {confidence:.0%} interval [{verdict.interval_points[0]:.2f}, "
               f"{verdict.interval_points[1]:.2f}] is" if gate_test == "paired" else "that is")
        raise GateFailed(f"{out}: accuracy dropped {verdict.drop_points:.2f} points "
                         f"({100 * verdict.parent_accuracy:.2f}% → {100 * verdict.accuracy:.2f}%); {how} "
                         f"more than --max-drop {max_drop:g}", path=out, result=result,
                         hint="the artifact was kept for inspection (mk.json: metrics.gate); try "
                              + _other_settings(settings))


def check_gate_options(confidence: float, gate_test: str) -> None:
    from mk.core.gate import TESTS

    if gate_test not in TESTS:
        raise BadInput(f"--gate-test {gate_test!r}: expected one of {', '.join(TESTS)}")
    if not 0.5 <= confidence < 1:
        raise BadInput(f"--confidence {confidence:g}: expected a probability from 0.5 up to (not including) 1",
                       hint="0.95 is usual")


def _judge(parent: Artifact, child: Artifact, test: dict, n_labels: int, where: tuple, batch_size: int,
           max_drop: float, confidence: float, gate_test: str, metrics: dict):
    """Evaluate parent and child on the test split, on `where` = (device, threads); fill
    `metrics`; return the gate's verdict."""
    from mk.core.evaluation import classification_metrics, predict
    from mk.core.gate import judge
    from mk.core.runtime import load_runtime

    answers, scores = [], []
    for art, what in ((parent, "evaluating the parent"), (child, "evaluating the quantized model")):
        preds = predict(load_runtime(art, *where), test, batch_size, what).argmax(-1)
        answers.append(preds == test["labels"])
        scores.append(classification_metrics(preds, test["labels"], n_labels))
    before, after = scores
    verdict = judge(answers[0], answers[1], max_drop, confidence, gate_test)
    metrics.update(accuracy=after["accuracy"], macro_f1=after["macro_f1"], parent_accuracy=before["accuracy"],
                   parent_macro_f1=before["macro_f1"], accuracy_drop_points=verdict.drop_points,
                   test_rows=after["n"], max_drop_points=max_drop, gate=verdict.record(), evaluated_on=where[0])
    return verdict


def _empty_graph():
    import onnx

    return onnx.ModelProto()


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
