"""Time training steps of `mk tune` against a plain transformers `Trainer`.

Same model (a fresh head on the same pretrained encoder, same seed), same data
(the same batches in the same order: the Trainer gets the examples in mk's
epoch order and samples them sequentially, with dynamic padding as mk does),
same batch size, precision, learning-rate schedule and clipping, in one
process, segments interleaved (mk, Trainer, mk, Trainer, …) so that drift and
other load hit both alike. A step's time is the wall time between the ends of
consecutive optimizer steps, so each side pays everything its loop does
(batching, forward, backward, clipping, optimizer, scheduler, logging); the
first `--warmup` steps of each segment are left out. Reports medians and
spreads and the ratio mk / Trainer (target ≤ 1.05).

A text-generation dataset (`mk prep --task generate`) times a causal LM: mk's
default LoRA (rank 16, alpha 32, dropout 0.1 on the attention and MLP
projections) against the Trainer with the same peft LoraConfig, labels -100 on
the prompts, the Trainer's own causal-LM loss.

    python scripts/bench_tune.py DATA [--model minilm] [--batch-size 32] [--steps 20] [--repeats 3]
    flock /tmp/mk-bench.lock python scripts/bench_tune.py GEN_DATA --model smollm2 --batch-size 8 --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def subset_dataset(data: Path, dest: Path, n_train: int) -> Path:
    """A copy of the dataset with `n_train` training rows and tiny val/test splits,
    so that the per-epoch evaluation mk runs costs little wall time."""
    from mk.core.artifact import open_artifact, write_manifest
    from mk.core.dataset import load_split, save_split

    art = open_artifact(data, kind="dataset")
    dest.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", 16), ("test", 16)):
        save_split(dest, split, load_split(art, split, limit=n))
    for f in art.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "mk.json":
            shutil.copy2(f, dest / f.name)
    write_manifest(dest, kind="dataset", format="safetensors", task=art.task, labels=art.labels,
                   **{k: art.manifest[k] for k in ("generation",) if k in art.manifest})
    return dest


def step_deltas(ends: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def run_mk(data: Path, model: str, work: Path, args, steps: int) -> list[float]:
    from mk.core.training.train import TuneOptions, tune

    out = work / f"mk-{time.monotonic_ns()}"
    opts = TuneOptions(max_steps=steps, batch_size=args.batch_size, seed=args.seed, device=args.device,
                       precision=args.precision, save_every=10**9, lr=5e-5, warmup=0.1, exact_match_rows=0)
    tune(data, model, out, opts)
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    ends = [e["elapsed_s"] for e in log if e["event"] == "step"]
    shutil.rmtree(out, ignore_errors=True)
    return ends


def trainer_rows(train: dict, order: np.ndarray, causal: bool) -> list[dict]:
    """mk's epoch order, without padding: the collator pads each batch like mk cuts it."""
    rows = []
    for i in order:
        n = int(train["attention_mask"][i].sum())
        labels = train["labels"][i, :n].tolist() if causal else int(train["labels"][i])
        rows.append({"input_ids": train["input_ids"][i, :n].astype(np.int64).tolist(),
                     "attention_mask": [1] * n, "labels": labels})
    return rows


def trainer_model(art, model_dir: Path, causal: bool):
    """The Trainer's model: a fresh head on the encoder, or the causal LM under
    the peft LoRA mk applies by default."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if not causal:
        labels = art.labels
        return AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
            local_files_only=True)
    import torch
    from peft import LoraConfig, get_peft_model

    from mk.core.training.causal import DEFAULT_LORA
    from mk.core.training.lora import target_modules

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    model.config.use_cache = False  # as in training recipes: no KV cache built in training forwards
    config = LoraConfig(r=DEFAULT_LORA, lora_alpha=2 * DEFAULT_LORA, lora_dropout=0.1, bias="none",
                        target_modules=target_modules(model.config.model_type), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_trainer(data: Path, model_dir: Path, work: Path, args, steps: int, precision: str, device: str
                ) -> list[float]:
    import torch
    import transformers
    from torch.utils.data import SequentialSampler
    from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split
    from mk.core.training.train import epoch_order

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    art = open_artifact(data, kind="dataset")
    causal = art.task == "text-generation"
    train = load_split(art, "train")
    rows = trainer_rows(train, epoch_order(args.seed, 0, len(train["labels"])), causal)
    torch.manual_seed(args.seed)
    model = trainer_model(art, model_dir, causal)
    tok = AutoTokenizer.from_pretrained(str(data))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    collator = DataCollatorForSeq2Seq(tok, padding=True) if causal else DataCollatorWithPadding(tok)

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    targs = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size, max_steps=steps,
        learning_rate=5e-5, weight_decay=0.01, warmup_steps=int(0.1 * steps), lr_scheduler_type="linear", max_grad_norm=1.0,
        seed=args.seed, bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not device.startswith("cuda"),
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        logging_strategy="no")
    trainer = InOrder(model=model, args=targs, train_dataset=rows, data_collator=collator,
                      callbacks=[Clock()])
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its summary on stdout
        trainer.train()
    del trainer, model
    return ends


def summarize(xs: list[float]) -> dict:
    q = np.percentile(xs, [25, 50, 75])
    return {"median_s": float(q[1]), "p25_s": float(q[0]), "p75_s": float(q[2]), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="dataset artifact (from `mk prep`)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="measured steps per segment")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each segment")
    ap.add_argument("--repeats", type=int, default=3, help="segments per side, interleaved")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    import torch
    import transformers

    from mk.core.console import configure
    from mk.core.cpu import this_cpu
    from mk.core.device import resolve_device
    from mk.core.embedded import resolve_model
    from mk.core.training.train import resolve_precision

    configure(quiet=True)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model_dir = resolve_model(args.model)
    load_before = os.getloadavg()
    print(f"CPU: {this_cpu().model}; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}",
          file=sys.stderr)
    total = args.steps + args.warmup + 1
    mk_times, hf_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tune-") as tmp:
        work = Path(tmp)
        data = subset_dataset(args.data, work / "data", total * args.batch_size)
        for r in range(args.repeats):
            ends = run_mk(data, args.model, work, args, total)
            mk_times += step_deltas(ends, args.warmup)
            ends = run_trainer(data, model_dir, work, args, total, precision, device)
            hf_times += step_deltas(ends, args.warmup)
            print(f"repeat {r + 1}/{args.repeats}: mk {statistics.median(mk_times) * 1e3:.1f} ms/step, "
                  f"Trainer {statistics.median(hf_times) * 1e3:.1f} ms/step", file=sys.stderr)
    mk, hf = summarize(mk_times), summarize(hf_times)
    result = {
        "mk": mk, "trainer": hf, "ratio_mk_over_trainer": mk["median_s"] / hf["median_s"], "target": 1.05,
        "batch_size": args.batch_size, "precision": precision, "device": device, "model": args.model,
        "steps_per_segment": args.steps, "repeats": args.repeats,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "cpu": this_cpu().model,
                        "load_before": load_before, "load_after": os.getloadavg(),
                        "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
    }
    print(f"{'':10}{'median ms/step':>16}{'p25':>10}{'p75':>10}", file=sys.stderr)
    for name, s in (("mk", mk), ("Trainer", hf)):
        print(f"{name:10}{s['median_s'] * 1e3:16.1f}{s['p25_s'] * 1e3:10.1f}{s['p75_s'] * 1e3:10.1f}",
              file=sys.stderr)
    print(f"mk / Trainer = {result['ratio_mk_over_trainer']:.3f} (target ≤ 1.05); CPU {this_cpu().model}, "
          f"load average after {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
