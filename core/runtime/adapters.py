"""An unmerged LoRA adapter (`mk tune --no-merge`) as a model: its base model, its
labels (a classifier's), the adapter on top. Loading lives here, beside the runtime that loads
every model; making and merging adapters is training's (core/training/lora.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mk.core.errors import BadInput

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_whole_model(path: Path, use: str) -> None:
    """What needs a whole model's weights (training on, teaching from, cutting,
    exporting) refuses an unmerged adapter in one line: mk bench, mk explain and
    mk serve load one onto its base, these do not."""
    if is_adapter(path):
        raise BadInput(f"{path}: an unmerged LoRA adapter (mk tune --no-merge); {use} needs a whole model",
                       hint="tune again without --no-merge: the adapter is then merged into its base")


def adapter_base(path: Path) -> Path:
    """Where an unmerged adapter's base model lives (recorded when it was saved)."""
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base = Path(cfg.get("base_model_name_or_path") or "")
    if not base.is_absolute():
        base = (Path(path) / base).resolve()
    if not (base / "config.json").is_file():
        raise BadInput(f"{path}: LoRA adapter whose base model {base} is gone",
                       hint="tune again with the adapter merged (the default)")
    return base


def load_adapter_classifier(path: Path, auto_cls, **kwargs):
    """An unmerged adapter artifact as a model: its base, its labels (a classifier's),
    the adapter."""
    from peft import PeftModel

    cfg = json.loads((Path(path) / "config.json").read_text())
    if cfg.get("id2label") and cfg.get("label2id"):
        kwargs = {"id2label": {int(k): v for k, v in cfg["id2label"].items()},
                  "label2id": cfg["label2id"]} | kwargs
    base = auto_cls.from_pretrained(str(adapter_base(path)), local_files_only=True, trust_remote_code=False,
                                    **kwargs)
    return PeftModel.from_pretrained(base, str(path), is_trainable=False)
