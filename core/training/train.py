"""`mk tune`: fine-tune a pretrained model on a dataset artifact, without ever
losing work.

The loop is plain PyTorch: AdamW, warm-up then linear or cosine decay, gradient
accumulation and clipping, autocast on CUDA, evaluation on the validation split
after each epoch (through the same evaluation as `mk bench`), early stopping
that keeps the best weights.

Never lose work: every `--save-every` optimizer steps, and on SIGINT/SIGTERM,
the model, optimizer, scheduler, RNG states and the step reached go to
`OUT.ckpt/` beside the output (not inside the output's temporary folder, which
a failure removes). The order of examples is a pure function of the seed and
the epoch, so the step number is the data position, and `--resume` continues
to the very weights an uninterrupted run reaches.

Several GPUs: under `torchrun` / `accelerate launch` (RANK, WORLD_SIZE,
LOCAL_RANK in the environment) the model runs under DDP. Each optimizer step
takes the next `batch_size × grad_accum × world_size` examples of the epoch's
order and every rank takes its share; the loss is scaled so the averaged
gradient is the mean over the whole global batch, i.e. the same step a single
process makes with that global batch. Only rank 0 writes.

The pieces: `Trainer` checks the inputs and runs the loop; `Stepper` takes one
optimizer step; `Validation` evaluates after each epoch and stops early;
`TrainState` (in `checkpoint.py`) is where the run stands, and `Checkpointer`
there saves and restores it; `train_log.py` writes the JSONL log;
`distributed.py` holds the process group and its collectives.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mk.core.artifact import Artifact, open_artifact, write_manifest
from mk.core.outputs import atomic_output, check_output
from mk.core.console import log, progress
from mk.core.dataset import load_split, num_rows, open_dataset, trim_padding
from mk.core.errors import INTERRUPTED, BadInput, MkError
from mk.core.runtime.torch_runtime import TorchRuntime, accepts_token_types
from mk.core.tokenizer_match import check_same_tokenizer, has_tokenizer
from mk.core.training.checkpoint import Checkpointer, TrainState
from mk.core.training.distributed import Dist, check_ranks_agree
from mk.core.training.train_log import LOG_NAME, TrainLog

# Options that must match for --resume to continue the same run.
RUN_KEYS = ("epochs", "max_steps", "lr", "batch_size", "grad_accum", "weight_decay", "warmup", "schedule",
            "max_grad_norm", "patience", "seed", "lora", "lora_alpha", "lora_dropout", "temperature",
            "alpha", "new_head")


@dataclass
class TuneOptions:
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float | None = None             # 5e-5 full fine-tuning, 5e-4 LoRA
    batch_size: int = 32                # per process, per micro-batch
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup: float = 0.1                 # < 1: fraction of the steps; ≥ 1: steps
    schedule: str = "linear"            # linear | cosine | constant
    max_grad_norm: float = 1.0          # 0 turns clipping off
    patience: int | None = None         # epochs without a better val macro-F1 before stopping
    precision: str = "auto"             # auto | fp32 | bf16 | fp16
    seed: int = 0
    save_every: int = 200
    device: str = "auto"
    lora: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.1
    merge: bool = True
    teacher: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    new_head: bool = False
    resume: bool = False
    eval_batch_size: int = 64

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.lora else 5e-5)

    def validate(self) -> None:
        problems = []
        numbers = {"--epochs": self.epochs, "--lr": self.learning_rate(), "--weight-decay": self.weight_decay,
                   "--warmup": self.warmup, "--max-grad-norm": self.max_grad_norm,
                   "--temperature": self.temperature, "--alpha": self.alpha}
        problems += [f"{opt} must be a finite number, got {v}" for opt, v in numbers.items() if not math.isfinite(v)]
        if problems:
            raise BadInput("; ".join(problems))
        if self.epochs <= 0 and not self.max_steps:
            problems.append("--epochs must be > 0 (or give --max-steps)")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("--max-steps must be ≥ 1")
        if self.schedule not in ("linear", "cosine", "constant"):
            problems.append(f"--schedule {self.schedule!r}: expected linear, cosine or constant")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"--precision {self.precision!r}: expected auto, fp32, bf16 or fp16")
        if not 0 <= self.alpha <= 1:
            problems.append("--alpha must be between 0 and 1")
        if not 0 <= self.seed < 2 ** 32:
            problems.append(f"--seed {self.seed}: must be between 0 and {2 ** 32 - 1}")
        if self.temperature <= 0:
            problems.append("--temperature must be > 0")
        if self.learning_rate() <= 0:
            problems.append("--lr must be > 0")
        if self.warmup < 0:
            problems.append("--warmup must be ≥ 0")
        if self.lora_alpha is not None and not self.lora:
            problems.append("--lora-alpha only applies with --lora R")
        if self.save_every < 1:
            problems.append("--save-every must be ≥ 1")
        if self.patience is not None and self.patience < 1:
            problems.append("--patience must be ≥ 1")
        if problems:
            raise BadInput("; ".join(problems))


# ---------------------------------------------------------------------------
# Checks at the boundary: tokenizer, labels, teacher

def _config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{Path(path) / 'config.json'}: unreadable model config ({e})") from None


def _head(config: dict) -> tuple[bool, list[str]]:
    """(whether the model already has a classification head, its label names)."""
    archs = config.get("architectures") or []
    has_head = any("ForSequenceClassification" in a or "ForImageClassification" in a for a in archs)
    id2label = config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)]
    if has_head and not names:  # transformers' default: two labels, unnamed
        names = [f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))]
    return has_head, names


def _default_names(names: list[str]) -> bool:
    return all(n == f"LABEL_{i}" for i, n in enumerate(names))


def plan_head(model_path: Path, labels: list[str], new_head: bool) -> dict:
    """How to get a head for the dataset's labels: keep the model's, or make one.

    A base encoder gets a fresh head. A classifier keeps its head when it has as
    many labels as the dataset; re-initialising a trained head takes --new-head."""
    has_head, names = _head(_config(model_path))
    if not has_head or new_head:
        return {"fresh": True, "ignore_mismatched_sizes": has_head}
    if len(names) != len(labels):
        raise BadInput(f"{model_path}: its classification head has {len(names)} labels "
                       f"({', '.join(map(str, names))}), the dataset has {len(labels)} ({', '.join(labels)})",
                       hint="pass --new-head to replace the trained head with a fresh one of the dataset's size")
    if not _default_names(names) and list(names) != list(labels):
        raise BadInput(f"{model_path}: its head's labels ({', '.join(map(str, names))}) differ from the "
                       f"dataset's ({', '.join(labels)})",
                       hint="pass --new-head to train a fresh head for the dataset's labels")
    return {"fresh": False, "ignore_mismatched_sizes": False}


def check_teacher(teacher: Artifact, dataset: Artifact, labels: list[str]) -> None:
    if teacher.format != "safetensors":
        raise BadInput(f"{teacher.path}: a teacher must be a safetensors model (this one is {teacher.format})")
    has_head, names = _head(_config(teacher.path))
    if not has_head:
        raise BadInput(f"{teacher.path}: the teacher has no classification head",
                       hint="distil from a fine-tuned classifier (the output of `mk tune`)")
    if len(names) != len(labels) or (not _default_names(names) and list(names) != list(labels)):
        differ = "in another order than" if sorted(map(str, names)) == sorted(labels) else "differ from"
        raise BadInput(f"{teacher.path}: the teacher predicts {len(names)} labels ({', '.join(map(str, names))}), "
                       f"the dataset has {len(labels)} ({', '.join(labels)})" if len(names) != len(labels) else
                       f"{teacher.path}: the teacher's labels ({', '.join(map(str, names))}) {differ} the "
                       f"dataset's ({', '.join(labels)})", hint="distil from a teacher tuned on this dataset's labels")
    if dataset.task != "image-classification" and has_tokenizer(teacher.path) and has_tokenizer(dataset.path):
        check_same_tokenizer(dataset, teacher.path, "teacher")


def _check_split(name: str, split: dict, labels: list[str], vocab: int | None, positions: int | None,
                 path: Path) -> None:
    y = split["labels"]
    if len(y) and (y.min() < 0 or y.max() >= len(labels)):
        raise BadInput(f"{path}: {name} split has label ids outside 0..{len(labels) - 1}")
    if "input_ids" in split and vocab and len(y) and int(split["input_ids"].max()) >= vocab:
        raise BadInput(f"{path}: {name} split holds token id {int(split['input_ids'].max())}, beyond the "
                       f"model's vocabulary of {vocab}",
                       hint="prepare the data with the model's tokenizer")
    if "input_ids" in split and positions and split["input_ids"].shape[1] > positions:
        raise BadInput(f"{path}: sequences of {split['input_ids'].shape[1]} tokens exceed the model's "
                       f"limit of {positions}", hint=f"prepare the data with --max-length {positions}")


# ---------------------------------------------------------------------------
# Training pieces

def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training examples in an epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def lr_lambda(schedule: str, warmup_steps: int, total: int):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress_ = (step - warmup_steps) / max(1, total - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))
        return max(0.0, 1.0 - progress_)
    return f


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (as BERT was trained)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_batch(split: dict, idx: np.ndarray, device, accepts_token_types: bool = True):
    """Rows `idx` of a split as tensors on the device, cut to their longest sequence."""
    import torch

    inputs = trim_padding({k: v[idx] for k, v in split.items() if k != "labels"})
    if not accepts_token_types:
        inputs.pop("token_type_ids", None)
    feed = {k: (torch.from_numpy(np.ascontiguousarray(v)).float() if k == "pixel_values"
                else torch.from_numpy(np.ascontiguousarray(v)).long()).to(device, non_blocking=True)
            for k, v in inputs.items()}
    labels = torch.from_numpy(np.ascontiguousarray(split["labels"][idx])).long().to(device, non_blocking=True)
    return feed, labels


def _base_model(model):
    """The transformers model under a peft wrapper (for forward's signature)."""
    get = getattr(model, "get_base_model", None)
    return get() if get else model


def evaluate_model(model, split: dict, num_labels: int, device, autocast, batch_size: int,
                   description: str) -> dict:
    from mk.core.evaluation import evaluate

    was_training = model.training
    model.eval()
    try:
        with autocast():
            return evaluate(TorchRuntime(model, device), split, num_labels, batch_size,
                            description)
    finally:
        model.train(was_training)


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            raise BadInput("--precision fp16 needs a CUDA device", hint="use bf16 or fp32 on the CPU")
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_factory(precision: str, device: str):
    import torch

    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return lambda: torch.autocast(device_type=kind, dtype=dtype)



# ---------------------------------------------------------------------------
# Signals: SIGINT / SIGTERM ask for a checkpoint at the next step boundary

class StopRequest:
    def __init__(self):
        self.signum = None

    def __bool__(self):
        return self.signum is not None

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.signum is not None:  # a second signal: stop now, the last checkpoint stays
                raise KeyboardInterrupt()
            self.signum = signum
            log.warning("%s: saving a checkpoint at the end of this step, then stopping "
                        "(signal again to stop at once)", signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)




# ---------------------------------------------------------------------------
# One optimizer step

@dataclass
class Plan:
    """The run's length in optimizer steps and the examples each step takes."""
    examples: int
    global_batch: int                   # batch_size × grad_accum × world_size
    steps_per_epoch: int
    total: int
    warmup: int

    @classmethod
    def of(cls, examples: int, opts: TuneOptions, world: int) -> "Plan":
        global_batch = opts.batch_size * opts.grad_accum * world
        steps_per_epoch = math.ceil(examples / global_batch)
        total = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
        warmup = int(opts.warmup * total) if opts.warmup < 1 else int(opts.warmup)
        return cls(examples, global_batch, steps_per_epoch, total, warmup)


@dataclass
class StepResult:
    loss: float                         # the mean over the global batch
    grad_norm: float                    # before clipping; 0 with clipping off
    lr: float                           # the learning rate the step used
    examples: int
    seconds: float
    stop: bool                          # some rank was asked to stop


class Stepper:
    """The model with its optimizer, scheduler and gradient scaler, taking one
    optimizer step at a time over a global batch of examples."""

    def __init__(self, model, teacher, split: dict, opts: TuneOptions, dist: Dist, device: str,
                 precision: str, plan: Plan, last_checkpoint: Path):
        import torch

        self.model, self.runner, self.teacher = model, model, teacher
        self.split, self.opts, self.dist, self.device = split, opts, dist, device
        self.precision, self.last_checkpoint = precision, last_checkpoint
        self.params = [p for p in model.parameters() if p.requires_grad]
        lr = opts.learning_rate()
        try:  # the fused kernel: ~5x faster than the per-tensor loop on CPU as well as on CUDA
            self.optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=lr, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(opts.schedule, plan.warmup, plan.total))
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.autocast = autocast_factory(precision, device)
        self.accepts_tt = accepts_token_types(model)
        self.flags = torch.zeros(3, dtype=torch.float64, device=device)

    @property
    def parts(self) -> tuple:
        """What a checkpoint holds: model, optimizer, scheduler, scaler."""
        return self.model, self.optimizer, self.scheduler, self.scaler

    def wrap(self) -> None:
        """Run the model under DDP from now on (after the checkpoint is restored)."""
        self.runner = self.dist.wrap(self.model, self.device)

    def step(self, number: int, idx: np.ndarray, stop: "StopRequest") -> StepResult:
        """Optimizer step `number` on the examples `idx` (the whole global batch;
        this rank takes its share). Every rank agrees on the loss, on a non-finite
        loss or gradient (an error, before the weights change) and on a stop."""
        import torch

        t0 = time.perf_counter()
        loss_sum = self._backward(idx)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, self.opts.max_grad_norm)
                     if self.opts.max_grad_norm > 0 else torch.zeros((), device=self.device))
        flags = self.flags
        flags[0] = loss_sum
        flags[1] = 0.0 if torch.isfinite(loss_sum) and (
            self.scaler is not None or torch.isfinite(grad_norm)) else 1.0
        flags[2] = 1.0 if stop else 0.0
        self.dist.sum(flags)
        total_loss, bad, stopping = flags.tolist()
        if bad:
            raise MkError(self._nonfinite_message(number, total_loss, grad_norm), hint=self._nonfinite_hint())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return StepResult(loss=total_loss / len(idx), grad_norm=float(grad_norm), lr=lr, examples=len(idx),
                          seconds=time.perf_counter() - t0, stop=bool(stopping))

    def _backward(self, idx: np.ndarray):
        """Gradients of this rank's share of `idx`, micro-batch by micro-batch;
        the sum of its per-example losses."""
        import torch

        from mk.core.training.distill import per_example_loss

        opts, dist = self.opts, self.dist
        shard = idx[dist.rank::dist.world]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(opts.grad_accum):
            mb = shard[i * opts.batch_size:(i + 1) * opts.batch_size]
            if len(mb) == 0 and not dist.active:
                continue
            last = i == opts.grad_accum - 1
            with self.runner.no_sync() if dist.active and not last else nullcontext():
                feed, labels = make_batch(self.split, mb if len(mb) else idx[:1], self.device, self.accepts_tt)
                with self.autocast():
                    logits = self.runner(**feed).logits
                    t_logits = self.teacher(**feed).logits if self.teacher is not None else None
                if len(mb):
                    per = per_example_loss(logits, labels, t_logits, opts.temperature, opts.alpha)
                    loss = per.sum() * (dist.world / len(idx))
                    loss_sum += per.detach().sum()
                else:  # an empty share still joins the gradient all-reduce
                    loss = logits.sum() * 0.0
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss_sum

    def _nonfinite_message(self, step: int, loss: float, grad_norm) -> str:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {float(grad_norm)}"
        where = (f"the last good checkpoint is {self.last_checkpoint}"
                 if self.last_checkpoint.is_file() else "no checkpoint was written yet")
        return f"non-finite {what} at step {step}; training stopped, {where}"

    def _nonfinite_hint(self) -> str:
        lr = self.opts.learning_rate()
        return (f"lower the learning rate (--lr {lr / 10:g}), keep clipping on (--max-grad-norm 1)"
                + (", or use --precision bf16/fp32" if self.precision == "fp16" else "")
                + "; --resume continues from the checkpoint")


