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
"""

from __future__ import annotations

import json
import math
import os
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

LOG_NAME = "train_log.jsonl"
CKPT_NAME = "last.pt"
BEST_NAME = "best.pt"
STATE_NAME = "state.json"
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


def checkpoint_dir(out: Path) -> Path:
    """`OUT.ckpt/` beside the output: outlives a failed or interrupted run."""
    out = Path(out)
    return out.parent / f"{out.name}.ckpt"


# ---------------------------------------------------------------------------
# Distributed set-up (torchrun / accelerate launch)

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), world=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")))


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
    from mk.core.measurement.evaluate import evaluate

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
# Checkpoints

def _rng_state() -> dict:
    import torch

    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _foreign_in_checkpoint_dir(ckpt: Path) -> str | None:
    """What at OUT.ckpt mk tune did not write (the folder is removed when a run
    starts over or ends, so it must hold nothing else)."""
    from mk.core.outputs import describe

    what = describe(ckpt)
    if what is None:
        return None
    if what != "a folder":
        return f"is {what}, where mk tune keeps its checkpoints"
    ours = {CKPT_NAME, BEST_NAME, LOG_NAME, STATE_NAME}
    foreign = sorted(p.name for p in ckpt.iterdir()
                     if p.name not in ours and not p.name.startswith((f"{CKPT_NAME}.tmp-", f"{BEST_NAME}.tmp-")))
    return f"holds files mk tune did not write ({', '.join(foreign[:3])})" if foreign else None


def load_checkpoint(ckpt: Path) -> dict:
    import torch

    path = ckpt / CKPT_NAME
    if not path.is_file():
        raise BadInput(f"{ckpt}: no checkpoint to resume from",
                       hint="run without --resume to start training")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise BadInput(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})",
                       hint="run with --force instead of --resume to start over") from None


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
        self.ckpt = checkpoint_dir(self.out)
        self._resumed_at = None
        check_output(self.out, force)
        if problem := _foreign_in_checkpoint_dir(self.ckpt):
            raise BadInput(f"{self.ckpt}: {problem}", hint="move it away, or choose another -o")
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
        if opts.resume:
            self.checkpoint = load_checkpoint(self.ckpt)
            self._check_resume(self.checkpoint)
        else:
            self.checkpoint = None
            if (self.ckpt / CKPT_NAME).is_file():
                if not force:
                    raise BadInput(f"{self.ckpt}: holds the checkpoint of an unfinished run",
                                   hint="pass --resume to continue it, or --force to start over")
            if self.dist.main:
                shutil.rmtree(self.ckpt, ignore_errors=True)

    # -- configuration ------------------------------------------------------

    def run_config(self) -> dict:
        d = asdict(self.opts)
        cfg = {k: d[k] for k in RUN_KEYS}
        cfg["lr"] = self.opts.learning_rate()
        cfg["model"] = str(self.base.path.resolve())
        cfg["dataset"] = self.dataset.digest()
        cfg["teacher"] = str(self.teacher_art.path.resolve()) if self.teacher_art else None
        cfg["world_size"] = self.dist.world
        return cfg

    def _check_resume(self, ckpt: dict) -> None:
        saved, now = ckpt.get("config", {}), self.run_config()
        diffs = [f"{k} {saved.get(k)!r} → {now.get(k)!r}" for k in now if saved.get(k) != now.get(k)]
        if diffs:
            raise BadInput(f"{self.ckpt}: the checkpoint is of a different run: " + "; ".join(diffs),
                           hint="resume with the same options, or pass --force instead of --resume to start over")

    # -- main ---------------------------------------------------------------

    def run(self) -> dict | None:
        import torch

        self._init_distributed()
        try:
            return self._run(torch)
        except torch.OutOfMemoryError:
            b = self.opts.batch_size
            raise MkError(f"out of memory on {self.device} at batch size {b}",
                          hint=f"try --batch-size {max(1, b // 2)} --grad-accum {self.opts.grad_accum * 2} "
                               "(the same effective batch)" if b > 1 else
                               "the model does not fit even at batch size 1: use --lora or a smaller model") \
                from None
        finally:
            if self.dist.active and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def _init_distributed(self) -> None:
        import torch

        from mk.core.device import resolve_device

        device = resolve_device(self.opts.device)
        if self.dist.active:
            if device.startswith("cuda"):
                device = f"cuda:{self.dist.local_rank}"
                torch.cuda.set_device(device)
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        self.device = device
        self.precision = resolve_precision(self.opts.precision, device)

    def _load_models(self, torch):
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

    def _run(self, torch) -> dict | None:
        opts, dist = self.opts, self.dist
        t_start = time.perf_counter()
        train = load_split(self.dataset, "train")
        val = load_split(self.dataset, "val")
        test = load_split(self.dataset, "test") if (self.dataset.path / "test.safetensors").is_file() else None
        model, teacher = self._load_models(torch)
        cfg = model.config if not opts.lora else _base_model(model).config
        vocab = getattr(cfg, "vocab_size", None)
        positions = getattr(cfg, "max_position_embeddings", None)
        for name, split in (("train", train), ("val", val), ("test", test)):
            if split is not None:
                _check_split(name, split, self.labels, vocab, positions, self.dataset.path)
        n = num_rows(train)
        global_batch = opts.batch_size * opts.grad_accum * dist.world
        if n < dist.world:
            raise BadInput(f"{self.dataset.path}: {n} training examples cannot feed {dist.world} processes")
        steps_per_epoch = math.ceil(n / global_batch)
        total = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
        warmup = int(opts.warmup * total) if opts.warmup < 1 else int(opts.warmup)
        lr = opts.learning_rate()

        params = [p for p in model.parameters() if p.requires_grad]
        try:  # the fused kernel: ~5x faster than the per-tensor loop on CPU as well as on CUDA
            optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=lr, fused=True)
        except (RuntimeError, ValueError):
            optimizer = torch.optim.AdamW(param_groups(model, opts.weight_decay), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts.schedule, warmup, total))
        scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        autocast = autocast_factory(self.precision, self.device)
        accepts_tt = accepts_token_types(model)

        state = {"step": 0, "best": None, "best_step": None, "bad_evals": 0, "history": [], "log_offset": 0,
                 "stopped_early": False}
        best_weights = None
        if self.checkpoint is not None:
            ck = self.checkpoint
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            state.update(ck["state"])
            rngs = ck["rng"]
            _set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0])
            if (self.ckpt / BEST_NAME).is_file() and state["best"] is not None:
                best_weights = torch.load(self.ckpt / BEST_NAME, map_location="cpu", weights_only=True)
            self.checkpoint = None
            self._resumed_at = state["step"]
            log.info("resuming at step %d of %d from %s", state["step"], total, self.ckpt)
        else:
            torch.manual_seed(opts.seed + dist.rank)
            random.seed(opts.seed + dist.rank)
            np.random.seed(opts.seed + dist.rank)

        runner = model
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP
            runner = DDP(model, device_ids=[self.device] if self.device.startswith("cuda") else None)

        logf = None
        if dist.main:
            self.ckpt.mkdir(parents=True, exist_ok=True)
            logf = open(self.ckpt / LOG_NAME, "a+b")
            logf.truncate(state["log_offset"])
            logf.seek(state["log_offset"])

        def write_log(event: str, **fields):
            if logf is not None:
                logf.write((json.dumps({"event": event, **fields}, default=float) + "\n").encode())

        write_log("resume" if state["step"] else "start", step=state["step"], total_steps=total,
                  steps_per_epoch=steps_per_epoch, global_batch=global_batch, world_size=dist.world,
                  device=self.device, precision=self.precision, lr=lr, warmup_steps=warmup,
                  examples=n, time=time.time())
        log.info("training %s on %s: %d examples, %d steps (%d per epoch, global batch %d), %s on %s%s",
                 self.model_ref, self.dataset.path, n, total, steps_per_epoch, global_batch,
                 self.precision, self.device, f" × {dist.world} processes" if dist.active else "")

        def save_checkpoint(reason: str):
            rngs = [_rng_state()]
            if dist.active:
                rngs = [None] * dist.world
                torch.distributed.all_gather_object(rngs, _rng_state())
            if dist.main:
                logf.flush()
                state["log_offset"] = logf.tell()
                _atomic_torch_save({
                    "version": 1, "config": self.run_config(), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rngs, "state": dict(state),
                }, self.ckpt / CKPT_NAME)
                (self.ckpt / STATE_NAME).write_text(json.dumps(
                    {"step": state["step"], "total_steps": total, "reason": reason, "time": time.time(),
                     "config": self.run_config()}, indent=2) + "\n")
            if dist.active:
                torch.distributed.barrier()

        def evaluate_val(epoch: int):
            nonlocal best_weights
            metrics = evaluate_model(model, val, len(self.labels), self.device, autocast,
                                     opts.eval_batch_size, f"epoch {epoch} val")
            if dist.active:  # every rank takes rank 0's figures, so every rank decides alike
                box = [metrics]
                torch.distributed.broadcast_object_list(box, src=0)
                metrics = box[0]
            better = state["best"] is None or metrics["macro_f1"] > state["best"]
            if better:
                state["best"], state["best_step"], state["bad_evals"] = metrics["macro_f1"], state["step"], 0
                if opts.patience:
                    best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    if dist.main:
                        _atomic_torch_save(best_weights, self.ckpt / BEST_NAME)
            else:
                state["bad_evals"] += 1
            entry = {"epoch": epoch, "step": state["step"], "val_accuracy": metrics["accuracy"],
                     "val_macro_f1": metrics["macro_f1"], "best": better}
            state["history"].append(entry)
            write_log("eval", **entry, time=time.time())
            log.info("epoch %d: val accuracy %.4f, macro-F1 %.4f%s", epoch, metrics["accuracy"],
                     metrics["macro_f1"], " (best)" if better else f" (best {state['best']:.4f})")
            if opts.patience and state["bad_evals"] >= opts.patience:
                log.info("early stop: no better val macro-F1 for %d epochs; keeping the weights of step %d",
                         state["bad_evals"], state["best_step"])
                state["stopped_early"] = True

        stop = StopRequest()
        order_epoch, order = -1, None
        flags = torch.zeros(3, dtype=torch.float64, device=self.device)
        try:
            with stop.installed(), progress("training", total=total) as bar:
                bar.advance(state["step"])
                while state["step"] < total and not state["stopped_early"]:
                    step = state["step"]
                    epoch, pos = divmod(step, steps_per_epoch)
                    if epoch != order_epoch:
                        order_epoch, order = epoch, epoch_order(opts.seed, epoch, n)
                    idx = order[pos * global_batch:(pos + 1) * global_batch]
                    n_step = len(idx)
                    shard = idx[dist.rank::dist.world]
                    t0 = time.perf_counter()
                    loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                    for i in range(opts.grad_accum):
                        mb = shard[i * opts.batch_size:(i + 1) * opts.batch_size]
                        if len(mb) == 0 and not dist.active:
                            continue
                        last = i == opts.grad_accum - 1
                        sync = runner.no_sync() if dist.active and not last else nullcontext()
                        with sync:
                            feed, labels = make_batch(train, mb if len(mb) else idx[:1], self.device, accepts_tt)
                            with autocast():
                                logits = runner(**feed).logits
                                t_logits = teacher(**feed).logits if teacher is not None else None
                            if len(mb):
                                from mk.core.training.distill import per_example_loss
                                per = per_example_loss(logits, labels, t_logits, opts.temperature, opts.alpha)
                                loss = per.sum() * (dist.world / n_step)
                                loss_sum += per.detach().sum()
                            else:  # an empty share still joins the gradient all-reduce
                                loss = logits.sum() * 0.0
                            (scaler.scale(loss) if scaler is not None else loss).backward()
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    grad_norm = (torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
                                 if opts.max_grad_norm > 0 else torch.zeros((), device=self.device))
                    flags[0] = loss_sum
                    flags[1] = 0.0 if torch.isfinite(loss_sum) and (
                        scaler is not None or torch.isfinite(grad_norm)) else 1.0
                    flags[2] = 1.0 if stop else 0.0
                    if dist.active:
                        torch.distributed.all_reduce(flags)
                    total_loss, bad, stopping = flags.tolist()
                    if bad:
                        raise MkError(self._nonfinite_message(step + 1, total_loss, grad_norm),
                                      hint=self._nonfinite_hint())
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    current_lr = scheduler.get_last_lr()[0]
                    scheduler.step()
                    state["step"] = step + 1
                    dt = time.perf_counter() - t0
                    mean_loss = total_loss / n_step
                    write_log("step", step=step + 1, epoch=round((step + 1) / steps_per_epoch, 4),
                              loss=round(mean_loss, 6), lr=current_lr, grad_norm=round(float(grad_norm), 5),
                              samples_per_s=round(n_step / dt, 2), step_s=round(dt, 5),
                              elapsed_s=round(time.perf_counter() - t_start, 4))
                    bar.advance(1, info=f"epoch {epoch + 1} loss {mean_loss:.4f} {n_step / dt:,.0f} samples/s")
                    if (step + 1) % steps_per_epoch == 0 or step + 1 == total:
                        evaluate_val(epoch + 1)
                    if stopping or stop:
                        save_checkpoint("signal")
                        raise MkError(f"interrupted at step {state['step']} of {total}; checkpoint saved in "
                                      f"{self.ckpt}", code=INTERRUPTED,
                                      hint="rerun the same command with --resume to continue")
                    if state["step"] % opts.save_every == 0 and state["step"] < total:
                        save_checkpoint("periodic")
                if not self.checkpoint_is_current(state):
                    save_checkpoint("trained")  # a failure while writing the output loses no training
            if opts.patience and best_weights is not None and state["best_step"] != state["step"]:
                model.load_state_dict(best_weights)
            if dist.active:
                self._check_ranks_agree(torch, model, write_log)
            train_seconds = time.perf_counter() - t_start
            if not dist.main:
                if dist.active:
                    torch.distributed.barrier()
                return None
            return self._finish(model, test, autocast, state, total, steps_per_epoch, train_seconds, write_log,
                                logf)
        finally:
            if logf is not None:
                logf.close()

    def checkpoint_is_current(self, state) -> bool:
        """Whether OUT.ckpt already holds the step reached (a resumed, finished run)."""
        return self._resumed_at == state["step"]

    def _check_ranks_agree(self, torch, model, write_log) -> None:
        """Every rank must end with the same weights; a fingerprint of them says so."""
        with torch.no_grad():
            mine = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                for p in model.parameters()]).flatten()
        every = [torch.zeros_like(mine) for _ in range(self.dist.world)]
        torch.distributed.all_gather(every, mine)
        agree = all(torch.equal(e.cpu(), every[0].cpu()) for e in every)
        write_log("ranks", world_size=self.dist.world, agree=agree,
                  fingerprints=[float(e.sum()) for e in every])
        if not agree:
            raise MkError(f"the {self.dist.world} processes ended with different weights",
                          hint="report this; rerun on one process meanwhile")

    def _nonfinite_message(self, step: int, loss: float, grad_norm) -> str:
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {float(grad_norm)}"
        where = (f"the last good checkpoint is {self.ckpt / CKPT_NAME}"
                 if (self.ckpt / CKPT_NAME).is_file() else "no checkpoint was written yet")
        return f"non-finite {what} at step {step}; training stopped, {where}"

    def _nonfinite_hint(self) -> str:
        lr = self.opts.learning_rate()
        return (f"lower the learning rate (--lr {lr / 10:g}), keep clipping on (--max-grad-norm 1)"
                + (", or use --precision bf16/fp32" if self.precision == "fp16" else "")
                + "; --resume continues from the checkpoint")

    def _finish(self, model, test, autocast, state, total, steps_per_epoch, train_seconds, write_log, logf):
        import torch

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
        if state["history"]:
            best = max(state["history"], key=lambda h: h["val_macro_f1"]) if opts.patience else state["history"][-1]
            metrics.update(val_accuracy=best["val_accuracy"], val_macro_f1=best["val_macro_f1"])
        write_log("test", **{k: v for k, v in metrics.items() if k != "split"}, time=time.time())
        write_log("end", step=state["step"], seconds=round(train_seconds, 2), stopped_early=state["stopped_early"])
        logf.flush()
        training = {
            "steps": state["step"], "epochs": round(state["step"] / steps_per_epoch, 3),
            "seconds": round(train_seconds, 1), "lr": opts.learning_rate(), "batch_size": opts.batch_size,
            "grad_accum": opts.grad_accum, "world_size": self.dist.world, "schedule": opts.schedule,
            "warmup": opts.warmup, "weight_decay": opts.weight_decay, "seed": opts.seed,
            "precision": self.precision, "device": self.device, "stopped_early": state["stopped_early"],
            "best_step": state["best_step"], "mode": "lora" if opts.lora else "full",
        }
        if opts.lora:
            training.update(lora_r=opts.lora, lora_alpha=opts.lora_alpha or 2 * opts.lora,
                            merged=opts.merge)
        if self.teacher_art is not None:
            training.update(temperature=opts.temperature, alpha=opts.alpha)
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
            shutil.copy2(self.ckpt / LOG_NAME, tmp / LOG_NAME)
            extra = {"training": training}
            if self.teacher_art is not None:
                extra["teacher"] = self.teacher_art.ref(tmp)
            if opts.lora and not opts.merge:
                extra["adapter"] = {"type": "lora", "r": opts.lora, "base": self.base.ref(tmp)}
            write_manifest(tmp, kind="model", format="safetensors", task=self.task, labels=self.labels,
                           parent=self.base, dataset=self.dataset, metrics=metrics, **extra)
        shutil.rmtree(self.ckpt, ignore_errors=True)
        if self.dist.active:
            torch.distributed.barrier()
        if metrics.get("accuracy") is not None:
            log.info("test accuracy %.4f, macro-F1 %.4f (%d examples); %d steps in %.0f s",
                     metrics["accuracy"], metrics["macro_f1"], metrics["n"], state["step"], train_seconds)
        return {"path": str(self.out), "metrics": metrics, "training": training}


def tune(data, model, out, opts: TuneOptions, force: bool = False) -> dict | None:
    """Fine-tune `model` on the dataset `data` into the artifact `out`; the result
    on rank 0 (None on the other ranks of a distributed run)."""
    return Trainer(data, model, out, opts, force).run()
