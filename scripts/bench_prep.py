#!/usr/bin/env python
"""Benchmark `mk prep` against the Hugging Face `datasets` pipeline users write instead.

Both sides get the same generated CSV and the same fast tokenizer and max length,
each run as its own subprocess (wall time, peak memory = the child's max RSS),
interleaved (mk, datasets, mk, datasets, ...), medians of --repeats runs:

- `mk prep DATA --tokenizer minilm -o OUT` (read twice, clean, dedupe, stratified
  80/10/10 split, choose the max length, tokenize, write safetensors);
- `datasets`: `load_dataset("csv", data_files=...)` -> `filter` empty texts ->
  `class_encode_column` -> batched `map` of the tokenizer (truncation, padding to
  mk's max length) -> stratified `train_test_split` twice (80/10/10) -> `save_to_disk`,
  in a fresh cache folder each run.

Rows (--kind): `tweets` (the default) are short texts like the embedded tweets corpus
(median 16 words, at most 60), three sentiment labels in its shares; `reviews` are
review-like (log-normal, median 80 words) with five star ratings. Words are drawn by
their frequency in the embedded tweets corpus.

`datasets` is not a dependency of mk; install it for this script alone:

    .venv/bin/python -m pip install datasets
    flock /tmp/mk-bench.lock .venv/bin/python scripts/bench_prep.py              # 200,000 tweet-like rows
    flock /tmp/mk-bench.lock .venv/bin/python scripts/bench_prep.py --kind reviews --rows 100000
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = {  # columns, labels and their shares, word-count distribution (log-normal median, sigma, cap)
    "tweets": {"text": "text", "label": "sentiment", "labels": ["negative", "neutral", "positive"],
               "shares": [0.42, 0.39, 0.19], "words": (16.5, 0.55, 60)},
    "reviews": {"text": "review", "label": "stars", "labels": ["1", "2", "3", "4", "5"],
                "shares": [0.11, 0.06, 0.08, 0.20, 0.55], "words": (80, 0.8, 5000)},
}


def vocabulary(corpus: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Words of the embedded tweets corpus (or a copy of it) and their frequencies."""
    from mk.core.embedded import data_path

    raw = (corpus or data_path("tweets")).read_bytes().decode("utf-8", errors="replace")
    counts = collections.Counter(w for r in csv.DictReader(io.StringIO(raw)) for w in r["text"].split()
                                 if not w.startswith(("http", "@")))
    words, freq = zip(*counts.most_common())
    p = np.asarray(freq, np.float64)
    return np.asarray(words, object), p / p.sum()


