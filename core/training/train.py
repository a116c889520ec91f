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
optimizer step; `Validation` evaluates after each epoch and stops early; the
task (`task.py`: `classify.ClassifierTask`, `causal.CausalLMTask`, chosen by the
dataset's task) loads the model and says what its loss and evaluation are;
`TrainState` (in `checkpoint.py`) is where the run stands, and `Checkpointer`
there saves and restores it; `train_log.py` writes the JSONL log;
`distributed.py` holds the process group and its collectives.
"""

from __future__ import annotations

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
from mk.core.dataset import load_split, num_rows, open_dataset
from mk.core.errors import INTERRUPTED, BadInput, MkError
from mk.core.runtime.adapters import check_whole_model
from mk.core.training.checkpoint import Checkpointer, TrainState, load_trained_state, trained_state
from mk.core.training.distributed import Dist, check_ranks_agree
from mk.core.training.task import Task, base_model, is_better
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
    patience: int | None = None         # epochs without a better val figure (the task's) before stopping
    precision: str = "auto"             # auto | fp32 | bf16 | fp16
    seed: int = 0
    save_every: int = 200
    device: str = "auto"
    lora: int | None = None             # None: the task's default (every weight, or LoRA for causal LMs)
    full: bool = False                  # every weight, even where the task's default is LoRA
    lora_alpha: int | None = None
    lora_dropout: float = 0.1
    merge: bool = True
    teacher: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    new_head: bool = False
    resume: bool = False
    eval_batch_size: int = 64
    exact_match_rows: int = 200         # test rows a causal LM answers for exact match (0: none)

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
        if self.save_every < 1:
            problems.append("--save-every must be ≥ 1")
        if self.patience is not None and self.patience < 1:
            problems.append("--patience must be ≥ 1")
        if self.exact_match_rows < 0:
            problems.append("--exact-match-rows must be ≥ 0")
        if problems:
            raise BadInput("; ".join(problems))

    def resolve_mode(self, default_lora: int | None) -> None:
        """LoRA or every weight: --lora R, --full, else the task's default."""
        if self.full and self.lora:
            raise BadInput("--full and --lora R exclude each other: train every weight, or adapters")
        if self.full:
            self.lora = None
        elif self.lora is None:
            self.lora = default_lora
        if self.lora_alpha is not None and not self.lora:
            raise BadInput("--lora-alpha only applies with LoRA (--lora R, or a causal LM without --full)")
        if not self.merge and not self.lora:
            raise BadInput("--no-merge only applies with LoRA (--lora R, or a causal LM without --full)")


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

    def __init__(self, model, task: Task, split: dict, opts: TuneOptions, dist: Dist, device: str,
                 precision: str, plan: Plan, last_checkpoint: Path):
        import torch

        self.model, self.runner, self.task = model, model, task
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
        weight = self.task.weight(self.split, idx)  # what the step's loss is a mean over
        loss_sum = self._backward(idx, weight)
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
        return StepResult(loss=total_loss / weight, grad_norm=float(grad_norm), lr=lr, examples=len(idx),
                          seconds=time.perf_counter() - t0, stop=bool(stopping))

    def _backward(self, idx: np.ndarray, weight: int):
        """Gradients of this rank's share of `idx`, micro-batch by micro-batch, for
        the mean loss over the global batch (`weight`: its examples or label
        tokens); the sum of this rank's losses."""
        import torch

        opts, dist = self.opts, self.dist
        shard = idx[dist.rank::dist.world]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(opts.grad_accum):
            mb = shard[i * opts.batch_size:(i + 1) * opts.batch_size]
            if len(mb) == 0 and not dist.active:
                continue
            last = i == opts.grad_accum - 1
            with self.runner.no_sync() if dist.active and not last else nullcontext():
                summed = self.task.loss_sum(self.runner, self.split, mb if len(mb) else idx[:1], self.autocast)
                if len(mb):  # DDP averages gradients over the ranks: × world makes it the global mean
                    loss = summed * (dist.world / weight)
                    loss_sum += summed.detach()
                else:  # an empty share still joins the gradient all-reduce
                    loss = summed * 0.0
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
    after that many epochs without a better val figure (the task's: macro-F1,
    or a causal LM's loss) and keeps the best weights (in memory, and in best.pt
    for --resume)."""

    def __init__(self, split: dict, task: Task, opts: TuneOptions, dist: Dist, checkpoints: Checkpointer):
        self.split, self.task, self.opts = split, task, opts
        self.dist, self.checkpoints = dist, checkpoints
        self.best_weights = None

    def __call__(self, model, autocast, state: TrainState, epoch: int, train_log: TrainLog) -> None:
        opts, (key, _) = self.opts, self.task.select
        metrics = self.task.evaluate(model, self.split, autocast, f"epoch {epoch} val")
        metrics = self.dist.from_main(metrics)  # every rank decides alike, on rank 0's figures
        better = is_better(self.task, metrics[key], state.best)
        if better:
            state.best, state.best_step, state.bad_evals = metrics[key], state.step, 0
            if opts.patience:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in trained_state(model).items()}
                self.checkpoints.save_best(self.best_weights)
        else:
            state.bad_evals += 1
        entry = {"epoch": epoch, "step": state.step, **{f"val_{k}": v for k, v in metrics.items() if k != "n"},
                 "best": better}
        state.history.append(entry)
        train_log.write("eval", **entry, time=time.time())
        log.info("epoch %d: val %s%s", epoch, self.task.describe(metrics),
                 " (best)" if better else f" (best {key} {state.best:.4f})")
        if opts.patience and state.bad_evals >= opts.patience:
            log.info("early stop: no better val %s for %d epochs; keeping the weights of step %d",
                     key, state.bad_evals, state.best_step)
            state.stopped_early = True

    def keep_best(self, model, state: TrainState) -> None:
        """With --patience, go back to the best weights if training went past them."""
        if self.opts.patience and self.best_weights is not None and state.best_step != state.step:
            load_trained_state(model, self.best_weights)

    def best_entry(self, state: TrainState) -> dict | None:
        """The val figures the output reports: the best epoch's with --patience, else the last's."""
        if not state.history:
            return None
        if not self.opts.patience:
            return state.history[-1]
        key, higher = self.task.select
        pick = max if higher else min
        return pick(state.history, key=lambda h: h[f"val_{key}"])


# ---------------------------------------------------------------------------
# The run

def task_for(dataset: Artifact, base: Artifact, opts: TuneOptions) -> Task:
    """The dataset says what is trained: completions (a causal LM), else labels."""
    check_whole_model(base.path, "mk tune --model")
    if dataset.task == "text-generation":
        from mk.core.training.causal import CausalLMTask
        return CausalLMTask(dataset, base, opts)
    from mk.core.training.classify import ClassifierTask
    return ClassifierTask(dataset, base, opts)


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
        self.task = task_for(self.dataset, self.base, opts)
        opts.resolve_mode(self.task.default_lora)
        self.teacher_art = self.task.teacher_art
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
        model = self._load_model()
        self.task.check_splits(model, {"train": train, "val": val, "test": test})
        n = num_rows(train)
        if n < dist.world:
            raise BadInput(f"{self.dataset.path}: {n} training examples cannot feed {dist.world} processes")
        plan = Plan.of(n, self.opts, dist.world)
        stepper = Stepper(model, self.task, train, self.opts, dist, self.device, self.precision, plan,
                          self.checkpoints.last)
        validation = Validation(val, self.task, self.opts, dist, self.checkpoints)
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
            return self._finish(model, test, stepper.autocast, state, plan, validation, train_seconds,
                                train_log)

    def _load_splits(self) -> tuple[dict, dict, dict | None]:
        test = (load_split(self.dataset, "test") if (self.dataset.path / "test.safetensors").is_file()
                else None)
        return load_split(self.dataset, "train"), load_split(self.dataset, "val"), test

    def _load_model(self):
        """The task's model, with LoRA adapters when training them, on the device."""
        import transformers

        transformers.utils.logging.disable_progress_bar()  # mk shows its own progress
        model = self.task.load_model(self.device, self.opts.seed)
        if self.opts.lora:
            from mk.core.training import lora
            model = lora.wrap(model, self.opts.lora, self.opts.lora_alpha, self.opts.lora_dropout)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
            log.info("LoRA rank %d: training %s of %s parameters (%.1f%%)", self.opts.lora,
                     f"{trainable:,}", f"{total:,}", 100 * trainable / total)
        return model.to(self.device).train()

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

    def _finish(self, model, test, autocast, state: TrainState, plan: Plan, validation: Validation,
                train_seconds: float, train_log: TrainLog) -> dict:
        opts = self.opts
        save_model = model
        if opts.lora:
            from mk.core.training import lora
            save_model = lora.unwrap_for_save(model, opts.merge)
        metrics = self.task.test(save_model, test, autocast) if test is not None else {}
        if (best := validation.best_entry(state)) is not None:
            metrics.update({k: v for k, v in best.items() if k.startswith("val_")})
        train_log.write("test", **{k: v for k, v in metrics.items() if k != "split"}, time=time.time())
        train_log.write("end", step=state.step, seconds=round(train_seconds, 2), stopped_early=state.stopped_early)
        train_log.flush()
        training = self._summary(state, plan, train_seconds)
        self._write_output(save_model, metrics, training, train_log)
        self.checkpoints.remove()
        self.dist.barrier()
        if test is not None:
            log.info("test (%d examples): %s; %d steps in %.0f s", metrics["n"], self.task.describe(metrics),
                     state.step, train_seconds)
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
                base_model(save_model).config.save_pretrained(str(tmp))
            else:
                save_model.save_pretrained(str(tmp), safe_serialization=True)
            if self.task.tokenizer is not None:
                self.task.tokenizer.save_pretrained(str(tmp))
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
            write_manifest(tmp, kind="model", format="safetensors", task=self.task.name, labels=self.task.labels,
                           parent=self.base, dataset=self.dataset, metrics=metrics, **extra)


def tune(data, model, out, opts: TuneOptions, force: bool = False) -> dict | None:
    """Fine-tune `model` on the dataset `data` into the artifact `out`; the result
    on rank 0 (None on the other ranks of a distributed run)."""
    return Trainer(data, model, out, opts, force).run()
