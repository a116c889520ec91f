"""`mk export-onnx`: a fine-tuned model to an ONNX model artifact, verified against torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import read_input, show


@command("export-onnx")
def export_onnx(
    model: Annotated[Optional[Path], options.input_argument("Model artifact, Hugging Face folder or `minilm`.")] = None,
    output: options.Output = ...,
    data: options.Data = None,
    atol: Annotated[Optional[float], typer.Option(
        "--atol", help="Largest allowed |logit difference| against torch; above it exit 3, artifact kept. "
                       "[default: 1e-3, 5e-2 with --fp16]")] = None,
    optimize: Annotated[bool, typer.Option(
        "--optimize", help="Apply ONNX Runtime's transformer fusions (attention, layer norm, GELU, "
                           "skip layer norm) where they match, saved in the artifact.")] = False,
    fp16: Annotated[bool, typer.Option(
        "--fp16", help="fp16 weights and compute for GPU targets; inputs and outputs stay fp32.")] = False,
    opset: Annotated[int, typer.Option("--opset", min=17, help="ONNX opset.")] = 17,
    exporter: Annotated[str, typer.Option(
        "--exporter", help="auto (TorchScript, dynamo as fallback), torchscript or dynamo.")] = "auto",
    external_data: Annotated[Optional[bool], typer.Option(
        "--external-data/--no-external-data", show_default=False,
        help="Weights in model.onnx.data. [default: only for models over 2 GB]")] = None,
    device: options.Device = "cpu",
    triton_repo: options.TritonRepo = None,
    triton_name: options.TritonName = None,
    triton_instances: options.TritonInstances = None,
    triton_kind: Annotated[Optional[str], typer.Option(
        "--triton-instance-kind", help="Where Triton runs the instances: auto, gpu or cpu.  [default: auto]",
        show_default=False)] = None,
    triton_max_batch: Annotated[Optional[int], typer.Option(
        "--triton-max-batch-size", min=1, help="Triton's max_batch_size (dynamic batching).  [default: 32]",
        show_default=False)] = None,
    threads: options.Threads = None,
    force: options.Force = False,
    trust_pickle: options.TrustPickle = False,
    as_json: options.Json = False,
):
    """Export a model to ONNX with dynamic batch and sequence axes, and verify it.

    The torch and ONNX models run side by side on rows of the dataset (the one in
    the model's lineage, or --data; sample sentences when there is none) at several
    batch and sequence shapes; the largest logit difference is reported and stored
    in mk.json. Above --atol the command exits 3 and keeps the artifact. The export
    itself runs on the CPU; --device cuda verifies on the GPU (torch and ONNX
    Runtime's CUDA provider), where the model will run. --triton-repo also lays the
    verified model out for Triton's ONNX Runtime backend.
    """
    from mk.core.compression.export import export_onnx as run

    result = run(read_input(model, "model"), output, data=data, atol=atol, optimize=optimize, fp16=fp16,
                 opset=opset, exporter=exporter, external_data=external_data, force=force,
                 trust_pickle=trust_pickle, threads=threads, device=device,
                 triton=options.triton(triton_repo, name=triton_name, count=triton_instances, kind=triton_kind,
                                       max_batch_size=triton_max_batch))
    show(Path(result["path"]), result, as_json)
