"""Exact match of a causal LM before and after `mk tune` (LoRA, the default) on
the tweets-as-instructions task: the untuned model's zero-shot answers against
the tuned model's, on the same test rows, measured the way `mk tune` measures
(greedy answers, max_new_tokens = longest reference + 4, compared stripped and
lower-cased), with test loss and perplexity beside.

DATA is a text-generation dataset artifact (`mk prep tweets --task generate
--tokenizer smollm2`); without it, one is built from the embedded tweets in the
same layout (tests/generation_data.py: the chat template around "Classify the
sentiment of this tweet as negative, neutral or positive.\\nTweet: …", the label
as the completion), `--rows` train/val/test.

    flock /tmp/mk-bench.lock python scripts/bench_tune_llm.py [DATA] [--model smollm2] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_dataset(dest: Path, sample: int, max_length: int) -> Path:
    """`mk prep tweets --task generate`: the embedded tweets as one-word sentiment instructions."""
    mk = Path(sys.executable).with_name("mk")
    subprocess.run([str(mk), "prep", "tweets", "--task", "generate", "--sample", str(sample), "--max-length",
                    str(max_length), "-o", str(dest), "-q"], check=True, stdout=subprocess.DEVNULL)
    return dest


def untuned(data: Path, model: str, rows: int, batch_size: int) -> dict:
    """The base model's test loss, perplexity and zero-shot exact match, and a few of its answers."""
    from contextlib import nullcontext

    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split
    from mk.core.training.causal import CausalLMTask
    from mk.core.training.task import evaluating
    from mk.core.training.train import TuneOptions

    art = open_artifact(data, kind="dataset")
    task = CausalLMTask(art, open_artifact(model, kind="model"), TuneOptions(batch_size=batch_size))
    lm = task.load_model("cpu", 0)
    test = load_split(art, "test")
    metrics = task.evaluate(lm, test, nullcontext, "untuned test")
    with evaluating(lm):
        metrics.update(task.exact_match(lm, test, min(rows, len(test["labels"]))))
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, nargs="?", help="text-generation dataset artifact")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sample", type=int, default=800, help="tweets sampled when making the dataset")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--exact-match-rows", type=int, default=150)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    from mk.core.console import configure
    from mk.core.cpu import this_cpu
    from mk.core.training.train import TuneOptions, tune

    configure(quiet=False)
    cpu, load_before = this_cpu().model, os.getloadavg()
    print(f"CPU: {cpu}; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-tune-llm-") as tmp:
        data = args.data or build_dataset(Path(tmp) / "data", args.sample, args.max_length)
        t0 = time.perf_counter()
        before = untuned(data, args.model, args.exact_match_rows, args.batch_size)
        t1 = time.perf_counter()
        result = tune(data, args.model, Path(tmp) / "tuned",
                      TuneOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device="cpu",
                                  exact_match_rows=args.exact_match_rows, save_every=10**9))
        t2 = time.perf_counter()
        log = [json.loads(l) for l in (Path(tmp) / "tuned" / "train_log.jsonl").read_text().splitlines()]
    step_s = statistics.median(e["step_s"] for e in log if e["event"] == "step")
    after = result["metrics"]
    out = {"model": args.model, "untuned": before, "tuned": after, "training": result["training"],
           "seconds": {"untuned_eval": round(t1 - t0, 1), "tune_and_eval": round(t2 - t1, 1),
                       "median_step": round(step_s, 3)},
           "cpu": cpu, "load_before": load_before, "load_after": os.getloadavg()}
    print(f"exact match on {after.get('exact_match_n')} test rows: untuned {before['exact_match']:.3f}, "
          f"tuned {after.get('exact_match', float('nan')):.3f}; test perplexity {before['perplexity']:.2f} → "
          f"{after['perplexity']:.2f}; {result['training']['steps']} steps in {result['training']['seconds']} s "
          f"(median {step_s:.2f} s/step); "
          f"CPU {cpu}, load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
