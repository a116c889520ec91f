#!/usr/bin/env python
"""Benchmark `mk prep` on a generated table of a million review-like rows.

Measures, in one run:
- `mk prep` end to end (read, clean, split, choose max length, tokenize, write)
  as a subprocess: wall time, rows per second, peak memory (the child's max RSS);
- a per-row tokenizer loop (`tokenizer(text, truncation=True, padding="max_length",
  max_length=L)` once per row into a preallocated array, the same tokenizer and
  max length) on the first --loop-rows rows, half before and half after
  `mk prep`: rows per second. Only the tokenizing is timed for the loop, none
  of the reading or writing, so the ratio is conservative.

Rows: words drawn by their frequency in the embedded tweets corpus; lengths
log-normal like real product/restaurant reviews (median 80 words, mean ≈ 110,
95th percentile ≈ 300); five star ratings, imbalanced like real review sites.

    .venv/bin/python scripts/bench_prep.py                  # 1,000,000 rows
    .venv/bin/python scripts/bench_prep.py --rows 100000    # a quicker look
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STARS = ["1", "2", "3", "4", "5"]
STAR_SHARE = [0.11, 0.06, 0.08, 0.20, 0.55]


def vocabulary(corpus: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Words of the embedded tweets corpus (or a copy of it) and their frequencies."""
    from mk.core.embedded import data_path

    raw = (corpus or data_path("tweets")).read_bytes().decode("utf-8", errors="replace")
    counts = collections.Counter(w for r in csv.DictReader(io.StringIO(raw)) for w in r["text"].split()
                                 if not w.startswith(("http", "@")))
    words, freq = zip(*counts.most_common())
    p = np.asarray(freq, np.float64)
    return np.asarray(words, object), p / p.sum()


def generate(path: Path, rows: int, corpus: Path | None = None, seed: int = 0, chunk: int = 50_000) -> None:
    import polars as pl

    rng = np.random.default_rng(seed)
    words, p = vocabulary(corpus)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            lengths = np.clip(rng.lognormal(np.log(80), 0.8, n).astype(np.int64), 1, 5000)
            ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
            cuts = np.cumsum(lengths)[:-1]
            texts = [" ".join(part) for part in np.split(words[ids], cuts)]
            stars = rng.choice(STARS, size=n, p=STAR_SHARE)
            pl.DataFrame({"review": texts, "stars": stars}).write_csv(f, include_header=start == 0)
            print(f"\rgenerating {start + n:,}/{rows:,}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    tmp.rename(path)


def run_prep(data: Path, out: Path, tokenizer: str) -> dict:
    """`mk prep` in a child process: its result, wall time and peak RSS."""
    mk = Path(sys.executable).with_name("mk")
    mk = [str(mk)] if mk.is_file() else [sys.executable, "-m", "mk.cli.main"]
    cmd = [*mk, "-q", "prep", str(data), "--tokenizer", tokenizer, "-o", str(out), "--force", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"mk prep failed:\n{stderr}")
    result = json.loads(stdout)
    return {"seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "result": result}


def per_row_loop(data: Path, tokenizer: str, max_length: int, rows: int) -> dict:
    import polars as pl
    from transformers import AutoTokenizer

    from mk.core.embedded import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(tokenizer)))
    texts = pl.read_csv(data, n_rows=rows)["review"].str.strip_chars().to_list()
    ids = np.zeros((len(texts), max_length), np.int32)
    mask = np.zeros((len(texts), max_length), np.int8)
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        enc = tok(text, truncation=True, max_length=max_length, padding="max_length")
        ids[i] = enc["input_ids"]
        mask[i] = enc["attention_mask"]
    seconds = time.perf_counter() - t0
    return {"rows": len(texts), "seconds": seconds, "rows_per_s": len(texts) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--loop-rows", type=int, default=20_000, help="rows timed in the per-row loop")
    ap.add_argument("--tokenizer", default="minilm")
    ap.add_argument("--max-length", type=int, default=472,
                    help="the loop's max length: what mk prep chooses for the 1M rows (95th percentile)")
    ap.add_argument("--workdir", type=Path, default=Path("build/bench_prep"),
                    help="where the generated table (kept for reruns) and the artifact go")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--corpus", type=Path, help="the tweets CSV to draw words from (default: the embedded one)")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"reviews-{args.rows}.csv"
    if not data.exists():
        generate(data, args.rows, args.corpus)
    load_before = os.getloadavg()[0]
    # the loop runs before and after mk prep (half the rows each), so that a change in the
    # machine's load during the run weighs on both sides alike
    before = per_row_loop(data, args.tokenizer, args.max_length, args.loop_rows // 2)
    prep = run_prep(data, args.workdir / "data", args.tokenizer)
    res = prep["result"]
    kept = sum(res["splits"].values())
    after = per_row_loop(data, args.tokenizer, args.max_length, args.loop_rows // 2)
    loop = {"rows": before["rows"] + after["rows"], "seconds": before["seconds"] + after["seconds"]}
    loop["rows_per_s"] = loop["rows"] / loop["seconds"]
    prep_rate = res["cleaning"]["rows_read"] / prep["seconds"]
    figures = {
        "rows": res["cleaning"]["rows_read"], "rows_kept": kept, "csv_bytes": data.stat().st_size,
        "max_length": res["max_length"], "truncation_rate": res["truncation_rate"],
        "prep_seconds": round(prep["seconds"], 1), "prep_rows_per_s": round(prep_rate),
        "prep_peak_rss_mb": round(prep["peak_rss_bytes"] / 2**20),
        "loop_rows": loop["rows"], "loop_rows_per_s": round(loop["rows_per_s"]),
        "speedup": round(prep_rate / loop["rows_per_s"], 2),
        "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    shutil.rmtree(args.workdir / "data", ignore_errors=True)
    print(f"mk prep: {figures['rows']:,} rows ({figures['csv_bytes'] / 2**20:.0f} MB CSV) in "
          f"{figures['prep_seconds']} s = {figures['prep_rows_per_s']:,} rows/s end to end, "
          f"peak RSS {figures['prep_peak_rss_mb']:,} MB; max length {figures['max_length']}, "
          f"truncated {figures['truncation_rate']:.1%}")
    print(f"per-row tokenizer loop: {figures['loop_rows_per_s']:,} rows/s (tokenizing only, "
          f"{figures['loop_rows']:,} rows)")
    print(f"speed-up: {figures['speedup']}x on {figures['cpus']} CPUs, load average "
          f"{figures['load_average'][0]} -> {figures['load_average'][1]} (target >= 5x); "
          f"peak memory {'under' if figures['prep_peak_rss_mb'] < 2048 else 'OVER'} 2 GB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
