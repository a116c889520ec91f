"""`mk export-onnx`: a torch classifier to an ONNX model artifact, verified on real inputs.

The export has dynamic batch and sequence axes (opset 17 or newer), carries the
tokenizer files and `config.json` beside `model.onnx`, and records its parent.
It is then run side by side with the torch model on rows of the dataset (the one
in the lineage, or `--data`; tokenized sample sentences when there is none) at
several batch and sequence shapes, and the largest logit difference is reported;
above `--atol` the artifact is kept and a `GateFailed` (exit 3) is raised.

Which exporter (measured with torch 2.13, transformers 5.23, onnxruntime 1.32):
both `torch.onnx.export(dynamo=True, dynamic_shapes=…)` and the TorchScript
exporter (`dynamo=False`) export BERT-like models correctly (max logit
difference ~5e-8), but only the TorchScript graph of the *eager* attention is
recognised by ONNX Runtime's transformer fusions (Attention,
EmbedLayerNormalization) and its session-time MatMul fusions. On all-MiniLM-L6-v2
at batch 32 x 128 on 2 cores: ORT fp32 400 ms (TorchScript, eager attention)
against 565 ms (dynamo, SDPA); int8 dynamic 184 ms against 336 ms. So `auto`
uses the TorchScript exporter on the model loaded with eager attention and falls
back to dynamo when that fails for a model; `--exporter` forces either.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mk.core.artifact import Artifact, human_bytes, open_artifact, write_manifest
from mk.core.console import log
from mk.core.device import resolve_device
from mk.core.errors import BadInput, GateFailed, MkError, first_line, library_error
from mk.core.outputs import atomic_output, check_output
from mk.core.compression.onnx_io import (EXTERNAL_DATA_NAME, check_inputs, copy_tokenizer_files, load_onnx,
                                         model_inputs, onnx_bytes, opset_of, optimize_transformer, save_onnx, to_fp16)
from mk.core.runtime.adapters import check_whole_model
from mk.core.tokenizer_match import check_same_tokenizer

MIN_OPSET = 17
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SAMPLE_SENTENCES = [
    "The self-driving car stopped smoothly at the crossing.",
    "I would never trust a car without a steering wheel!",
    "Autonomous vehicles are being tested downtown this week, according to the city council.",
    "meh",
    "Google's driverless cars have now covered more than a million miles without a serious accident, "
    "which is more than most human drivers can say over a lifetime of commuting.",
    "Not sure how I feel about robot taxis.",
    "Great news for people who cannot drive themselves.",
    "The sensor failed in the rain again.",
]


# --------------------------------------------------------------------------- inputs


def verification_batches(model_art: Artifact, data: Artifact | None, task: str, config: dict,
                         batch_sizes=(1, 8, 32), max_rows: int = 64) -> tuple[list[dict], str]:
    """Real inputs at several (batch, sequence) shapes: rows of the dataset's test split
    cut to their longest real token and padded to the dataset's full length, or
    tokenized sample sentences when there is no dataset."""
    if task == "image-classification":
        return _image_batches(model_art, data, config, batch_sizes)
    if data is not None:
        from mk.core.dataset import load_split

        split_name = next((s for s in ("test", "val", "train") if (data.path / f"{s}.safetensors").is_file()),
                          None)
        if split_name is None:
            raise BadInput(f"{data.path}: the dataset has no split to verify on")
        split = load_split(data, split_name, limit=max_rows)
        if "input_ids" not in split:
            raise BadInput(f"{data.path}: an image dataset cannot verify a text model")
        source = f"{data.path} ({split_name} split)"
        arrays = {k: v for k, v in split.items() if k in TEXT_INPUTS}
    else:
        tok_dir = model_art.path
        import transformers

        transformers.logging.set_verbosity_error()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as e:
            raise BadInput(f"{tok_dir}: no dataset to verify on and no usable tokenizer ({first_line(e)})",
                           hint="pass --data DATASET") from None
        sentences = (SAMPLE_SENTENCES * (max_rows // len(SAMPLE_SENTENCES) + 1))[:max(batch_sizes)]
        enc = tok(sentences, padding="max_length", truncation=True, return_tensors="np",
                  max_length=min(64, config.get("max_position_embeddings") or 64))
        arrays = {k: np.asarray(v) for k, v in enc.items() if k in TEXT_INPUTS}
        source = "tokenized sample sentences (no dataset)"
    n = len(arrays["input_ids"])
    mask = arrays.get("attention_mask")
    out = []
    for b in sorted({min(b, n) for b in batch_sizes}):
        rows = {k: v[:b] for k, v in arrays.items()}
        full = rows["input_ids"].shape[1]
        width = int(mask[:b].sum(axis=1).max()) if mask is not None else full
        for w in sorted({max(width, 1), full}):
            out.append({k: np.ascontiguousarray(v[:, :w]) for k, v in rows.items()})
    return out, source


def _image_batches(model_art, data, config, batch_sizes):
    if data is not None:
        from mk.core.dataset import load_split

        split = load_split(data, "test", limit=max(batch_sizes))
        if "pixel_values" not in split:
            raise BadInput(f"{data.path}: a text dataset cannot verify an image model")
        pix, source = split["pixel_values"], f"{data.path} (test split)"
    else:
        size = config.get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        pix = np.random.default_rng(0).standard_normal((max(batch_sizes), config.get("num_channels", 3), size, size),
                                                       dtype=np.float32)
        source = "random images (no dataset)"
    return [{"pixel_values": pix[:min(b, len(pix))]} for b in sorted(set(batch_sizes))], source


# --------------------------------------------------------------------------- torch side


def _load_for_export(art: Artifact, trust_pickle: bool = False):
    """The torch classifier in fp32 on the CPU, with eager attention where the
    architecture has it (the graph ONNX Runtime's fusions recognise)."""
    import transformers
    from safetensors import SafetensorError

    from mk.core.runtime.torch_runtime import load_classifier

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    auto = (transformers.AutoModelForImageClassification if art.task == "image-classification"
            else transformers.AutoModelForSequenceClassification)
    try:
        model = auto.from_pretrained(str(art.path), local_files_only=True, trust_remote_code=False,
                                     attn_implementation="eager", use_safetensors=not trust_pickle or None)
    except (ValueError, TypeError):
        model = load_classifier(art.path, art.task)
    except (SafetensorError, OSError) as e:  # corrupt weights, a folder without them
        raise library_error(e, art.path, "cannot load the model") from None
    return model.float().eval()


def _forward_params(model) -> set[str]:
    """Argument names of a model's forward (through transformers' decorators)."""
    import inspect

    return set(inspect.signature(model.forward).parameters)


class _LogitsOnly:
    """Wrap a Hugging Face classifier so the graph has one output, `logits`."""

    def __new__(cls, model, input_names):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
                kw = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                      "pixel_values": pixel_values}
                return self.model(**{k: v for k, v in kw.items() if k in input_names}).logits

        return Wrapper().eval()


