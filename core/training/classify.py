"""Classification for `mk tune`: sequence and image classifiers, a head planned
for the dataset's labels, cross-entropy (or distillation from a teacher's
logits), accuracy and macro-F1 through the same evaluation as `mk bench`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mk.core.artifact import Artifact, open_artifact
from mk.core.console import log
from mk.core.dataset import label_mismatch, trim_padding
from mk.core.errors import BadInput
from mk.core.runtime.adapters import check_whole_model
from mk.core.tokenizer_match import check_same_tokenizer, has_tokenizer
from mk.core.training.task import base_model, evaluating



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


def plan_head(model_path: Path, labels: list[str], new_head: bool) -> dict:
    """How to get a head for the dataset's labels: keep the model's, or make one.

    A base encoder gets a fresh head. A classifier keeps its head when it has as
    many labels as the dataset; re-initialising a trained head takes --new-head."""
    has_head, names = _head(_config(model_path))
    if not has_head or new_head:
        return {"fresh": True, "ignore_mismatched_sizes": has_head}
    if why := label_mismatch(names, labels, "its head", unnamed_ok=True):
        raise BadInput(f"{model_path}: {why}", hint="pass --new-head to train a fresh head for the dataset's labels")
    return {"fresh": False, "ignore_mismatched_sizes": False}


def check_teacher(teacher: Artifact, dataset: Artifact, labels: list[str]) -> None:
    check_whole_model(teacher.path, "--teacher")
    if teacher.format != "safetensors":
        raise BadInput(f"{teacher.path}: a teacher must be a safetensors model (this one is {teacher.format})")
    has_head, names = _head(_config(teacher.path))
    if not has_head:
        raise BadInput(f"{teacher.path}: the teacher has no classification head",
                       hint="distil from a fine-tuned classifier (the output of `mk tune`)")
    if why := label_mismatch(names, labels, "the teacher", unnamed_ok=True):
        raise BadInput(f"{teacher.path}: {why}", hint="distil from a teacher tuned on this dataset's labels")
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


class ClassifierTask:
    """A classifier (sequence or image) on a labelled dataset, optionally
    distilled from a teacher's logits."""

    select = ("macro_f1", True)
    default_lora = None

    def __init__(self, dataset: Artifact, base: Artifact, opts):
        self.dataset, self.base, self.opts = dataset, base, opts
        self.name = dataset.task or "text-classification"
        if base.task == "text-generation":
            raise BadInput(f"{base.path}: is a causal LM (text-generation); the {self.name} dataset "
                           f"{dataset.path} needs a classifier or an encoder",
                           hint="tune a causal LM on a dataset made by `mk prep --task generate`")
        self.labels = [str(l) for l in dataset.labels]
        if len(self.labels) < 2:
            raise BadInput(f"{dataset.path}: needs at least two labels, has {len(self.labels)}")
        self.head = plan_head(base.path, self.labels, opts.new_head)
        self.tokenizer = (None if self.name == "image-classification"
                          else check_same_tokenizer(dataset, base.path))
        self.teacher_art = None
        if opts.teacher:
            self.teacher_art = open_artifact(opts.teacher, kind="model")
            check_teacher(self.teacher_art, dataset, self.labels)
        self.teacher, self.device, self.accepts_tt = None, "cpu", True

    def load_model(self, device: str, seed: int):
        import torch

        from mk.core.runtime.torch_runtime import accepts_token_types, load_classifier

        labels = self.labels
        torch.manual_seed(seed)  # the fresh head starts the same on every rank and every run
        overrides = {"id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
        if self.head["ignore_mismatched_sizes"]:
            overrides["ignore_mismatched_sizes"] = True
        model = load_classifier(self.base.path, self.name, **overrides)
        if self.head["fresh"]:
            log.info("new classification head: %d labels (%s)", len(labels), ", ".join(labels))
        if self.teacher_art is not None:
            self.teacher = load_classifier(self.teacher_art.path, self.name).to(device).eval()
            self.teacher.requires_grad_(False)
        self.device, self.accepts_tt = device, accepts_token_types(model)
        return model

    def check_splits(self, model, splits: dict[str, dict | None]) -> None:
        cfg = base_model(model).config
        vocab = getattr(cfg, "vocab_size", None)
        positions = getattr(cfg, "max_position_embeddings", None)
        for name, split in splits.items():
            if split is not None:
                _check_split(name, split, self.labels, vocab, positions, self.dataset.path)

    def weight(self, split: dict, idx: np.ndarray) -> int:
        return len(idx)

    def loss_sum(self, runner, split: dict, idx: np.ndarray, autocast):
        from mk.core.training.distill import per_example_loss

        feed, labels = make_batch(split, idx, self.device, self.accepts_tt)
        with autocast():
            logits = runner(**feed).logits
            t_logits = self.teacher(**feed).logits if self.teacher is not None else None
        return per_example_loss(logits, labels, t_logits, self.opts.temperature, self.opts.alpha).sum()

    def evaluate(self, model, split: dict, autocast, description: str) -> dict:
        from mk.core.evaluation import evaluate
        from mk.core.runtime.torch_runtime import TorchRuntime

        with evaluating(model), autocast():
            m = evaluate(TorchRuntime(model, self.device), split, len(self.labels), self.opts.eval_batch_size,
                         description)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}

    def test(self, model, split: dict, autocast) -> dict:
        return {**self.evaluate(model, split, autocast, "test"), "split": "test"}

    def describe(self, metrics: dict) -> str:
        return f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
