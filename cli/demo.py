"""`mk demo`: the whole chain on the embedded model and dataset."""

from __future__ import annotations

from typing import Annotated

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import show


@command("demo")
def demo(
    output: options.Output,
    sample: Annotated[int, typer.Option("--sample", min=100,
                                        help="Tweets to take (stratified) from the embedded dataset.")] = 3000,
    epochs: Annotated[float, typer.Option("--epochs", min=0.1, help="Fine-tuning epochs.")] = 2,
    seed: options.Seed = 0,
    threads: options.Threads = None,
    force: options.Force = False,
    as_json: options.Json = False,
):
    """Run prep → tune → prune → distil → quant → bench on the embedded MiniLM and tweets.

    Each step is the real `mk` command, shown before it runs; the artifacts land in
    OUTPUT (data/, tuned/, pruned/, distilled/ (the pruned model distilled from the
    tuned one), int8-onnx/, int8/, bench.json, bench.png) and the last step prints the
    benchmark table of tuned, distilled and int8. Takes a few minutes on a laptop CPU.
    """
    from mk.core.demo import run_demo

    result = run_demo(output, sample=sample, epochs=epochs, seed=seed, threads=threads, force=force,
                      on_step=_show_step)
    show(output, result, as_json)


def _show_step(args: list[str]) -> None:
    """Each command of the chain, on stderr before it runs, as a user would type it."""
    import shlex

    from mk.core.console import console

    console.print(f"[bold cyan]$ mk {shlex.join(args)}[/]", markup=True, highlight=False)
