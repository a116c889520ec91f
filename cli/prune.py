"""`mk prune`: remove layers and feed-forward neurons, keeping a stock model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import emit, read_input


@command("prune")
def prune(
    model: Annotated[Optional[Path], options.input_argument("Fine-tuned model artifact (from `mk tune`).")] = None,
    output: options.Output = ...,
    data: options.Data = None,
    layers: Annotated[Optional[int], typer.Option(
        "--layers", help="Layers to keep [default when no other target: half of them].")] = None,
    ffn: Annotated[Optional[float], typer.Option("--ffn", help="Fraction of every layer's feed-forward neurons "
                                                 "to remove, in [0, 1) [default when no other target: 0.5].")] = None,
    heads: Annotated[Optional[float], typer.Option("--heads", help="Fraction of attention heads to remove: "
                                                   "refused, no stock BERT-style config can express it.")] = None,
    target_flops: Annotated[Optional[float], typer.Option(
        "--target-flops", help="Fraction of FLOPs per sequence to keep; layers and neurons are chosen by "
                               "importance.")] = None,
    target_params: Annotated[Optional[float], typer.Option(
        "--target-params", help="Parameters to keep (e.g. 15e6); layers and neurons chosen by importance.")] = None,
    importance: Annotated[str, typer.Option(
        "--importance", help="taylor (measured on calibration rows of the dataset) or magnitude "
                             "(data-free weight norms).")] = "taylor",
    calib_size: Annotated[int, typer.Option("--calib-size", min=1, help="Calibration rows (train split).")] = 256,
    batch_size: options.BatchSize = 32,
    device: options.Device = "auto",
    seed: options.Seed = 0,
    force: options.Force = False,
    as_json: options.Json = False,
):
    """Remove whole layers and feed-forward neurons from MODEL by measured importance.

    The output is a dense model in stock Hugging Face layout (fewer layers, a smaller
    intermediate_size) that every mk command and `from_pretrained` load. Parameters,
    size, FLOPs per sequence and test accuracy before and after go into mk.json and on
    stderr; pruning.json keeps the scores. Recover accuracy by distilling from the
    parent: `mk tune DATA --model OUT --teacher MODEL -o OUT-tuned`.
    """
    from mk.core.compression.prune import PruneTargets, prune as run_prune

    targets = PruneTargets(layers=layers, ffn=ffn, heads=heads, target_flops=target_flops,
                           target_params=None if target_params is None else int(target_params))
    result = run_prune(read_input(model, "model"), output, targets, data=data, importance=importance,
                       calib_size=calib_size, batch_size=batch_size, device=device, seed=seed, force=force)
    emit(Path(result["path"]), result, as_json=as_json)
