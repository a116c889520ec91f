#!/usr/bin/env python
"""The ceiling of `mk prep`'s tokenizing on this machine: the Rust tokenizer's
speed per row and in batches, with 1 and with all cores.

`mk prep` tokenizes with `encode_batch`, which spreads a batch over the cores
(Rayon threads); a per-row loop calls the tokenizer once a row. This prints
rows/s of both, each in a fresh process with RAYON_NUM_THREADS set, medians of
--repeats, on review-like rows drawn as in scripts/bench_prep.py — so it shows
how much of a speed-up over the per-row loop the cores allow at all.

    .venv/bin/python scripts/bench_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_prep import vocabulary  # noqa: E402  (the same row lengths and words as the prep benchmark)


def texts(rows: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words, p = vocabulary()
    lengths = np.clip(rng.lognormal(np.log(80), 0.8, rows).astype(np.int64), 1, 5000)
    ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
    return [" ".join(part) for part in np.split(words[ids], np.cumsum(lengths)[:-1])]


def measure(rows: int, repeats: int) -> dict:
    """In this process (RAYON_NUM_THREADS already set): rows/s per row and batched."""
    from tokenizers import Tokenizer

    from mk.core.embedded import model_path

    tok = Tokenizer.from_file(str(model_path("minilm") / "tokenizer.json"))
    tok.enable_truncation(472)
    data = texts(rows)
    tok.encode_batch(data[:200])  # warm-up: thread pool, caches
    per_row, batched = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for text in data:
            tok.encode(text)
        per_row.append(rows / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(0, rows, 4096):
            tok.encode_batch(data[i:i + 4096])
        batched.append(rows / (time.perf_counter() - t))
    return {"per_row": statistics.median(per_row), "batched": statistics.median(batched)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.rows, args.repeats)))
        return
    cores = os.cpu_count() or 1
    results = {}
    for threads in sorted({1, cores}):
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
        out = subprocess.run([sys.executable, __file__, "--child", "--rows", str(args.rows),
                              "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        results[threads] = json.loads(out.stdout)
    base = results[1]["per_row"]
    print(f"{args.rows:,} review-like rows, {cores} cores, medians of {args.repeats}")
    for threads, r in results.items():
        print(f"  {threads} thread(s): per-row encode {r['per_row']:8,.0f} rows/s   "
              f"encode_batch {r['batched']:8,.0f} rows/s   ({r['batched'] / base:.2f}× the 1-thread per-row loop)")


if __name__ == "__main__":
    main()
