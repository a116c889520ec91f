"""What `mk info` shows: an artifact's identity, files, size, parameters and lineage,
read from the manifest and safetensors headers only (no torch)."""

from __future__ import annotations

from pathlib import Path

from mk.core.artifact import HF_PICKLES, MANIFEST, Artifact, file_entries, open_artifact, sha256_file
from mk.core.errors import BadInput
from mk.core.safetensors_info import parameter_count


def count_parameters(art: Artifact) -> int | None:
    """Parameters from safetensors headers; from the ONNX initializers for ONNX."""
    if art.kind != "model":
        return None
    shards = sorted(art.path.glob("*.safetensors"))
    if shards:
        return sum(parameter_count(p) for p in shards)
    if art.format == "onnx" and (art.path / "model.onnx").is_file():
        import onnx  # light: protobuf only

        try:
            model = onnx.load(str(art.path / "model.onnx"), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError and friends for corrupt files
            raise BadInput(f"{art.path / 'model.onnx'}: corrupt ONNX file ({e})") from None
        total = 0
        for init in model.graph.initializer:
            n = 1
            for d in init.dims:
                n *= d
            total += n
        return total
    return None


def check_files(art: Artifact, verify: bool = False) -> list[str]:
    """Listed files that are gone or whose size differs from the manifest, and files
    the manifest does not list; with `verify`, every listed file is hashed from
    disk (hashing gigabytes is not what a plain `info` should cost)."""
    if not art.has_manifest:
        return []
    problems = []
    for entry in art.manifest["files"] or []:
        name, p = entry["name"], art.path / entry["name"]
        if p.is_symlink() or (p.exists() and not p.is_file()):
            problems.append(f"{name}: not a regular file inside the artifact")
        elif not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {p.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif verify:
            problems += _hash_problem(p, entry)
    listed = {e["name"] for e in art.manifest["files"] or []}
    problems += [f"{e['name']}: not listed in the manifest" for e in file_entries(art.path, hashes=False)
                 if e["name"] not in listed]
    return problems


def _hash_problem(path: Path, entry: dict) -> list[str]:
    if not entry.get("sha256"):
        return [f"{entry['name']}: the manifest records no sha256 to verify"]
    try:
        digest = sha256_file(path)
    except OSError as e:
        return [f"{entry['name']}: unreadable ({e.strerror})"]
    return [] if digest == entry["sha256"] else [f"{entry['name']}: sha256 differs from the manifest"]


def describe(path: str | Path, lineage: bool = False, verify: bool = False) -> dict:
    # info reads headers and manifests only, never unpickles weights: a pickled folder is described, not refused
    art = open_artifact(path, trust_pickle=True)
    files = art.manifest.get("files") or [
        {"name": e["name"], "bytes": e["bytes"]} for e in file_entries(art.path, hashes=False)]
    problems = check_files(art, verify)
    try:
        parameters = count_parameters(art)
    except BadInput as e:  # a truncated or corrupt weights file: one more problem, after the report
        parameters = None
        problems.append(e.message.removeprefix(f"{art.path}/"))
    info = {
        "path": str(art.path),
        "kind": art.kind,
        "format": art.format,
        "task": art.task,
        "labels": art.labels,
        "has_manifest": art.has_manifest,
        "files": [{"name": f["name"], "bytes": f["bytes"]} for f in files],
        "bytes": sum(f["bytes"] for f in files),
        "parameters": parameters,
        "created_by": art.manifest.get("created_by"),
        "parent": art.manifest.get("parent"),
        "dataset": art.manifest.get("dataset"),
        "metrics": art.metrics,
        "problems": problems,
        # weights only as a pickle: other commands refuse them unless --trust-pickle
        "pickled_weights": (not list(art.path.glob("*.safetensors")) and art.kind == "model"
                            and art.format == "safetensors"
                            and [n for n in HF_PICKLES if (art.path / n).is_file()][:1] or None),
    }
    for key in ("splits", "max_length", "truncation_rate", "cleaning", "source"):
        if key in art.manifest:
            info[key] = art.manifest[key]
    if lineage:
        info["lineage"] = [
            {"path": link.get("path") if a is None else str(a.path),
             "kind": a.kind if a else None, "format": a.format if a else None,
             "command": (a.manifest.get("created_by") or {}).get("command") if a else None,
             "metrics": a.metrics if a else {},
             "missing": bool(link.get("missing")), "changed": bool(link.get("changed"))}
            for a, link in art.lineage()
        ]
    return info


__all__ = ["describe", "count_parameters", "MANIFEST"]