def generate(path: Path, rows: int, kind: str, corpus: Path | None = None, seed: int = 0,
             chunk: int = 50_000) -> None:
    import polars as pl

    spec = KINDS[kind]
    median, sigma, cap = spec["words"]
    rng = np.random.default_rng(seed)
    words, p = vocabulary(corpus)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            lengths = np.clip(rng.lognormal(np.log(median), sigma, n).astype(np.int64), 1, cap)
            ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
            cuts = np.cumsum(lengths)[:-1]
            texts = [" ".join(part) for part in np.split(words[ids], cuts)]
            labels = rng.choice(spec["labels"], size=n, p=spec["shares"])
            pl.DataFrame({spec["text"]: texts, spec["label"]: labels}).write_csv(f, include_header=start == 0)
            print(f"\rgenerating {start + n:,}/{rows:,}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tmp.rename(path)


def measure(cmd: list[str]) -> dict:
    """Run a child process: wall seconds, its peak RSS (wait4's ru_maxrss, KiB on Linux), its stdout.
    Output goes to files, not pipes, so a chatty child (progress bars) cannot block."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{err.read()[-3000:]}")
        return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out.read()}


def run_prep(data: Path, out: Path, tokenizer: str) -> dict:
    """`mk prep` in a child process: its result, wall time and peak RSS."""
    mk = Path(sys.executable).with_name("mk")
    mk = [str(mk)] if mk.is_file() else [sys.executable, "-m", "mk.cli.main"]
    cmd = [*mk, "-q", "prep", str(data), "--tokenizer", tokenizer, "-o", str(out), "--force", "--json"]
    return measure(cmd)


def run_datasets(data: Path, out: Path, tokenizer: str, kind: str, max_length: int) -> dict:
    """The `datasets` pipeline (DATASETS_PIPELINE) in a child process."""
    spec = KINDS[kind]
    cmd = [sys.executable, "-c", DATASETS_PIPELINE, str(data), str(out), tokenizer, spec["text"], spec["label"],
           str(max_length)]
    return measure(cmd)


# What a user writes with 🤗 datasets for the same job (argv: data, out, tokenizer, text column,
# label column, max length). A fresh cache folder, so nothing is reused between runs.
DATASETS_PIPELINE = """
import sys, tempfile
from datasets import DatasetDict, load_dataset
from transformers import AutoTokenizer
from mk.core.embedded import resolve_model

data, out, tokenizer, text, label, max_length = sys.argv[1:7]
tok = AutoTokenizer.from_pretrained(str(resolve_model(tokenizer)))
with tempfile.TemporaryDirectory() as cache:
    ds = load_dataset("csv", data_files=data, split="train", cache_dir=cache)
    ds = ds.filter(lambda b: [t is not None and t.strip() != "" for t in b[text]], batched=True)
    ds = ds.class_encode_column(label)
    ds = ds.map(lambda b: tok(b[text], truncation=True, padding="max_length", max_length=int(max_length)),
                batched=True, remove_columns=[text])
    first = ds.train_test_split(test_size=0.2, stratify_by_column=label, seed=0)
    rest = first["test"].train_test_split(test_size=0.5, stratify_by_column=label, seed=0)
    DatasetDict(train=first["train"], validation=rest["train"], test=rest["test"]).save_to_disk(out)
"""


def cpu() -> tuple[str, str]:
    """The CPU model and the flags that decide int8 and vector speed, as mk reads them."""
    from mk.core.cpu import this_cpu

    found = this_cpu()
    return found.model, " ".join(found.flags)


def per_row_loop(data: Path, tokenizer: str, text_col: str, max_length: int, rows: int) -> float:
    """Rows per second of a per-row `tokenizer(text, ...)` loop, tokenizing only (a secondary figure)."""
    import polars as pl
    from transformers import AutoTokenizer

    from mk.core.embedded import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(tokenizer)))
    texts = pl.read_csv(data, n_rows=rows)[text_col].str.strip_chars().to_list()
    t0 = time.perf_counter()
    for text in texts:
        tok(text, truncation=True, max_length=max_length, padding="max_length")
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--kind", choices=sorted(KINDS), default="tweets", help="tweet-like or review-like rows")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; medians reported")
    ap.add_argument("--loop-rows", type=int, default=0,
                    help="also time a per-row tokenizer loop on this many rows (0: skip)")
    ap.add_argument("--tokenizer", default="minilm")
    ap.add_argument("--workdir", type=Path, default=Path("build/bench_prep"),
                    help="where the generated table (kept for reruns) and the outputs go")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--corpus", type=Path, help="the tweets CSV to draw words from (default: the embedded one)")
    args = ap.parse_args()
    try:
        import datasets
    except ImportError:
        print("error: the `datasets` package is not installed (the baseline of this benchmark)\n"
              "hint: .venv/bin/python -m pip install datasets   (for this script only; mk does not need it)",
              file=sys.stderr)
        sys.exit(2)

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"{args.kind}-{args.rows}.csv"
    if not data.exists():
        generate(data, args.rows, args.kind, args.corpus)
    model, flags = cpu()
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {"mk": [], "datasets": []}
    max_length = None
    for r in range(args.repeats):
        mk = run_prep(data, args.workdir / "mk-out", args.tokenizer)
        result = json.loads(mk.pop("stdout"))
        max_length = result["max_length"]
        runs["mk"].append(mk)
        ds = run_datasets(data, args.workdir / "datasets-out", args.tokenizer, args.kind, max_length)
        ds.pop("stdout")
        runs["datasets"].append(ds)
        print(f"run {r + 1}/{args.repeats}: mk prep {mk['seconds']:.1f} s {mk['peak_rss_mb']:.0f} MB; "
              f"datasets {ds['seconds']:.1f} s {ds['peak_rss_mb']:.0f} MB", file=sys.stderr)
    load.append(os.getloadavg()[0])
    med = {side: {k: statistics.median(run[k] for run in rs) for k in ("seconds", "peak_rss_mb")}
           for side, rs in runs.items()}
    figures = {
        "rows": result["cleaning"]["rows_read"], "kind": args.kind, "csv_mb": round(data.stat().st_size / 2**20, 1),
        "max_length": max_length, "repeats": args.repeats,
        "mk_seconds": round(med["mk"]["seconds"], 1), "mk_peak_rss_mb": round(med["mk"]["peak_rss_mb"]),
        "datasets_seconds": round(med["datasets"]["seconds"], 1),
        "datasets_peak_rss_mb": round(med["datasets"]["peak_rss_mb"]),
        "speedup": round(med["datasets"]["seconds"] / med["mk"]["seconds"], 2),
        "memory_ratio": round(med["mk"]["peak_rss_mb"] / med["datasets"]["peak_rss_mb"], 2),
        "runs": runs, "datasets_version": datasets.__version__,
        "cpu": model, "cpu_flags": flags, "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in load],
    }
    if args.loop_rows:
        figures["loop_rows_per_s"] = round(per_row_loop(data, args.tokenizer, KINDS[args.kind]["text"], max_length,
                                                        args.loop_rows))
    for out in ("mk-out", "datasets-out"):
        shutil.rmtree(args.workdir / out, ignore_errors=True)
    print(f"{figures['rows']:,} {args.kind[:-1]}-like rows ({figures['csv_mb']} MB CSV), max length {max_length}, "
          f"medians of {args.repeats} interleaved runs")
    print(f"mk prep:  {figures['mk_seconds']} s, peak RSS {figures['mk_peak_rss_mb']} MB")
    print(f"datasets: {figures['datasets_seconds']} s, peak RSS {figures['datasets_peak_rss_mb']} MB "
          f"(datasets {datasets.__version__})")
    print(f"mk prep is {figures['speedup']}x the speed of the datasets pipeline (target >= 2.5x) at "
          f"{figures['memory_ratio']}x its peak memory (target <= 1x)")
    if args.loop_rows:
        print(f"per-row tokenizer loop (tokenizing only): {figures['loop_rows_per_s']:,} rows/s; "
              f"mk prep end to end: {figures['rows'] / med['mk']['seconds']:,.0f} rows/s")
    print(f"CPU: {model}, {os.cpu_count()} cores; flags: {flags}; load average {load[0]:.2f} -> {load[1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
