"""ONNX model files: load and check, save (with external data past 2 GB), size,
the tokenizer files that travel beside a model, and ONNX Runtime's graph
rewrites (transformer fusions, fp16). Shared by every step that writes an ONNX
artifact (export-onnx, quant, and the TensorRT build that starts from one)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mk.core.console import quiet_onnxruntime
from mk.core.errors import BadInput, first_line, library_error

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "preprocessor_config.json")
# ModelProto is a protobuf message: it cannot be serialised past 2 GiB; stay well clear.
EXTERNAL_DATA_BYTES = 1_800_000_000
EXTERNAL_DATA_NAME = "model.onnx.data"


# --------------------------------------------------------------------------- ONNX checks


def load_onnx(path: Path, load_external_data: bool = True):
    """onnx.load with a clear line for a corrupt or truncated file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such ONNX file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # DecodeError, ValueError, OSError for missing external data …
        raise BadInput(f"{path}: corrupt or truncated ONNX file ({first_line(e)})") from None
    if not model.graph.node or not model.graph.output:
        raise BadInput(f"{path}: corrupt or truncated ONNX file (no graph nodes or outputs)")
    try:
        onnx.checker.check_model(model if load_external_data else str(path), full_check=False)
    except Exception as e:
        raise library_error(e, path, "invalid ONNX model") from None
    return model


def model_inputs(model) -> list[str]:
    """The graph's real inputs (initializers listed as inputs by old exporters left out)."""
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def check_inputs(model, path: Path) -> list[str]:
    names = model_inputs(model)
    if "input_ids" not in names and "pixel_values" not in names:
        raise BadInput(f"{path}: no recognisable inputs: the graph takes {names or 'nothing'}, "
                       "mk needs input_ids (text) or pixel_values (images)",
                       hint="export it with `mk export-onnx`, which names the inputs as the tokenizer does")
    return names


def opset_of(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def onnx_bytes(root: Path) -> int:
    """Bytes of the model proper: model.onnx and its external data."""
    return sum(p.stat().st_size for p in (root / "model.onnx", root / EXTERNAL_DATA_NAME) if p.is_file())


def save_onnx(model, path: Path, external_data: bool | None = None) -> bool:
    """Save a ModelProto, with its weights in `model.onnx.data` when asked or when
    the model would not fit a protobuf (> ~2 GB). Returns whether external data was used."""
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    if external_data:
        (path.parent / EXTERNAL_DATA_NAME).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return external_data


def initializer_bytes(model) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            n = 1
            for d in t.dims:
                n *= d
            total += n * 4
    return total


# --------------------------------------------------------------------------- tokenizers


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """The tokenizer / image-processor files and config.json, copied beside the model."""
    copied = []
    for name in (*TOKENIZER_FILES, "config.json"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


# --------------------------------------------------------------------------- optimisation


def optimize_transformer(src: Path, dst: Path, config: dict, fp16: bool = False,
                         external_data: bool | None = None) -> dict:
    """ONNX Runtime's transformer fusions (Attention, EmbedLayerNormalization,
    SkipLayerNormalization, LayerNormalization, Gelu/BiasGelu) for BERT-like
    models; optionally fp16 with fp32 inputs and outputs kept. Returns fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    quiet_onnxruntime()
    model_type = _ort_model_type(config)
    heads = config.get("num_attention_heads", 0)
    hidden = config.get("hidden_size", 0)
    opt = optimize_model(str(src), model_type=model_type or "bert", num_heads=heads, hidden_size=hidden,
                         opt_level=0, use_gpu=fp16)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if fp16:
        opt.convert_float_to_float16(keep_io_types=True)
    _declare_contrib_domain(opt.model)
    save_onnx(opt.model, dst, external_data)
    return stats


def _declare_contrib_domain(model) -> None:
    """Fused nodes live in ONNX Runtime's `com.microsoft` domain; a valid model imports it."""
    import onnx

    domains = {n.domain for n in model.graph.node if n.domain}
    have = {o.domain for o in model.opset_import}
    for d in sorted(domains - have):
        model.opset_import.append(onnx.helper.make_opsetid(d, 1))


def _ort_model_type(config: dict) -> str | None:
    """ONNX Runtime optimizer's model type for a Hugging Face config, when it has one."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    mt = config.get("model_type")
    aliases = {"distilbert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert",
               "camembert": "bert", "mpnet": "bert", "deberta-v2": "bert"}
    if mt in MODEL_TYPES:
        return mt
    return aliases.get(mt)


def to_fp16(src: Path, dst: Path, external_data: bool | None = None) -> None:
    """fp16 weights and compute, fp32 inputs and outputs (keep_io_types)."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(load_onnx(src))
    model.convert_float_to_float16(keep_io_types=True)
    _declare_contrib_domain(model.model)
    save_onnx(model.model, dst, external_data)
