"""Checkpoints of `mk tune` in `OUT.ckpt/`, beside the output (not inside the
output's temporary folder, which a failure removes).

`last.pt` holds the model, optimizer, scheduler, gradient scaler, every rank's
RNG states, the run's options and the `TrainState`; `state.json` says in plain
text which step it holds and why it was written; `best.pt` holds the best
weights while early stopping may still need them. `--resume` continues only a
checkpoint of the same run (the same options, model, dataset and world size).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mk.core.errors import BadInput, first_line
from mk.core.training.distributed import Dist
from mk.core.training.train_log import LOG_NAME, TrainLog

CKPT_NAME = "last.pt"
BEST_NAME = "best.pt"
STATE_NAME = "state.json"


@dataclass
class TrainState:
    """Where a run stands: all a checkpoint needs besides the tensors."""
    step: int = 0                      # optimizer steps taken
    best: float | None = None          # the best val figure so far (the task's: macro-F1, loss)
    best_step: int | None = None
    bad_evals: int = 0                 # evaluations since the best one
    history: list[dict] = field(default_factory=list)  # one entry per evaluation
    log_offset: int = 0                # how far train_log.jsonl was written at the checkpoint
    stopped_early: bool = False


def checkpoint_dir(out: Path) -> Path:
    """`OUT.ckpt/` beside the output: outlives a failed or interrupted run."""
    out = Path(out)
    return out.parent / f"{out.name}.ckpt"


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


def trained_state(model) -> dict:
    """The weights training changes: every one, or with LoRA only the adapters
    (and heads). The frozen rest is the base model's, read again on resume, so a
    checkpoint of a LoRA run is megabytes, not the whole model."""
    state = model.state_dict()
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return state
    return {k: v for k, v in state.items() if k in params and params[k].requires_grad}


def load_trained_state(model, state: dict) -> None:
    """Put weights saved by `trained_state` back (the others stay as loaded)."""
    result = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trainable]
    if result.unexpected_keys or missing:
        raise BadInput(f"the checkpoint does not fit the model: {len(missing)} trained weights missing, "
                       f"{len(result.unexpected_keys)} unexpected",
                       hint="run with --force instead of --resume to start over")


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(ckpt: Path) -> dict:
    import torch

    path = ckpt / CKPT_NAME
    if not path.is_file():
        raise BadInput(f"{ckpt}: no checkpoint to resume from",
                       hint="run without --resume to start training")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise BadInput(f"{path}: unreadable checkpoint ({type(e).__name__}: {first_line(e)})",
                       hint="run with --force instead of --resume to start over") from None


class Checkpointer:
    """`OUT.ckpt/` of one run: checks it at the start, saves and restores the
    training, keeps the best weights. Only rank 0 writes; `save` is collective."""

    def __init__(self, out: Path, dist: Dist):
        self.dir = checkpoint_dir(out)
        self.dist = dist
        self.config: dict = {}
        self._saved = None          # the checkpoint to resume from, until restored
        self._resumed_at = None     # the step it held
        if problem := self._foreign():
            raise BadInput(f"{self.dir}: {problem}", hint="move it away, or choose another -o")

    def _foreign(self) -> str | None:
        """What at OUT.ckpt mk tune did not write (the folder is removed when a run
        starts over or ends, so it must hold nothing else)."""
        from mk.core.outputs import describe

        what = describe(self.dir)
        if what is None:
            return None
        if what != "a folder":
            return f"is {what}, where mk tune keeps its checkpoints"
        ours = {CKPT_NAME, BEST_NAME, STATE_NAME, LOG_NAME}
        foreign = sorted(p.name for p in self.dir.iterdir()
                         if p.name not in ours and not p.name.startswith((f"{CKPT_NAME}.tmp-", f"{BEST_NAME}.tmp-")))
        return f"holds files mk tune did not write ({', '.join(foreign[:3])})" if foreign else None

    @property
    def last(self) -> Path:
        return self.dir / CKPT_NAME

    def open(self, config: dict, resume: bool, force: bool) -> None:
        """With --resume, read the checkpoint of the same run (`config`); without,
        refuse to overwrite an unfinished run's checkpoint unless --force."""
        self.config = config
        if resume:
            self._saved = load_checkpoint(self.dir)
            saved = self._saved.get("config", {})
            diffs = [f"{k} {saved.get(k)!r} → {config.get(k)!r}" for k in config if saved.get(k) != config.get(k)]
            if diffs:
                raise BadInput(f"{self.dir}: the checkpoint is of a different run: " + "; ".join(diffs),
                               hint="resume with the same options, or pass --force instead of --resume to "
                                    "start over")
            return
        if self.last.is_file() and not force:
            raise BadInput(f"{self.dir}: holds the checkpoint of an unfinished run",
                           hint="pass --resume to continue it, or --force to start over")
        if self.dist.main:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restore(self, model, optimizer, scheduler, scaler) -> TrainState | None:
        """Load the checkpoint read by `open` into the training, with this rank's
        RNG states; its state, or None when the run starts afresh."""
        ck, self._saved = self._saved, None
        if ck is None:
            return None
        load_trained_state(model, ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state = TrainState(**ck["state"])
        rngs = ck["rng"]
        _set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        self._resumed_at = state.step
        return state

    def save(self, reason: str, state: TrainState, log: TrainLog, total: int,
             model, optimizer, scheduler, scaler) -> None:
        """Checkpoint the training at `state.step` (every rank calls it: the RNG
        states are gathered to rank 0, which writes; the others wait for it)."""
        rngs = self.dist.gather(_rng_state())
        if self.dist.main:
            state.log_offset = log.flush()
            _atomic_torch_save({
                "version": 1, "config": self.config, "model": trained_state(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs, "state": asdict(state),
            }, self.last)
            (self.dir / STATE_NAME).write_text(json.dumps(
                {"step": state.step, "total_steps": total, "reason": reason, "time": time.time(),
                 "config": self.config}, indent=2) + "\n")
        self.dist.barrier()

    def is_current(self, step: int) -> bool:
        """Whether the checkpoint already holds `step` (a resumed, finished run)."""
        return self._resumed_at == step

    def save_best(self, weights: dict) -> None:
        if self.dist.main:
            _atomic_torch_save(weights, self.dir / BEST_NAME)

    def load_best(self) -> dict | None:
        import torch

        path = self.dir / BEST_NAME
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
