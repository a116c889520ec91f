"""`mk export-trt`: an ONNX (or safetensors) model to a TensorRT engine, verified against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import read_input, show


def _bound(flag: str, what: str):
    return typer.Option(flag, min=1, help=f"{what}  [default: from the dataset]", show_default=False)


@command("export-trt")
def export_trt(
    model: Annotated[Optional[Path], options.input_argument(
        "ONNX model artifact (a QDQ one for --int8), or a safetensors model exported first.")] = None,
    output: options.Output = ...,
    data: options.Data = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 kernels (a flag on TensorRT 10; an fp16 graph, "
                                                      "strongly typed, on 11).")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 kernels (TensorRT 10's flag).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Explicit int8 from the model's Q/DQ nodes "
                                                      "(symmetric, signed int8).")] = False,
    workspace: Annotated[Optional[float], typer.Option(
        "--workspace", help="GiB of GPU memory the builder may use for tactics.  [default: TensorRT's]")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option(
        "--timing-cache", help="Timing cache file: read if present, written after the build, so rebuilds "
                               "are faster.")] = None,
    opt_level: Annotated[Optional[int], typer.Option(
        "--builder-optimization-level", help="0 (fast build) to 5 (slow build, maybe faster engine). "
                                             "[default: TensorRT's, 3]")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Largest batch.")] = 32,
    min_batch: Annotated[Optional[int], _bound("--min-batch", "Smallest batch.")] = None,
    opt_batch: Annotated[Optional[int], _bound("--opt-batch", "Batch to tune for.")] = None,
    min_seq: Annotated[Optional[int], _bound("--min-seq", "Shortest sequence.")] = None,
    opt_seq: Annotated[Optional[int], _bound("--opt-seq", "Sequence length to tune for.")] = None,
    max_seq: Annotated[Optional[int], _bound("--max-seq", "Longest sequence.")] = None,
    percentile: Annotated[float, typer.Option(
        "--opt-percentile", help="Percentile of the dataset's token lengths taken as --opt-seq.")] = 95.0,
    atol: Annotated[Optional[float], typer.Option(
        "--atol", help="Largest allowed |logit difference| against ONNX Runtime; above it exit 3, artifact "
                       "kept.  [default: 1e-3 fp32, 5e-2 fp16, 0.1 bf16, 0.2 int8]")] = None,
    max_drop: Annotated[float, typer.Option(
        "--max-drop", help="Largest allowed accuracy drop (points) on the test split against ONNX Runtime; "
                           "beyond it exit 3, artifact kept.")] = 1.0,
    confidence: options.Confidence = 0.95,
    gate_test: options.GateTest = "paired",
    device: options.Device = "cuda",
    triton_repo: options.TritonRepo = None,
    triton_name: options.TritonName = None,
    triton_instances: options.TritonInstances = None,
    force: options.Force = False,
    trust_pickle: options.TrustPickle = False,
    as_json: options.Json = False,
):
    """Build a TensorRT engine for the GPU at hand, with shape profiles from the data.

    Batch runs from 1 to --max-batch-size; sequence lengths from the dataset's token
    lengths (shortest, --opt-percentile, longest); each bound may be given. The engine
    is then checked against ONNX Runtime on the test split. mk.json records the
    TensorRT version, GPU and compute capability: loading it elsewhere is exit 2.
    Needs TensorRT (`mk doctor` says how to install it).
    """
    from mk.core.compression.tensorrt import export_trt as run
    from mk.core.errors import BadInput

    chosen = [name for name, on in (("fp16", fp16), ("bf16", bf16), ("int8", int8)) if on]
    if len(chosen) > 1:
        raise BadInput(f"--{' and --'.join(chosen)}: choose one precision")
    result = run(read_input(model, "model"), output, data=data, precision=chosen[0] if chosen else "fp32",
                 workspace=workspace, timing_cache=timing_cache, opt_level=opt_level,
                 max_batch_size=max_batch_size, batch=(min_batch, opt_batch, None),
                 seq=(min_seq, opt_seq, max_seq), percentile=percentile, atol=atol, max_drop=max_drop,
                 confidence=confidence, gate_test=gate_test, device=device, force=force,
                 trust_pickle=trust_pickle,
                 triton=options.triton(triton_repo, name=triton_name, count=triton_instances))
    show(Path(result["path"]), result, as_json)