def _export_inputs(model, task: str, config: dict):
    """Example inputs for tracing: batch 2, length 16 (not 0 or 1, which tracers specialise)."""
    import torch

    if task == "image-classification":
        size = config.get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, config.get("num_channels", 3), size, size)}
    params = _forward_params(model)
    vocab = config.get("vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(5, max(vocab - 1, 6), (2, 16), generator=g),
              "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    inputs["attention_mask"][1, 10:] = 0
    if "token_type_ids" in params and config.get("type_vocab_size", 0) > 0:
        inputs["token_type_ids"] = torch.zeros(2, 16, dtype=torch.long)
    return inputs


def _torchscript_export(wrapper, inputs: dict, path: Path, opset: int) -> None:
    import warnings

    import torch

    axes = {k: ({0: "batch", 1: "sequence"} if k != "pixel_values" else {0: "batch"}) for k in inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (), str(path), kwargs=inputs, dynamo=False, opset_version=opset,
                          input_names=list(inputs), output_names=["logits"],
                          dynamic_axes={**axes, "logits": {0: "batch"}}, do_constant_folding=True)


def _dynamo_export(wrapper, inputs: dict, path: Path, opset: int) -> None:
    import warnings

    import torch

    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {k: ({0: batch, 1: seq} if k != "pixel_values" else {0: batch}) for k in inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper, (), kwargs=inputs, dynamo=True, dynamic_shapes=shapes,
                                    opset_version=max(opset, 18), input_names=list(inputs),
                                    output_names=["logits"], verbose=False)
        program.save(str(path))


# --------------------------------------------------------------------------- verification


def max_logit_difference(torch_model, onnx_path: Path, batches: list[dict], threads: int | None = None,
                         device: str = "cpu") -> dict:
    """Run both on each batch, on `device`; the largest |difference| of logits, per shape
    and overall, and how often the predicted class agrees."""
    import torch

    from mk.core.runtime.onnx_runtime import open_session

    session = open_session(onnx_path, device, threads)
    torch_model = torch_model.to(device)
    names = {i.name: i.type for i in session.get_inputs()}
    params = _forward_params(torch_model)
    shapes, worst, agree, total = [], 0.0, 0, 0
    for batch in batches:
        feed = {k: (v.astype(np.float32) if k == "pixel_values" else v.astype(np.int64))
                for k, v in batch.items() if k in names}
        if "token_type_ids" in names and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        with torch.inference_mode():
            tfeed = {k: torch.from_numpy(v).to(device) for k, v in feed.items() if k in params}
            ref = torch_model(**tfeed).logits.float().cpu().numpy()
        got = session.run(None, feed)[0].astype(np.float32)
        diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        worst = max(worst, diff)
        agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
        total += len(ref)
        shape = list(next(iter(feed.values())).shape[:2])
        shapes.append({"shape": shape, "max_abs_diff": diff})
    return {"max_abs_diff": worst, "prediction_agreement": agree / max(total, 1), "shapes": shapes}


# --------------------------------------------------------------------------- the command


def export_onnx(model: str | Path, out: str | Path, data: str | Path | None = None, atol: float | None = None,
                optimize: bool = False, fp16: bool = False, opset: int = MIN_OPSET, exporter: str = "auto",
                external_data: bool | None = None, force: bool = False, trust_pickle: bool = False,
                threads: int | None = None, verify: bool = True, step_of: str | None = None,
                device: str = "cpu", triton: dict | None = None) -> dict:
    """Export a safetensors model artifact (or Hugging Face folder, or `minilm`) to an
    ONNX model artifact at `out`; verify it against torch on `device`; return a result dict.

    Raises GateFailed (the artifact kept) when the largest logit difference is above `atol`
    (default 1e-3 in fp32, 5e-2 with --fp16). `triton` ({"repo", "max_batch_size", "kind",
    "count"}) also writes a Triton model repository (core.compression.triton) once verified."""
    device = _verification_device(device) if verify else "cpu"
    art = open_artifact(model, kind="model", trust_pickle=trust_pickle)
    out = check_output(Path(out), force, inputs=[art.path, data])
    if triton:
        from mk.core.compression.triton import check_triton
        triton = check_triton(triton, out, force, inputs=[art.path, data])
    _check_exportable(art)
    atol = _check_export_options(opset, exporter, atol, fp16)
    config = art.config()
    ds = _dataset_or_none(art, data)
    if ds is not None and art.task == "text-classification":
        check_same_tokenizer(ds, art.path)

    torch_model = _load_for_export(art, trust_pickle)
    inputs = _export_inputs(torch_model, art.task, config)
    batches, source = verification_batches(art, ds, art.task, config) if verify else ([], None)

    with atomic_output(out, force) as tmp:
        used, fused = _write_onnx(torch_model, inputs, tmp, art, config, opset, exporter, optimize, fp16,
                                  external_data)
        final = load_onnx(tmp / "model.onnx", load_external_data=False)
        check_inputs(final, tmp / "model.onnx")
        check = (max_logit_difference(torch_model, tmp / "model.onnx", batches, threads, device)
                 if verify else None)
        passed = check is None or check["max_abs_diff"] <= atol
        record = {
            "exporter": used, "opset": opset_of(final), "inputs": model_inputs(final), "outputs": ["logits"],
            "dynamic_axes": {"batch": 0, "sequence": 1} if art.task == "text-classification" else {"batch": 0},
            "optimized": bool(optimize), "fused_operators": fused, "fp16": bool(fp16),
            "external_data": (tmp / EXTERNAL_DATA_NAME).is_file(),
            "verification": None if check is None else {**check, "atol": atol, "passed": passed, "inputs": source},
        }
        metrics = {} if check is None else {"max_abs_logit_diff": check["max_abs_diff"],
                                            "prediction_agreement": check["prediction_agreement"]}
        size_before = sum(p.stat().st_size for p in art.path.glob("*.safetensors"))
        write_manifest(tmp, kind="model", format="onnx", task=art.task, labels=art.labels, parent=art,
                       dataset=ds, metrics=metrics, onnx=record,
                       **({"step_of": step_of} if step_of else {}),
                       size={"parent_bytes": size_before, "bytes": onnx_bytes(tmp)})
    result = {"path": str(out), "exporter": used, "opset": record["opset"], "optimized": bool(optimize),
              "fp16": bool(fp16), "fused_operators": fused, "external_data": record["external_data"],
              "verification": record["verification"], "size_bytes": onnx_bytes(out),
              "parent_size_bytes": size_before}
    log.info("exported %s (%s, opset %d, %s)%s", out, used, record["opset"], human_bytes(result["size_bytes"]),
             "" if check is None else
             f"; max |logit difference| {check['max_abs_diff']:.2e} over {len(batches)} shapes "
             f"({source}), atol {atol:g}")
    if not passed:
        raise GateFailed(f"{out}: ONNX logits differ from torch by up to {check['max_abs_diff']:.3g}, "
                         f"above --atol {atol:g}", path=out, result=result,
                         hint="the artifact was kept for inspection; see onnx.verification in its mk.json")
    if triton:
        from mk.core.compression.triton import write_onnx_repo
        result["triton_repo"] = str(write_onnx_repo(open_artifact(out), triton, force))
    return result


def _verification_device(device: str) -> str:
    """`--device` resolved, and its ONNX Runtime provider present, before any work."""
    from mk.core.runtime.onnx_runtime import providers_for

    device = resolve_device(device)
    providers_for(device)
    return device


def _check_exportable(art: Artifact) -> None:
    check_whole_model(art.path, "export")
    if art.format != "safetensors":
        what = {"onnx": "an ONNX", "tensorrt": "a TensorRT"}.get(art.format, f"a {art.format}")
        raise BadInput(f"{art.path}: is already {what} model; export-onnx takes a safetensors "
                       "(Hugging Face) model",
                       hint="`mk quant` takes ONNX models directly" if art.format == "onnx" else
                       "export the safetensors model it was built from (see `mk info --lineage`)")
    if art.task not in ("text-classification", "image-classification"):
        raise BadInput(f"{art.path}: a {art.task} model has no classification head to export",
                       hint="fine-tune it first with `mk tune`")


def _check_export_options(opset: int, exporter: str, atol: float | None, fp16: bool) -> float:
    """Every option checked before the model loads; the tolerance to verify with."""
    import onnx

    if opset < MIN_OPSET:
        raise BadInput(f"--opset {opset}: mk exports opset {MIN_OPSET} or newer")
    if opset > onnx.defs.onnx_opset_version():
        raise BadInput(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up to "
                       f"{onnx.defs.onnx_opset_version()}", hint=f"the default, {MIN_OPSET}, runs everywhere")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise BadInput(f"--exporter {exporter!r}: expected auto, torchscript or dynamo")
    if atol is None:
        atol = 5e-2 if fp16 else 1e-3
    if atol < 0:
        raise BadInput(f"--atol {atol}: a tolerance cannot be negative")
    return atol


def _write_onnx(torch_model, inputs: dict, tmp: Path, art: Artifact, config: dict, opset: int, exporter: str,
                optimize: bool, fp16: bool, external_data: bool | None) -> tuple[str, dict]:
    """Export into `tmp/model.onnx` (fused or fp16 as asked) with the tokenizer files
    beside it; the exporter used and the fused operators."""
    scratch = tmp / ".export"
    scratch.mkdir()
    raw = scratch / "model.onnx"
    used = _export(torch_model, inputs, raw, opset, exporter, art.path)
    proto = load_onnx(raw)
    check_inputs(proto, raw)
    fused = {}
    if optimize:
        fused = optimize_transformer(raw, tmp / "model.onnx", config, fp16=fp16, external_data=external_data)
        log.info("fused: %s", ", ".join(f"{k} {v}" for k, v in fused.items()) or "nothing matched")
    elif fp16:
        to_fp16(raw, tmp / "model.onnx", external_data)
    else:
        save_onnx(proto, tmp / "model.onnx", external_data)
    del proto
    shutil.rmtree(scratch)
    copy_tokenizer_files(art.path, tmp)
    return used, fused


def _dataset_or_none(art: Artifact, data) -> Artifact | None:
    from mk.core.dataset import lineage_dataset, open_dataset

    return open_dataset(data) if data is not None else lineage_dataset(art)


class _StdoutToStderr:
    """The exporters print on stdout, from C++ too ("Torch IR graph at exception: …"), and
    stdout carries only mk's result: point file descriptor 1 at stderr meanwhile."""

    def __enter__(self):
        import contextlib
        import os
        import sys

        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)
        self._py = contextlib.redirect_stdout(sys.stderr)
        self._py.__enter__()
        return self

    def __exit__(self, *exc):
        import os
        import sys

        self._py.__exit__(*exc)
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)
        return False


def _export(torch_model, inputs: dict, path: Path, opset: int, exporter: str, source: Path) -> str:
    """Export with the chosen exporter; `auto` is TorchScript with a dynamo fallback."""
    with _StdoutToStderr():
        return _export_quietly(torch_model, inputs, path, opset, exporter, source)


def _export_quietly(torch_model, inputs: dict, path: Path, opset: int, exporter: str, source: Path) -> str:
    wrapper = _LogitsOnly(torch_model, set(inputs))
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[exporter]
    errors = []
    for name in order:
        try:
            (_torchscript_export if name == "torchscript" else _dynamo_export)(wrapper, inputs, path, opset)
            return name
        except MkError:
            raise
        except Exception as e:  # exporters raise anything from torch internals
            errors.append(f"{name}: {first_line(e)}")
            log.warning("the %s exporter failed for %s (%s)%s", name, source, first_line(e),
                        "; trying the next" if name != order[-1] else "")
            for p in path.parent.iterdir():
                p.unlink()
    raise MkError(f"{source}: ONNX export failed ({'; '.join(errors)})",
                  hint="rerun with MK_DEBUG=1 for the traceback, or try --exporter dynamo / torchscript")
