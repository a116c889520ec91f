"""Eager PyTorch inference of a Hugging Face classifier folder."""

from __future__ import annotations

import numpy as np

from mk.core.artifact import Artifact
from mk.core.device import resolve_device
from mk.core.errors import library_error


def load_classifier(path, task: str | None, **overrides):
    """AutoModelFor{Sequence,Image}Classification from a folder, quietly and offline.

    `overrides` go to from_pretrained (id2label, ignore_mismatched_sizes, …). An
    unmerged LoRA adapter (`mk tune --no-merge`) loads onto its base model."""
    import transformers
    from safetensors import SafetensorError

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars would clutter stderr
    auto = (transformers.AutoModelForImageClassification if task == "image-classification"
            else transformers.AutoModelForSequenceClassification)
    try:
        from mk.core.runtime import adapters
        if adapters.is_adapter(path):
            return adapters.load_adapter_classifier(path, auto, **overrides)
        return auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False, **overrides)
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # corrupt weights, a foreign folder
        raise library_error(e, path, "cannot load the model") from None


def accepts_token_types(model) -> bool:
    """Whether forward() takes token_type_ids (BERT does, DistilBERT does not).
    The signature, not __code__: transformers wraps forward in decorators; a peft
    wrapper is looked through to the transformers model under it."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "token_type_ids" in inspect.signature(base.forward).parameters


class TorchRuntime:
    """A torch classifier behind the runtime interface. The constructor takes a model
    already in memory (`mk tune` evaluates the model it trains, `mk prune` the one it
    cuts); `TorchRuntime.load` reads an artifact."""

    name = "torch"

    def __init__(self, model, device: str, threads: int | None = None, artifact: Artifact | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.device = str(device)
        self.artifact = artifact
        self.model = model
        self._accepts_token_types = accepts_token_types(model)

    @classmethod
    def load(cls, art: Artifact, device: str = "auto", threads: int | None = None) -> "TorchRuntime":
        device = resolve_device(device)
        model = load_classifier(art.path, art.task).to(device).eval()
        return cls(model, device, threads, art)

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        feed = {}
        for k, v in batch.items():
            if k == "token_type_ids" and not self._accepts_token_types:
                continue
            t = torch.from_numpy(np.ascontiguousarray(v))
            feed[k] = (t.float() if k == "pixel_values" else t.long()).to(self.device, non_blocking=True)
        with torch.inference_mode():
            logits = self.model(**feed).logits
        return logits.float().cpu().numpy()  # .cpu() synchronises CUDA

    def describe(self) -> dict:
        return {"runtime": self.name, "device": self.device, "threads": self.threads}