# ---------------------------------------------------------------------------
# Validation after each epoch, and early stopping

class Validation:
    """Evaluates on the validation split after each epoch; with --patience, stops
    after that many epochs without a better macro-F1 and keeps the best weights
    (in memory, and in best.pt for --resume)."""

    def __init__(self, split: dict, num_labels: int, opts: TuneOptions, device: str, dist: Dist,
                 checkpoints: Checkpointer):
        self.split, self.num_labels, self.opts, self.device = split, num_labels, opts, device
        self.dist, self.checkpoints = dist, checkpoints
        self.best_weights = None

    def __call__(self, model, autocast, state: TrainState, epoch: int, train_log: TrainLog) -> None:
        opts = self.opts
        metrics = evaluate_model(model, self.split, self.num_labels, self.device, autocast,
                                 opts.eval_batch_size, f"epoch {epoch} val")
        metrics = self.dist.from_main(metrics)  # every rank decides alike, on rank 0's figures
        better = state.best is None or metrics["macro_f1"] > state.best
        if better:
            state.best, state.best_step, state.bad_evals = metrics["macro_f1"], state.step, 0
            if opts.patience:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                self.checkpoints.save_best(self.best_weights)
        else:
            state.bad_evals += 1
        entry = {"epoch": epoch, "step": state.step, "val_accuracy": metrics["accuracy"],
                 "val_macro_f1": metrics["macro_f1"], "best": better}
        state.history.append(entry)
        train_log.write("eval", **entry, time=time.time())
        log.info("epoch %d: val accuracy %.4f, macro-F1 %.4f%s", epoch, metrics["accuracy"],
                 metrics["macro_f1"], " (best)" if better else f" (best {state.best:.4f})")
        if opts.patience and state.bad_evals >= opts.patience:
            log.info("early stop: no better val macro-F1 for %d epochs; keeping the weights of step %d",
                     state.bad_evals, state.best_step)
            state.stopped_early = True

    def keep_best(self, model, state: TrainState) -> None:
        """With --patience, go back to the best weights if training went past them."""
        if self.opts.patience and self.best_weights is not None and state.best_step != state.step:
            model.load_state_dict(self.best_weights)


