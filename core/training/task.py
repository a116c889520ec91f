"""What a kind of training brings to the one loop of `mk tune`.

The loop (`train.py`: steps, accumulation, DDP, checkpoints, signals, early
stopping, the output) is the same for every model; a task says what differs:
which models it takes, how they load, the loss of a batch, and what evaluating
means. `classify.ClassifierTask` (sequence and image classifiers, with
distillation) and `causal.CausalLMTask` (causal LMs on completions) are the two.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import numpy as np


class Task(Protocol):
    name: str                   # the output's task in mk.json
    labels: list[str]           # the output's labels in mk.json
    select: tuple[str, bool]    # the val figure that picks the best epoch, and whether higher is better
    default_lora: int | None    # LoRA rank when neither --lora nor --full is given (None: every weight)
    tokenizer: object | None    # shipped with the output
    teacher_art: object | None  # an Artifact, or None

    def load_model(self, device: str, seed: int):
        """The model to train (without adapters), on `device`."""

    def check_splits(self, model, splits: dict[str, dict | None]) -> None:
        """Refuse splits the model cannot take (exit 2), before any step."""

    def weight(self, split: dict, idx: np.ndarray) -> int:
        """What the loss of the global batch `idx` is a mean over (examples, or label tokens)."""

    def loss_sum(self, runner, split: dict, idx: np.ndarray, autocast):
        """The summed loss of rows `idx` (a scalar tensor with its graph)."""

    def evaluate(self, model, split: dict, autocast, description: str) -> dict:
        """The val figures of `model` (one of them is `select[0]`), and `n`."""

    def test(self, model, split: dict, autocast) -> dict:
        """The final figures on the test split."""

    def describe(self, metrics: dict) -> str:
        """The figures in a few words, for stderr."""


@contextmanager
def evaluating(model):
    """The model in eval mode (dropout off) for the block, then as it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def base_model(model):
    """The transformers model under a peft wrapper (its config, forward's signature)."""
    get = getattr(model, "get_base_model", None)
    return get() if get else model


def is_better(task: Task, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if task.select[1] else value < best
