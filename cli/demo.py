"""`mk demo`: the whole chain on the embedded model and dataset."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import show


@command("demo")
def demo(
    output: options.Output,
    task: Annotated[str, typer.Option("--task", help="classify: MiniLM classifies the tweets (prep → tune → "
                                      "prune → distil → quant → bench).  generate: SmolLM2 answers them as "
                                      "instructions (prep → LoRA tune → bench → a served completion).")] = "classify",
    sample: Annotated[Optional[int], typer.Option(
        "--sample", min=100, help="Tweets to take (stratified) from the embedded dataset.  [default: 3000; "
        "generate 600]", show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option(
        "--epochs", min=0.1, help="Fine-tuning epochs.  [default: 2; generate 1]", show_default=False)] = None,
    seed: options.Seed = 0,
    threads: options.Threads = None,
    force: options.Force = False,
    as_json: options.Json = False,
):
    """Run the whole chain on the embedded models and tweets.

    classify (the default): prep → tune → prune → distil → quant → bench on MiniLM.
    The artifacts land in OUTPUT (data/, tuned/, pruned/, distilled/ (the pruned model
    distilled from the tuned one), int8-onnx/, int8/, bench.json, bench.png) and the
    last step prints the benchmark table of tuned, distilled and int8.

    generate: the tweets as instructions ("Classify the sentiment of this tweet …") →
    LoRA tune of SmolLM2-135M-Instruct → bench of the base and tuned model (tokens/s,
    exact match) → `mk serve tuned` answering one test prompt through its
    OpenAI-compatible route (OUTPUT/completion.json).

    Each step is the real `mk` command, shown before it runs. Takes minutes on a
    laptop CPU.
    """
    from mk.core.demo import run_demo

    generate = task == "generate"
    result = run_demo(output, sample=sample or (600 if generate else 3000), epochs=epochs or (1 if generate else 2),
                      seed=seed, threads=threads, force=force, on_step=_show_step, task=task)
    show(output, result, as_json, human=_served if generate else None)


def _served(result: dict) -> None:
    from mk.core.console import console

    served = result["served"]
    console.print(f"mk serve answered {served['answer'].strip()!r} (expected {served['expected']!r})",
                  highlight=False)


def _show_step(args: list[str]) -> None:
    """Each command of the chain, on stderr before it runs, as a user would type it."""
    import shlex

    from mk.core.console import console

    console.print(f"[bold cyan]$ mk {shlex.join(args)}[/]", markup=True, highlight=False)
