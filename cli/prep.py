"""`mk prep`: raw labelled data in, a tokenized, split dataset artifact out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import read_input, show


@command("prep")
def prep(
    output: options.Output,
    source: Annotated[Optional[str], options.input_argument(
        "CSV, TSV, JSONL or Parquet file, a folder of class sub-folders (.txt files or images), "
        "or the embedded dataset `tweets`.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", "--model", show_default=False,
        help="Model whose tokenizer (or image processor) to use: a model folder, an artifact, a .gguf file, "
        "`minilm` or `smollm2`.  [default: minilm; smollm2 with --task generate]")] = None,
    task: Annotated[str, typer.Option(
        "--task", help="classify: text → label.  generate: prompt → completion for a causal LM, from "
        "prompt/completion columns, a chat `messages` column, or labelled rows turned into instructions "
        "(\"Classify the sentiment of this tweet as negative, neutral or positive.\" → positive).  "
        "auto: generate when the source has prompt/completion or messages columns.")] = "auto",
    prompt_col: Annotated[Optional[str], typer.Option(
        "--prompt-col", help="--task generate: the prompt column.  [default: prompt]", show_default=False)] = None,
    completion_col: Annotated[Optional[str], typer.Option(
        "--completion-col", help="--task generate: the completion column.  [default: completion]",
        show_default=False)] = None,
    messages_col: Annotated[Optional[str], typer.Option(
        "--messages-col", help="--task generate: a column of chat messages, lists of {role, content} whose "
        "last turn, the assistant's, is the completion.  [default: messages]", show_default=False)] = None,
    pack: Annotated[bool, typer.Option(
        "--pack", help="--task generate: pack short training examples into rows of --max-length tokens "
        "(val/test keep one example a row).")] = False,
    text_col: Annotated[Optional[str], typer.Option("--text-col", help="Text column (detected when omitted).")] = None,
    text_pair_col: Annotated[Optional[str], typer.Option(
        "--text-pair-col", help="Second text column, for sentence-pair tasks.")] = None,
    label_col: Annotated[Optional[str], typer.Option("--label-col", help="Label column (detected when omitted).")] = None,
    split_col: Annotated[Optional[str], typer.Option(
        "--split-col", help="Column holding train/val/test per row (a column named `split` is used by default).")] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="A file (or folder) that is the validation split.")] = None,
    test: Annotated[Optional[str], typer.Option("--test", help="A file (or folder) that is the test split.")] = None,
    split: Annotated[str, typer.Option(
        "--split", help="Train,val,test fractions for the splits not given, stratified by label.")] = "0.8,0.1,0.1",
    seed: options.Seed = 0,
    max_length: options.MaxLength = None,
    sample: Annotated[Optional[int], typer.Option(
        "--sample", min=1, help="Keep a stratified sample of N rows before splitting (quick runs).")] = None,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Skip and count images that will not decode, instead of stopping.")] = False,
    encoding: Annotated[str, typer.Option(
        "--encoding", help="Encoding of the text files: any codec Python knows (latin-1, cp1252, utf-16 …).")] = "utf-8",
    encoding_errors: Annotated[str, typer.Option(
        "--encoding-errors", help="strict: stop at the first undecodable byte; replace: put U+FFFD there "
        "and count it in the cleaning report.")] = "strict",
    force: options.Force = False,
    as_json: options.Json = False,
):
    """Clean, split and tokenize labelled data into a dataset artifact.

    Cleaning strips whitespace and drops empty texts, rows without a label, and
    duplicates (also those across splits); splits are stratified by label and
    reproducible with --seed. --max-length defaults to the 95th percentile of
    the token lengths, rounded up to a multiple of 8. Prints the artifact's path.

    --task generate makes (prompt, completion) examples for a causal LM from
    prompt/completion columns or a chat `messages` column (either picks the task
    by itself), or from labelled rows turned into instructions whose answer is the
    label:

    \b
        mk prep tweets --task generate -o data-gen
        mk prep chats.jsonl --pack --max-length 512 -o data-gen

    The tokenizer is then smollm2's unless --tokenizer names another; its chat
    template is applied as at inference, the loss falls on the completion's
    tokens only (end of turn included), and rows whose prompt alone fills
    --max-length are dropped and counted, never cut.
    """
    from mk.core.data.prep import PrepOptions, parse_split
    from mk.core.data.prep import prep as run_prep

    opts = PrepOptions(tokenizer=tokenizer, text_col=text_col, text_pair_col=text_pair_col, label_col=label_col,
                       split_col=split_col, val=val, test=test, split=parse_split(split), seed=seed,
                       max_length=max_length, sample=sample, skip_bad=skip_bad, encoding=encoding,
                       encoding_errors=encoding_errors, force=force, task=task, prompt_col=prompt_col,
                       completion_col=completion_col, messages_col=messages_col, pack=pack)
    src = source if source is not None else str(read_input(None, "data source"))
    result = run_prep(src, output, opts)
    show(Path(result["path"]), result, as_json, human=_summary)


def _summary(r: dict) -> None:
    """The end-of-run table on stderr: rows per split and label, and the cleaning steps."""
    from rich.table import Table

    from mk.core.console import console

    t = Table(title=f"dataset {r['path']}", title_justify="left", show_edge=False)
    t.add_column("split")
    for name in r["labels"]:
        t.add_column(str(name), justify="right")
    t.add_column("rows", justify="right")
    for split, n in r["splits"].items():
        t.add_row(split, *(f"{r['label_counts'][split][name]:,}" for name in r["labels"]), f"{n:,}")
    console.print(t)
    steps = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in r["cleaning"].items())
    console.print(f"cleaning: {steps}", soft_wrap=True)
    gen = r.get("generation")
    if gen:
        packed = f"; {r['splits']['train']:,} training examples packed into {gen['train_rows']:,} rows" \
            if gen["packed"] else ""
        console.print(f"max length {r['max_length']} ({r['max_length_from']}); completion cut short in "
                      f"{r['truncation_rate']:.1%} of examples{packed}", soft_wrap=True)
    elif "max_length" in r:
        console.print(f"max length {r['max_length']} ({r['max_length_from']}); "
                      f"truncated {r['truncation_rate']:.1%} of rows", soft_wrap=True)
    console.print(f"{r['seconds']:.1f} s", style="dim")
