"""`mk tune`: fine-tune a model on a dataset artifact (full, LoRA or distillation;
a causal LM on a text-generation dataset, LoRA by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import read_input, show


@command("tune")
def tune(
    data: Annotated[Optional[Path], options.input_argument("Dataset artifact (from `mk prep`).")] = None,
    output: options.Output = ...,
    model: Annotated[str, typer.Option("-m", "--model", help="Model to fine-tune: a folder, an artifact, a .gguf "
                                       "file, `minilm` (the embedded encoder) or `smollm2` (the embedded "
                                       "causal LM, for text-generation datasets).")] = "minilm",
    epochs: Annotated[float, typer.Option("--epochs", help="Passes over the training split (may be "
                                          "fractional).")] = 3.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many "
                                                     "optimizer steps (overrides --epochs).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate [default: 5e-5; 5e-4 "
                                                "with LoRA].")] = None,
    batch_size: options.BatchSize = 32,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer "
                                            "step.")] = 1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0, help="AdamW weight decay (not on "
                                                "biases and norms).")] = 0.01,
    warmup: Annotated[float, typer.Option("--warmup", min=0, help="Warm-up: a fraction of the steps (< 1) "
                                          "or a number of steps.")] = 0.1,
    schedule: Annotated[str, typer.Option("--schedule", help="Decay after warm-up: linear, cosine or "
                                          "constant.")] = "linear",
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", min=0, help="Clip gradients to this "
                                                 "norm (0: no clipping).")] = 1.0,
    patience: Annotated[Optional[int], typer.Option("--patience", min=1, help="Stop after N epochs without "
                                                    "a better val macro-F1 (a causal LM: val loss); keep the "
                                                    "best weights.")] = None,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16, else fp16, on CUDA; fp32 on "
                                           "CPU), fp32, bf16 or fp16.")] = "auto",
    lora: Annotated[Optional[int], typer.Option("--lora", min=1, metavar="R", help="Train LoRA adapters of "
                                                "rank R instead of every weight [default for causal LMs: "
                                                "16].")] = None,
    full: Annotated[bool, typer.Option("--full", help="Train every weight (the default for encoders; "
                                       "causal LMs train LoRA adapters unless --full).")] = False,
    lora_alpha: Annotated[Optional[int], typer.Option("--lora-alpha", min=1, help="LoRA scaling alpha "
                                                      "[default: 2R].")] = None,
    no_merge: Annotated[bool, typer.Option("--no-merge", help="Keep the LoRA adapter apart instead of "
                                           "merging it into the weights.")] = False,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Distil from this fine-tuned model "
                                                   "(any size; only logits are matched).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Distillation temperature.")] = 2.0,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of the distillation loss (1 - alpha: "
                                         "the label loss).")] = 0.5,
    new_head: Annotated[bool, typer.Option("--new-head", help="Replace a trained classification head "
                                           "with a fresh one for the dataset's labels.")] = False,
    exact_match_rows: Annotated[int, typer.Option("--exact-match-rows", min=0, metavar="N", help="Causal LM "
                                                  "on a dataset with answers: greedy-answer the first N test "
                                                  "rows for exact match (0: none).")] = 200,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Checkpoint every N steps into "
                                            "OUT.ckpt/.")] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in "
                                         "OUT.ckpt/.")] = False,
    device: options.Device = "auto",
    seed: options.Seed = 0,
    force: options.Force = False,
    as_json: options.Json = False,
):
    """Fine-tune MODEL on the dataset DATA and write a model artifact in Hugging Face layout.

    Evaluates on the val split after every epoch and on the test split at the end
    (metrics in mk.json; a JSONL log of every step in OUT/train_log.jsonl).

    Checkpoints go to OUT.ckpt/ every --save-every steps and on Ctrl-C / SIGTERM
    (exit 130); --resume continues to the same weights. Under
    `torchrun --nproc-per-node N -m mk.cli.main tune …` it trains with DDP.

    A text-generation dataset (`mk prep --task generate`) takes a causal LM
    (`-m smollm2`, a folder or a .gguf file): next-token loss on the completion
    tokens, LoRA of rank 16 on the attention and MLP projections unless --lora R
    or --full, merged into plain weights unless --no-merge; evaluated by loss and
    perplexity, plus the exact match of greedy answers when the rows have answers,
    e.g. `mk tune tweets-gen -m smollm2 -o tuned --epochs 1`.
    """
    from mk.core.training.train import TuneOptions, tune as run_tune

    opts = TuneOptions(
        epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
        weight_decay=weight_decay, warmup=warmup, schedule=schedule, max_grad_norm=max_grad_norm,
        patience=patience, precision=precision, seed=seed, save_every=save_every, device=device,
        lora=lora, full=full, lora_alpha=lora_alpha, merge=not no_merge, teacher=teacher, temperature=temperature,
        alpha=alpha, new_head=new_head, resume=resume, exact_match_rows=exact_match_rows)
    result = run_tune(read_input(data, "dataset"), model, output, opts, force=force)
    if result is not None:  # rank 0 of a distributed run, or the only process
        show(Path(result["path"]), result, as_json)
