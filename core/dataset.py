"""Dataset artifacts: read splits as numpy arrays and cut them into batches; find
a model's dataset (`--data` or its lineage's) and check that its labels are the model's.

A dataset artifact holds `train/val/test.safetensors`, each with `input_ids`
(int32, padded to the dataset's max length), `attention_mask` (int8) and
`labels` (int64) — optionally `token_type_ids` for sentence pairs — or
`pixel_values` (float32) for images. Reading is numpy-only so that ONNX
Runtime paths never need torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mk.core.artifact import Artifact, changed_since, open_artifact
from mk.core.console import log
from mk.core.errors import BadInput
from mk.core.safetensors_info import read_header

SPLITS = ("train", "val", "test")
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def split_file(dataset: Artifact, split: str) -> Path:
    return dataset.path / f"{split}.safetensors"


def load_split(dataset: Artifact, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """One split as numpy arrays (the first `limit` rows when given)."""
    from safetensors.numpy import load_file

    if split not in SPLITS:
        raise BadInput(f"unknown split {split!r}; a dataset has {', '.join(SPLITS)}")
    path = split_file(dataset, split)
    if not path.is_file():
        raise BadInput(f"{path}: the dataset has no {split} split")
    read_header(path)  # a truncated file is named as such, not as a loader crash
    arrays = load_file(str(path))
    if "labels" not in arrays or not ({"input_ids", "pixel_values"} & arrays.keys()):
        raise BadInput(f"{path}: not a dataset split (needs labels and input_ids or pixel_values)")
    return {k: v[:limit] for k, v in arrays.items()} if limit else arrays


def num_rows(split: dict[str, np.ndarray]) -> int:
    return len(split["labels"])


def trim_padding(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A text batch cut to its longest real sequence, so padding to the dataset's
    max length costs nothing; image batches pass through."""
    if "attention_mask" not in inputs:
        return inputs
    width = max(int(inputs["attention_mask"].sum(axis=1).max()), 1)
    return {k: (v[:, :width] if k in TEXT_KEYS else v) for k, v in inputs.items()}


def batches(split: dict[str, np.ndarray], batch_size: int):
    """Yield (inputs, labels) batches in order, each cut to its longest sequence."""
    for i in range(0, num_rows(split), batch_size):
        inputs = {k: v[i:i + batch_size] for k, v in split.items() if k != "labels"}
        yield trim_padding(inputs), split["labels"][i:i + batch_size]


def open_dataset(path: str | Path) -> Artifact:
    return open_artifact(path, kind="dataset")


def lineage_dataset(model: Artifact) -> Artifact | None:
    """The dataset the nearest artifact of the model's lineage records, or None when
    none records one (a lineage that names a dataset that is gone is an error).
    One that changed since it was recorded is used with a warning, not refused, as
    `mk info --lineage` only marks a changed parent: a dataset may be remade on purpose."""
    for art, _ in model.lineage():
        if art is not None and (p := art.dataset_path()) is not None:
            if not p.exists():
                raise BadInput(f"{model.path}: its lineage names the dataset {p}, which no longer exists",
                               hint="pass --data DATASET")
            dataset = open_dataset(p)
            if changed_since(art.manifest["dataset"], dataset):
                log.warning("%s: not the dataset %s recorded (its sha256 differs: changed or remade since); "
                            "using it anyway (pass --data to choose one)", p, art.path / "mk.json")
            return dataset
    return None


def dataset_for(model: Artifact, data: str | Path | None) -> Artifact:
    """`--data` when given, else the dataset recorded in the model's lineage."""
    found = open_dataset(data) if data is not None else lineage_dataset(model)
    if found is None:
        raise BadInput(f"{model.path}: no dataset in its lineage", hint="pass --data DATASET (made by `mk prep`)")
    return found


def label_mismatch(names, labels, who: str, unnamed_ok: bool = False) -> str | None:
    """Why a model's label ids (`names`, in id order) cannot be read as a dataset's,
    or None when they can: another count, or other names id by id. With
    `unnamed_ok` (training, which gives the ids their meaning), a head of
    transformers' default names (LABEL_0, LABEL_1, …) matches labels of its count."""
    names, labels = [str(n) for n in names], [str(label) for label in labels]
    unnamed = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if len(names) == len(labels) and (names == labels or (unnamed_ok and unnamed)):
        return None
    ours, theirs = ", ".join(names), ", ".join(labels)
    if len(names) != len(labels):
        return f"{who} has {len(names)} labels ({ours}), the dataset has {len(labels)} ({theirs})"
    order = " (the same names in another order)" if sorted(names) == sorted(labels) else ""
    return f"{who}'s labels ({ours}) differ from the dataset's ({theirs}){order}"


def check_labels(model: Artifact, dataset: Artifact, hint: str | None = None) -> None:
    """Exit 2 when the dataset's label ids stand for other classes than the model's:
    an accuracy, a gate or an importance measured on it would mean nothing."""
    if model.labels and dataset.labels and (why := label_mismatch(model.labels, dataset.labels, "the model")):
        raise BadInput(f"{dataset.path}: {why}", hint=hint)


def save_split(root: Path, split: str, arrays: dict[str, np.ndarray]) -> Path:
    """Write one split in the contract's dtypes (input_ids int32, attention_mask and
    token_type_ids int8, labels int64, pixel_values float32)."""
    from safetensors.numpy import save_file

    path = Path(root) / f"{split}.safetensors"
    save_file({k: np.ascontiguousarray(v, dtype=SPLIT_DTYPES.get(k)) for k, v in arrays.items()}, str(path))
    return path


_ST_DTYPES = {np.dtype(np.int32): "I32", np.dtype(np.int8): "I8", np.dtype(np.int64): "I64",
              np.dtype(np.float32): "F32"}
SPLIT_DTYPES = {"input_ids": np.int32, "attention_mask": np.int8, "token_type_ids": np.int8,
                "labels": np.int64, "pixel_values": np.float32,
                "prompt_lengths": np.int32}  # generation datasets: prompt tokens per row


class SplitWriter:
    """Write one split's safetensors file in pieces, for splits larger than memory.

    The shapes are known up front, so the header is written first and the file
    is memory-mapped; rows land at any positions (a shuffled order costs
    nothing), and each `write` flushes and drops its pages, so the memory used
    stays that of one chunk. The file loads with `safetensors` like any other.
    """

    def __init__(self, root: Path, split: str, rows: int, tails: dict[str, tuple[int, ...]]):
        import json
        import mmap

        self.path = Path(root) / f"{split}.safetensors"
        header, offset, layout = {}, 0, []
        for name in sorted(tails):
            dtype = np.dtype(SPLIT_DTYPES[name])
            shape = (rows, *tails[name])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            layout.append((name, dtype, shape, offset))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        start = 8 + len(blob)
        with open(self.path, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            f.truncate(start + offset)
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), start + offset) if offset else None
        self.arrays = {name: (np.ndarray(shape, dtype, buffer=self._map, offset=start + off) if self._map
                              else np.zeros(shape, dtype)) for name, dtype, shape, off in layout}

    def write(self, positions: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Put row i of every array at row positions[i] of the split."""
        for name, values in arrays.items():
            self.arrays[name][positions] = values
        self.flush()

    def flush(self) -> None:
        """Write out what was put in `arrays` and drop its pages (after writes
        into parts of rows, as packing does)."""
        import mmap

        if self._map is not None:
            self._map.flush()
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> Path:
        self.arrays = {}
        if self._map is not None:
            self._map.flush()
            self._map.close()
        self._file.close()
        return self.path