# ---------------------------------------------------------------------------
# The run

class Trainer:
    """One `mk tune` run. `run()` returns the result dict on rank 0, None elsewhere."""

    def __init__(self, data, model, out, opts: TuneOptions, force: bool = False):
        opts.validate()
        self.opts, self.force = opts, force
        self.dist = Dist.from_env()
        if not self.dist.main:  # one voice on stderr: rank 0's
            import logging
            log.setLevel(logging.WARNING)
        self.out = Path(out)
        check_output(self.out, force)
        self.checkpoints = Checkpointer(self.out, self.dist)
        self.dataset = open_dataset(data)
        self.base = open_artifact(model, kind="model")
        self.model_ref = str(model)
        if self.base.format != "safetensors":
            raise BadInput(f"{self.base.path}: can only fine-tune a safetensors model (this one is "
                           f"{self.base.format})", hint="tune the model it was exported from")
        self.labels = [str(l) for l in self.dataset.labels]
        if len(self.labels) < 2:
            raise BadInput(f"{self.dataset.path}: needs at least two labels, has {len(self.labels)}")
        self.task = self.dataset.task or "text-classification"
        self.head = plan_head(self.base.path, self.labels, opts.new_head)
        self.tokenizer = (None if self.task == "image-classification"
                          else check_same_tokenizer(self.dataset, self.base.path))
        self.teacher_art = None
        if opts.teacher:
            self.teacher_art = open_artifact(opts.teacher, kind="model")
            check_teacher(self.teacher_art, self.dataset, self.labels)
        check_output(self.out, force, inputs=[self.dataset.path, self.base.path,
                                              self.teacher_art.path if self.teacher_art else None])
        self.checkpoints.open(self.run_config(), opts.resume, force)

    def run_config(self) -> dict:
        """What must match for --resume to continue the same run."""
        d = asdict(self.opts)
        cfg = {k: d[k] for k in RUN_KEYS}
        cfg["lr"] = self.opts.learning_rate()
        cfg["model"] = str(self.base.path.resolve())
        cfg["dataset"] = self.dataset.digest()
        cfg["teacher"] = str(self.teacher_art.path.resolve()) if self.teacher_art else None
        cfg["world_size"] = self.dist.world
        return cfg

    # -- main ---------------------------------------------------------------

    def run(self) -> dict | None:
        import torch

        from mk.core.device import resolve_device

        self.device = self.dist.init(resolve_device(self.opts.device))
        self.precision = resolve_precision(self.opts.precision, self.device)
        try:
            return self._run()
        except torch.OutOfMemoryError:
            b = self.opts.batch_size
            raise MkError(f"out of memory on {self.device} at batch size {b}",
                          hint=f"try --batch-size {max(1, b // 2)} --grad-accum {self.opts.grad_accum * 2} "
                               "(the same effective batch)" if b > 1 else
                               "the model does not fit even at batch size 1: use --lora or a smaller model") \
                from None
        finally:
            self.dist.destroy()

    def _run(self) -> dict | None:
        dist = self.dist
        t_start = time.perf_counter()
        train, val, test = self._load_splits()
        model, teacher = self._load_models()
        self._check_splits(model, train, val, test)
        n = num_rows(train)
        if n < dist.world:
            raise BadInput(f"{self.dataset.path}: {n} training examples cannot feed {dist.world} processes")
        plan = Plan.of(n, self.opts, dist.world)
        stepper = Stepper(model, teacher, train, self.opts, dist, self.device, self.precision, plan,
                          self.checkpoints.last)
        validation = Validation(val, len(self.labels), self.opts, self.device, dist, self.checkpoints)
        state = self._start(stepper, validation, plan)
        stepper.wrap()
        with TrainLog(self.checkpoints.dir, state.log_offset, dist.main) as train_log:
            self._log_start(train_log, state, plan)
            self._loop(stepper, validation, state, plan, train_log, t_start)
            validation.keep_best(model, state)
            if dist.active:
                check_ranks_agree(dist, model, train_log)
            train_seconds = time.perf_counter() - t_start
            if not dist.main:
                dist.barrier()
                return None
            return self._finish(model, test, stepper.autocast, state, plan, train_seconds, train_log)

    def _load_splits(self) -> tuple[dict, dict, dict | None]:
        test = (load_split(self.dataset, "test") if (self.dataset.path / "test.safetensors").is_file()
                else None)
        return load_split(self.dataset, "train"), load_split(self.dataset, "val"), test

    def _load_models(self):
        import torch
        import transformers

        from mk.core.runtime.torch_runtime import load_classifier

        transformers.utils.logging.disable_progress_bar()  # mk shows its own progress

        labels = self.labels
        torch.manual_seed(self.opts.seed)  # the fresh head starts the same on every rank and every run
        overrides = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
        if self.head["ignore_mismatched_sizes"]:
            overrides["ignore_mismatched_sizes"] = True
        model = load_classifier(self.base.path, self.task, **overrides)
        if self.head["fresh"]:
            log.info("new classification head: %d labels (%s)", len(labels), ", ".join(labels))
        if self.opts.lora:
            from mk.core.training import lora
            model = lora.wrap(model, self.opts.lora, self.opts.lora_alpha, self.opts.lora_dropout)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            log.info("LoRA rank %d: training %s of %s parameters (%.1f%%)", self.opts.lora,
                     f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        model.to(self.device).train()
        teacher = None
        if self.teacher_art is not None:
            teacher = load_classifier(self.teacher_art.path, self.task).to(self.device).eval()
            teacher.requires_grad_(False)
        return model, teacher

    def _check_splits(self, model, train: dict, val: dict, test: dict | None) -> None:
        cfg = model.config if not self.opts.lora else _base_model(model).config
        vocab = getattr(cfg, "vocab_size", None)
        positions = getattr(cfg, "max_position_embeddings", None)
        for name, split in (("train", train), ("val", val), ("test", test)):
            if split is not None:
                _check_split(name, split, self.labels, vocab, positions, self.dataset.path)

    def _start(self, stepper: Stepper, validation: Validation, plan: Plan) -> TrainState:
        """The state to start from: the checkpoint's with --resume, else step 0
        with the RNGs seeded (apart on each rank)."""
        state = self.checkpoints.restore(*stepper.parts)
        if state is None:
            import torch

            seed = self.opts.seed + self.dist.rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            return TrainState()
        if state.best is not None:
            validation.best_weights = self.checkpoints.load_best()
        log.info("resuming at step %d of %d from %s", state.step, plan.total, self.checkpoints.dir)
        return state

    def _log_start(self, train_log: TrainLog, state: TrainState, plan: Plan) -> None:
        dist = self.dist
        train_log.write("resume" if state.step else "start", step=state.step, total_steps=plan.total,
                        steps_per_epoch=plan.steps_per_epoch, global_batch=plan.global_batch,
                        world_size=dist.world, device=self.device, precision=self.precision,
                        lr=self.opts.learning_rate(), warmup_steps=plan.warmup, examples=plan.examples,
                        time=time.time())
        log.info("training %s on %s: %d examples, %d steps (%d per epoch, global batch %d), %s on %s%s",
                 self.model_ref, self.dataset.path, plan.examples, plan.total, plan.steps_per_epoch,
                 plan.global_batch, self.precision, self.device,
                 f" × {dist.world} processes" if dist.active else "")

    def _loop(self, stepper: Stepper, validation: Validation, state: TrainState, plan: Plan,
              train_log: TrainLog, t_start: float) -> None:
        """Steps to the end or an early stop, evaluating after each epoch and
        checkpointing every --save-every steps, on a signal and at the end."""
        def save(reason: str) -> None:
            self.checkpoints.save(reason, state, train_log, plan.total, *stepper.parts)

        stop = StopRequest()
        order_epoch, order = -1, None
        with stop.installed(), progress("training", total=plan.total) as bar:
            bar.advance(state.step)
            while state.step < plan.total and not state.stopped_early:
                epoch, pos = divmod(state.step, plan.steps_per_epoch)
                if epoch != order_epoch:
                    order_epoch, order = epoch, epoch_order(self.opts.seed, epoch, plan.examples)
                r = stepper.step(state.step + 1, order[pos * plan.global_batch:(pos + 1) * plan.global_batch],
                                 stop)
                state.step += 1
                train_log.write("step", step=state.step, epoch=round(state.step / plan.steps_per_epoch, 4),
                                loss=round(r.loss, 6), lr=r.lr, grad_norm=round(r.grad_norm, 5),
                                samples_per_s=round(r.examples / r.seconds, 2), step_s=round(r.seconds, 5),
                                elapsed_s=round(time.perf_counter() - t_start, 4))
                bar.advance(1, info=f"epoch {epoch + 1} loss {r.loss:.4f} {r.examples / r.seconds:,.0f} samples/s")
                if state.step % plan.steps_per_epoch == 0 or state.step == plan.total:
                    validation(stepper.model, stepper.autocast, state, epoch + 1, train_log)
                if r.stop or stop:
                    save("signal")
                    raise MkError(f"interrupted at step {state.step} of {plan.total}; checkpoint saved in "
                                  f"{self.checkpoints.dir}", code=INTERRUPTED,
                                  hint="rerun the same command with --resume to continue")
                if state.step % self.opts.save_every == 0 and state.step < plan.total:
                    save("periodic")
            if not self.checkpoints.is_current(state.step):
                save("trained")  # a failure while writing the output loses no training

    # -- the output -----------------------------------------------------------

    def _finish(self, model, test, autocast, state: TrainState, plan: Plan, train_seconds: float,
                train_log: TrainLog) -> dict:
        opts = self.opts
        save_model = model
        if opts.lora:
            from mk.core.training import lora
            save_model = lora.unwrap_for_save(model, opts.merge)
        metrics = {}
        if test is not None:
            m = evaluate_model(save_model, test, len(self.labels), self.device, autocast, opts.eval_batch_size,
                               "test")
            metrics = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "split": "test", "n": m["n"]}
        if state.history:
            best = max(state.history, key=lambda h: h["val_macro_f1"]) if opts.patience else state.history[-1]
            metrics.update(val_accuracy=best["val_accuracy"], val_macro_f1=best["val_macro_f1"])
        train_log.write("test", **{k: v for k, v in metrics.items() if k != "split"}, time=time.time())
        train_log.write("end", step=state.step, seconds=round(train_seconds, 2), stopped_early=state.stopped_early)
        train_log.flush()
        training = self._summary(state, plan, train_seconds)
        self._write_output(save_model, metrics, training, train_log)
        self.checkpoints.remove()
        self.dist.barrier()
        if metrics.get("accuracy") is not None:
            log.info("test accuracy %.4f, macro-F1 %.4f (%d examples); %d steps in %.0f s",
                     metrics["accuracy"], metrics["macro_f1"], metrics["n"], state.step, train_seconds)
        return {"path": str(self.out), "metrics": metrics, "training": training}

    def _summary(self, state: TrainState, plan: Plan, train_seconds: float) -> dict:
        """The `training` section of the output's manifest."""
        opts = self.opts
        training = {
            "steps": state.step, "epochs": round(state.step / plan.steps_per_epoch, 3),
            "seconds": round(train_seconds, 1), "lr": opts.learning_rate(), "batch_size": opts.batch_size,
            "grad_accum": opts.grad_accum, "world_size": self.dist.world, "schedule": opts.schedule,
            "warmup": opts.warmup, "weight_decay": opts.weight_decay, "seed": opts.seed,
            "precision": self.precision, "device": self.device, "stopped_early": state.stopped_early,
            "best_step": state.best_step, "mode": "lora" if opts.lora else "full",
        }
        if opts.lora:
            training.update(lora_r=opts.lora, lora_alpha=opts.lora_alpha or 2 * opts.lora, merged=opts.merge)
        if self.teacher_art is not None:
            training.update(temperature=opts.temperature, alpha=opts.alpha)
        return training

    def _write_output(self, save_model, metrics: dict, training: dict, train_log: TrainLog) -> None:
        opts = self.opts
        with atomic_output(self.out, self.force) as tmp:
            if opts.lora and not opts.merge:
                save_model.peft_config["default"].base_model_name_or_path = str(self.base.path.resolve())
                save_model.save_pretrained(str(tmp))
                _base_model(save_model).config.save_pretrained(str(tmp))
            else:
                save_model.save_pretrained(str(tmp), safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            for name in ("preprocessor_config.json",):
                for src in (self.base.path, self.dataset.path):
                    if (src / name).is_file():
                        shutil.copy2(src / name, tmp / name)
                        break
            shutil.copy2(train_log.path, tmp / LOG_NAME)
            extra = {"training": training}
            if self.teacher_art is not None:
                extra["teacher"] = self.teacher_art.ref(tmp)
            if opts.lora and not opts.merge:
                extra["adapter"] = {"type": "lora", "r": opts.lora, "base": self.base.ref(tmp)}
            write_manifest(tmp, kind="model", format="safetensors", task=self.task, labels=self.labels,
                           parent=self.base, dataset=self.dataset, metrics=metrics, **extra)


def tune(data, model, out, opts: TuneOptions, force: bool = False) -> dict | None:
    """Fine-tune `model` on the dataset `data` into the artifact `out`; the result
    on rank 0 (None on the other ranks of a distributed run)."""
    return Trainer(data, model, out, opts, force).run()
