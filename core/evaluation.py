"""Accuracy and macro-F1 of any runtime on a dataset split: the one evaluation
used by `mk tune`, the quality gates of `mk quant` / `mk prune`, and `mk bench`."""

from __future__ import annotations

import numpy as np

from mk.core.console import progress
from mk.core.dataset import batches, num_rows


def classification_metrics(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    preds, labels = np.asarray(preds), np.asarray(labels)
    f1s = []
    for c in range(num_labels):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        if tp + fp + fn:  # a class absent from both is left out, as scikit-learn does with labels=present
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": float(np.mean(preds == labels)) if len(labels) else float("nan"),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "n": int(len(labels)),
    }


def predict(runtime, split: dict[str, np.ndarray], batch_size: int = 32, description: str = "evaluating"):
    """Logits of a runtime over a split, batch by batch, with progress on a terminal."""
    out = []
    with progress(description, total=num_rows(split)) as bar:
        for inputs, labels in batches(split, batch_size):
            out.append(runtime(inputs))
            bar.advance(len(labels))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(runtime, split: dict[str, np.ndarray], num_labels: int, batch_size: int = 32,
             description: str = "evaluating") -> dict:
    logits = predict(runtime, split, batch_size, description)
    return classification_metrics(logits.argmax(axis=-1), split["labels"], num_labels)
