"""`mk prep`: raw labelled data in, a tokenized, split dataset artifact out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import emit, read_input


@command("prep")
def prep(
    output: options.Output,
    source: Annotated[Optional[str], options.input_argument(
        "CSV, TSV, JSONL or Parquet file, a folder of class sub-folders (.txt files or images), "
        "or the embedded dataset `tweets`.")] = None,
    tokenizer: Annotated[str, typer.Option(
        "--tokenizer", "--model", help="Model whose tokenizer (or image processor) to use: a model folder, "
        "an artifact, or `minilm`.")] = "minilm",
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
    """
    from mk.core.data.prep import PrepOptions, parse_split
    from mk.core.data.prep import prep as run_prep

    opts = PrepOptions(tokenizer=tokenizer, text_col=text_col, text_pair_col=text_pair_col, label_col=label_col,
                       split_col=split_col, val=val, test=test, split=parse_split(split), seed=seed,
                       max_length=max_length, sample=sample, skip_bad=skip_bad, encoding=encoding,
                       encoding_errors=encoding_errors, force=force)
    src = source if source is not None else str(read_input(None, "data source"))
    result = run_prep(src, output, opts)
    _summary(result)
    emit(Path(result["path"]), result, as_json=as_json)


def _summary(r: dict) -> None:
    """The end-of-run table on stderr: rows per split and label, and the cleaning steps."""
    from rich.table import Table

    from mk.core.console import console, quiet

    if quiet():
        return
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
    if "max_length" in r:
        console.print(f"max length {r['max_length']} ({r['max_length_from']}); "
                      f"truncated {r['truncation_rate']:.1%} of rows", soft_wrap=True)
    console.print(f"{r['seconds']:.1f} s", style="dim")
