"""`mk quant`: int8 or fp16 ONNX models, with an accuracy gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import read_input, show


@command("quant")
def quant(
    model: Annotated[Optional[Path], options.input_argument(
        "ONNX model artifact, or a safetensors model (exported first to OUTPUT-onnx).")] = None,
    output: options.Output = ...,
    method: Annotated[str, typer.Option(
        "--method", help="dynamic (int8 weights, activations quantized at run time), static (int8 QDQ "
                         "calibrated on the dataset) or fp16.")] = "dynamic",
    data: options.Data = None,
    max_drop: Annotated[float, typer.Option(
        "--max-drop", min=0, help="Largest allowed accuracy drop in points on the test split; "
                                  "above it (see --gate-test) exit 3, artifact kept.")] = 1.0,
    confidence: options.Confidence = 0.95,
    gate_test: options.GateTest = "paired",
    calib_size: Annotated[int, typer.Option("--calib-size", min=1, help="Calibration rows (static).")] = 256,
    calib_method: Annotated[str, typer.Option(
        "--calib-method", help="minmax, entropy or percentile (static).")] = "minmax",
    per_channel: Annotated[Optional[bool], typer.Option(
        "--per-channel/--per-tensor", help="Weight scales per output channel or one per tensor.  "
                                           "[default: chosen for this CPU]", show_default=False)] = None,
    reduce_range: Annotated[Optional[bool], typer.Option(
        "--reduce-range/--full-range", help="7-bit weights (no saturation on CPUs without VNNI) or full 8-bit.  "
                                            "[default: 7-bit only on a CPU without VNNI]",
        show_default=False)] = None,
    fuse: Annotated[bool, typer.Option(
        "--fuse/--no-fuse", help="Apply ONNX Runtime's transformer fusions before quantizing.")] = False,
    op_types: Annotated[str, typer.Option(
        "--op-types", help="Comma-separated operator types to quantize (e.g. MatMul,Gather,Attention).")
    ] = "MatMul,Gather",
    gate: Annotated[bool, typer.Option(
        "--gate/--no-gate", help="Evaluate parent and result on the test split (needs a dataset).")] = True,
    device: options.Device = "cpu",
    threads: options.Threads = None,
    batch_size: options.BatchSize = 32,
    force: options.Force = False,
    trust_pickle: options.TrustPickle = False,
    as_json: options.Json = False,
):
    """Quantize a model with ONNX Runtime and check that it keeps its accuracy.

    The parent and the quantized model are evaluated on the test split of the
    dataset in the lineage (or --data); both accuracies and the drop's interval go
    into mk.json, and a drop larger than --max-drop points with --confidence exits 3
    with the artifact kept. The defaults are the fastest setting measured that keeps
    accuracy (README, "Quantization"); per-channel and reduce-range are chosen for
    this CPU's int8 arithmetic unless given. The gate evaluates on --device (an
    fp16 model on the GPU it is meant for, with ONNX Runtime's CUDA provider).
    """
    from mk.core.compression.quantize import QuantSettings, quantize

    settings = QuantSettings(method=method, per_channel=per_channel, reduce_range=reduce_range, fuse=fuse,
                             op_types=options.comma_list(op_types),
                             calib_size=calib_size, calib_method=calib_method)
    result = quantize(read_input(model, "model"), output, method=method, data=data, max_drop=max_drop,
                      settings=settings, gate=gate, threads=threads, batch_size=batch_size, force=force,
                      trust_pickle=trust_pickle, confidence=confidence, gate_test=gate_test, device=device)
    show(Path(result["path"]), result, as_json)
