"""`mk explain`: which words made the model decide, for texts or a dataset split."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.core.errors import BadInput


def read_texts(args: list[str] | None, dataset_mode: bool) -> list[str] | None:
    """The texts: the arguments, with `-` (or, without a dataset, no argument and piped
    stdin) read from stdin one per line; None when there are none."""
    args = list(args or [])
    if not args and not dataset_mode and sys.stdin is not None and not sys.stdin.isatty():
        args = ["-"]
    texts: list[str] = []
    for arg in args:
        if arg != "-":
            texts.append(arg)
            continue
        if sys.stdin is None or sys.stdin.isatty():
            raise BadInput("`-`: stdin is a terminal; pipe texts into it, one per line")
        lines = sys.stdin.read().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                raise BadInput(f"stdin line {n}: empty text; there is nothing to explain")
        texts.extend(lines)
    return texts or None


def render(result: dict) -> None:
    """The terminal view on stderr: each text with its words coloured, its prediction and
    score; the per-class summary and the deletion check over several texts."""
    from rich.table import Table
    from rich.text import Text

    from mk.core.console import console
    from mk.core.explanation.render import segments

    for rec in result["records"]:
        line = Text()
        for text, weight, _ in segments(rec):
            if weight is None:
                line.append(text)
            else:
                rgb = (26, 127, 55) if weight >= 0 else (207, 34, 46)
                a = min(abs(weight), 1.0) * 0.75  # blend into white, as the page does
                bg = "#%02x%02x%02x" % tuple(round(255 - (255 - c) * a) for c in rgb)
                line.append(text, style=f"black on {bg}")
        console.print(line, soft_wrap=True)
        status = f"  → {rec['prediction']} {rec['score']:.3f}"
        if rec["target"] != rec["prediction"]:
            status += f"   explained: {rec['target']} {rec['target_probability']:.3f}"
        if "label" in rec:
            status += f"   true: {rec['label']} " + ("✓" if rec["correct"] else "✗")
        if "completeness" in rec:
            c = rec["completeness"]
            status += f"   completeness error {c['error']:.2g} of {c['logit_difference']:+.3g}"
        if "faithfulness" in rec:
            f = rec["faithfulness"]
            status += f"   deletion: top-{f['k']} {f['drop_top']:+.3f}, random {f['drop_random']:+.3f}"
        console.print(status, style="dim", highlight=False)
    if len(result["records"]) > 1 and any(result["summary"].values()):
        console.print("words with the largest mean score, per explained class:")
        table = Table()
        for label in result["summary"]:
            table.add_column(label)
        columns = [[f"{r['word']} {r['mean_score']:+.3g} ×{r['count']}" for r in rows]
                   for rows in result["summary"].values()]
        for i in range(max(map(len, columns))):
            table.add_row(*[c[i] if i < len(c) else "" for c in columns])
        console.print(table)
    faith = result["faithfulness"]
    if faith and len(result["records"]) > 1:
        k = result["settings"]["top_k"]
        console.print(f"deletion check: removing the top {k} words lowers the explained class's probability by "
                      f"{faith['mean_drop_top']:.3f} on average, {k} random words by {faith['mean_drop_random']:.3f}; "
                      f"top words hurt more in {faith['share_top_above_random']:.0%} of {faith['texts']} texts",
                      highlight=False)
    console.print(f"[dim]{len(result['records'])} texts, {result['method']}, {result['seconds']:.1f} s[/]")


@command("explain")
def explain(
    model: Annotated[str, typer.Argument(help="Model artifact (torch, ONNX or TensorRT) with a classification head.",
                                         show_default=False)],
    texts: Annotated[Optional[list[str]], typer.Argument(
        help="Texts to explain; `-` reads stdin, one text per line (also when none are given and stdin is "
             "piped).", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="ig, occlusion, shap, lime or attention.  [default: ig for torch models, "
                         "occlusion for ONNX and TensorRT]")] = None,
    target: Annotated[Optional[str], typer.Option(
        "--target", help="Label to explain.  [default: each text's predicted label]")] = None,
    steps: Annotated[int, typer.Option("--steps", min=2, help="ig: integration steps.")] = 50,
    samples: Annotated[int, typer.Option("--samples", min=10, help="shap, lime: perturbed samples per text.")] = 200,
    data: options.Data = None,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="Explain this split of the dataset (--data, else the model's lineage).  "
                        "[default: test when --data is given]")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many rows of the split.")
                     ] = None,
    errors: Annotated[bool, typer.Option("--errors", help="Only the split's rows the model gets wrong.")] = False,
    faithfulness: Annotated[bool, typer.Option(
        "--faithfulness", help="Deletion check: the explained class's probability without the top-k words "
                               "against without k random words.")] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Words removed by the deletion check.")] = 3,
    html: Annotated[Optional[Path], typer.Option(
        "--html", help="Write one self-contained, sortable HTML page (its path goes to stdout).")] = None,
    batch_size: options.BatchSize = 32,
    max_length: options.MaxLength = None,
    device: options.Device = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads.")] = None,
    seed: options.Seed = 0,
    force: options.Force = False,
    trust_pickle: options.TrustPickle = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="JSON lines on stdout: one per text, then a summary line.")] = False,
):
    """Show which words made a classifier decide, for texts or a dataset split.

    Each word gets a score towards the explained class (sub-word scores summed per word);
    the terminal shows the words coloured, green for and red against, with the prediction
    and its score. ONNX and TensorRT models are explained as served, through the runtime
    `mk bench` measures.

    \b
      mk explain tuned "the battery died after an hour" "love it"
      mk explain int8 --data data --split test --limit 100 --errors --html errors.html
      mk explain tuned --method shap --target positive --faithfulness - < texts.txt
    """
    from mk.core.console import quiet
    from mk.core.explanation.explain import Rows, Settings, explain as run
    from mk.core.explanation.page import check_page, write_page

    dataset_mode = data is not None or split is not None
    given = read_texts(texts, dataset_mode)
    if given is not None and dataset_mode:
        raise BadInput("give texts or --data/--split, not both")
    if given is None and not dataset_mode:
        raise BadInput("no texts to explain",
                       hint="pass texts as arguments, pipe them one per line, or pass --data DATA --split test")
    if (limit is not None or errors) and not dataset_mode:
        raise BadInput("--limit and --errors choose rows of a dataset; pass --data DATA")
    if html is not None:
        check_page(html, force, inputs=[model, data])
    settings = Settings(method=method, target=target, steps=steps, samples=samples, batch_size=batch_size,
                        max_length=max_length, seed=seed, faithfulness=faithfulness, top_k=top_k, device=device,
                        threads=threads, trust_pickle=trust_pickle)
    result = run(model, Rows(texts=given, data=data, split=split or "test", limit=limit, errors=errors), settings)
    if not quiet():
        render(result)
    if html is not None:
        write_page(result, html, force)
    if as_json:
        for rec in result["records"]:
            sys.stdout.write(json.dumps({**rec, "settings": result["settings"]}) + "\n")
        summary = {k: v for k, v in result.items() if k != "records"}
        sys.stdout.write(json.dumps({"kind": "summary", **summary, "path": str(html) if html else None}) + "\n")
    elif html is not None:
        sys.stdout.write(f"{html}\n")
    sys.stdout.flush()
