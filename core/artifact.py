"""Artifacts: directories with a manifest `mk.json` (written atomically by `outputs`).

Every step of mk reads one artifact and writes another. The manifest says what
the artifact is (kind, format, task, labels), who made it from what (created_by,
parent with its digest, dataset) and what it measured (metrics), and lists its
files with sizes and sha256 so that a changed or truncated file is noticed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from mk.core import __version__
from mk.core.embedded import resolve_model
from mk.core.errors import BadInput

SCHEMA = 1
MANIFEST = "mk.json"
KINDS = ("dataset", "model")
FORMATS = {"dataset": ("safetensors",), "model": ("safetensors", "onnx", "tensorrt")}
REQUIRED = ("schema", "kind", "format", "labels", "created_by", "files")
# Weights a plain Hugging Face folder may hold; pickles only with --trust-pickle.
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HF_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, hashes: bool = True) -> list[dict]:
    """Every file of an artifact but the manifest: name (relative), bytes, sha256."""
    root = Path(root)
    return [
        {"name": p.relative_to(root).as_posix(), "bytes": p.stat().st_size}
        | ({"sha256": sha256_file(p)} if hashes else {})
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    ]


def created_by() -> dict:
    """The exact command line and mk version that made an artifact."""
    argv = [os.path.basename(sys.argv[0]) if sys.argv else "mk", *sys.argv[1:]]
    return {
        "command": shlex.join(argv),
        "mk_version": __version__,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Artifact:
    """An artifact on disk; a plain Hugging Face folder gets a synthesized manifest."""

    path: Path
    manifest: dict

    kind = property(lambda self: self.manifest["kind"])
    format = property(lambda self: self.manifest["format"])
    task = property(lambda self: self.manifest.get("task"))
    labels = property(lambda self: self.manifest.get("labels") or [])
    metrics = property(lambda self: self.manifest.get("metrics") or {})
    has_manifest = property(lambda self: (self.path / MANIFEST).is_file())

    def digest(self) -> str:
        """sha256 of the manifest (which holds every file's sha256), or of the files
        of a plain folder: what a child records as its parent's identity."""
        if self.has_manifest:
            return sha256_file(self.path / MANIFEST)
        h = hashlib.sha256()
        for e in file_entries(self.path):
            h.update(f"{e['name']}\0{e['sha256']}\n".encode())
        return h.hexdigest()

    def ref(self, root: Path) -> dict:
        """How the artifact being written at `root` points at this one: the path
        relative to `root` (a tree of artifacts can move as a whole; `root` may be
        the temporary sibling, which sits beside the final folder), the absolute
        path as a fallback, and the digest."""
        target = self.path.resolve()
        return {"path": os.path.relpath(target, Path(root).resolve()), "abs_path": str(target),
                "sha256": self.digest()}

    def _linked(self, key: str) -> Path | None:
        link = self.manifest.get(key)
        if not link or not link.get("path"):
            return None
        p = Path(link["path"])
        p = p if p.is_absolute() else (self.path / p).resolve()
        if not p.exists() and link.get("abs_path"):
            return Path(link["abs_path"])
        return p

    def parent_path(self) -> Path | None:
        return self._linked("parent")

    def dataset_path(self) -> Path | None:
        """The dataset this artifact was trained or calibrated on, if it says."""
        return self._linked("dataset")

    def lineage(self) -> list[tuple[Artifact | None, dict]]:
        """This artifact and its ancestors, newest first, following `parent` links.

        Each entry is (artifact or None when the parent is gone, the link followed);
        a parent whose digest changed since is flagged with link["changed"]."""
        chain: list[tuple[Artifact | None, dict]] = [(self, {"path": str(self.path)})]
        seen = {self.path.resolve()}
        current = self
        while (p := current.parent_path()) is not None and p not in seen:
            seen.add(p)
            link = dict(current.manifest["parent"])
            if not p.exists():
                chain.append((None, link | {"missing": True}))
                break
            parent = open_artifact(p)
            link["changed"] = changed_since(link, parent)
            chain.append((parent, link))
            current = parent
        return chain

    def config(self) -> dict:
        """The model's Hugging Face config.json, or {} when it has none readable
        (callers use it for optional facts: vocabulary size, position limit)."""
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def weights_file(self) -> Path | None:
        for name in (*HF_WEIGHTS, "model.onnx", "model.plan"):
            if (self.path / name).is_file():
                return self.path / name
        return None


def changed_since(link: dict, target: Artifact) -> bool:
    """Whether the artifact a link (`parent`, `dataset`) leads to is no longer the
    one recorded: its digest differs from the link's sha256 (a link without one
    cannot tell)."""
    return bool(link.get("sha256")) and link["sha256"] != target.digest()


def _synthesize_hf_manifest(path: Path, format: str = "safetensors") -> dict:
    """A plain Hugging Face model folder reads as a model artifact: safetensors, or
    onnx for a folder such as Optimum exports (model.onnx beside config.json)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path / 'config.json'}: unreadable Hugging Face config ({e})") from None
    archs = config.get("architectures") or []
    task = ("image-classification" if any("ImageClassification" in a for a in archs) else
            "text-classification" if any("SequenceClassification" in a for a in archs) else
            "text-generation" if any(a.endswith(("CausalLM", "LMHeadModel")) for a in archs) else
            "feature-extraction")
    id2label = config.get("id2label") or {}
    labels = [id2label[k] for k in sorted(id2label, key=int)] if task != "feature-extraction" else []
    return {
        "schema": SCHEMA, "kind": "model", "format": format, "task": task, "labels": labels,
        "created_by": {"command": None, "note": "plain Hugging Face folder"},
        "parent": None, "dataset": None, "metrics": {}, "files": None,
    }


def read_manifest(path: Path) -> dict:
    """Read and validate `mk.json`, naming the file and each problem found."""
    mpath = Path(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise BadInput(f"{mpath}: corrupt manifest, not JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise BadInput(f"{mpath}: corrupt manifest, expected a JSON object")
    problems = [f"missing {k!r}" for k in REQUIRED if k not in manifest]
    if manifest.get("schema", SCHEMA) > SCHEMA:
        problems.append(f"schema {manifest['schema']} is newer than this mk understands ({SCHEMA})")
    kind = manifest.get("kind")
    if kind is not None and kind not in KINDS:
        problems.append(f"unknown kind {kind!r}")
    elif kind and manifest.get("format") not in FORMATS[kind]:
        problems.append(f"unknown format {manifest.get('format')!r} for a {kind}")
    # a hand-edited manifest must fail here, with its name, not deep inside a command
    for key, types in (("labels", list), ("metrics", dict), ("parent", (dict, type(None))),
                       ("dataset", (dict, type(None))), ("files", (list, type(None)))):
        if key in manifest and not isinstance(manifest[key], types):
            problems.append(f"{key!r} is a {type(manifest[key]).__name__}")
    for key in ("parent", "dataset"):
        link = manifest.get(key)
        if isinstance(link, dict):
            problems += [f"{key}.{field} is {link[field]!r}, expected a string"
                         for field in ("path", "abs_path", "sha256")
                         if link.get(field) is not None and not isinstance(link[field], str)]
    if isinstance(manifest.get("files"), list):
        problems += _file_entry_problems(manifest["files"])
    if problems:
        raise BadInput(f"{mpath}: invalid manifest: {'; '.join(problems)}")
    return manifest


def _file_entry_problems(entries: list) -> list[str]:
    """A manifest lists files inside its own folder only: a name such as
    `../x` or `/etc/passwd` would make `--verify` (and --force) reach outside."""
    problems = []
    for i, e in enumerate(entries):
        where = f"files[{i}]"
        if not isinstance(e, dict):
            problems.append(f"{where} is a {type(e).__name__}, expected an object")
            continue
        name = e.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where} has no 'name'")
        elif not plain_relative(name):
            problems.append(f"{where}.name {name!r} is not a plain relative name inside the artifact")
        if not isinstance(e.get("bytes"), int) or isinstance(e.get("bytes"), bool) or e["bytes"] < 0:
            problems.append(f"{where}.bytes is {e.get('bytes')!r}, expected a byte count")
        if "sha256" in e and not (isinstance(e["sha256"], str) and len(e["sha256"]) == 64):
            problems.append(f"{where}.sha256 is not a sha256 hex digest")
    return problems


def plain_relative(name: str) -> bool:
    """`a/b.bin` yes; `/etc/passwd`, `../x`, `a/../../x`, `C:\\x`, `a\\b` no."""
    parts = name.split("/")
    return (not name.startswith("/") and "\\" not in name and ":" not in parts[0]
            and all(p not in ("", ".", "..") for p in parts))


def open_artifact(path: str | Path, kind: str | None = None, trust_pickle: bool = False) -> Artifact:
    """Open an artifact (or a plain Hugging Face model folder, or an embedded model
    name such as `minilm`), checking that it is of the expected kind."""
    path = resolve_model(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory")
    if not path.is_dir():
        raise BadInput(f"{path}: not an artifact (artifacts are directories with {MANIFEST})",
                       hint="pass the artifact's folder, not a file inside it")
    if (path / MANIFEST).exists():
        art = Artifact(path, read_manifest(path))
    elif (path / "config.json").is_file() and (path / "model.onnx").is_file():
        art = Artifact(path, _synthesize_hf_manifest(path, format="onnx"))
    elif (path / "config.json").is_file():
        if not any((path / w).is_file() for w in HF_WEIGHTS):
            if any((path / w).is_file() for w in HF_PICKLES) and not trust_pickle:
                raise BadInput(f"{path}: weights are a pickled checkpoint (pytorch_model.bin), "
                               "which can run code when loaded",
                               hint="convert it to safetensors, or pass --trust-pickle if you trust its source")
            if not any((path / w).is_file() for w in HF_PICKLES):
                raise BadInput(f"{path}: Hugging Face folder without weights (no model.safetensors)")
        art = Artifact(path, _synthesize_hf_manifest(path))
    else:
        raise BadInput(f"{path}: not an artifact: no {MANIFEST} and no Hugging Face config.json",
                       hint="make one with `mk prep` or `mk tune`, or pass a model folder")
    if kind and art.kind != kind:
        raise BadInput(f"{path}: is a {art.kind} artifact, expected a {kind}")
    return art


def write_manifest(root: Path, *, kind: str, format: str, labels: list[str], task: str | None = None,
                   parent: Artifact | None = None, dataset: Artifact | None = None,
                   metrics: dict | None = None, **extra) -> dict:
    """Write `mk.json` into a finished artifact folder (call last: it lists the files)."""
    manifest = {
        "schema": SCHEMA, "kind": kind, "format": format, "task": task, "labels": list(labels),
        "created_by": created_by(),
        "parent": parent.ref(root) if parent else None,
        "dataset": dataset.ref(root) if dataset else None,
        "metrics": metrics or {},
        **extra,
        "files": file_entries(root),
    }
    (Path(root) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def require_task(art: Artifact, tasks: tuple[str, ...], step: str) -> None:
    """A step refuses, with exit 2, a model whose task it does not handle (an encoder
    given to a causal-LM step, or the reverse)."""
    task = art.task or "an unknown task"
    if art.task not in tasks:
        raise BadInput(f"{art.path}: is a {task} model; {step} handles {' and '.join(tasks)} models")


def require(condition: bool, message: str, hint: str | None = None) -> None:
    """Validate at the boundary: a false condition is a bad-input error."""
    if not condition:
        raise BadInput(message, hint)


def human_bytes(n: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), as file managers and the README's tables give sizes."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"
