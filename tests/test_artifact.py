"""Manifests, lineage and atomic writes: the contract every step relies on."""

from __future__ import annotations

import hashlib
import json
import shutil
import os
import signal
import subprocess
import sys
import re
import textwrap

import pytest

from mk.core.artifact import MANIFEST, open_artifact, write_manifest
from mk.core.outputs import atomic_output
from mk.core.errors import BadInput


def _make(path, parent=None, dataset=None, kind="model", content=b"weights"):
    with atomic_output(path) as tmp:
        (tmp / "payload.bin").write_bytes(content)
        write_manifest(tmp, kind=kind, format="safetensors", labels=["a", "b"], task="text-classification",
                       parent=parent, dataset=dataset, metrics={"accuracy": 0.5})
    return open_artifact(path)


def test_manifest_round_trip_lists_files_with_sizes_and_hashes(tmp_path):
    art = _make(tmp_path / "m")
    m = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert m["schema"] == 1 and m["kind"] == "model" and m["labels"] == ["a", "b"]
    assert m["files"] == [{"name": "payload.bin", "bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}]
    assert m["created_by"]["command"] and m["created_by"]["mk_version"]
    assert art.metrics == {"accuracy": 0.5} and art.task == "text-classification"


def test_lineage_follows_parents_and_notices_a_changed_parent(tmp_path):
    data = _make(tmp_path / "data", kind="dataset")
    a = _make(tmp_path / "a", dataset=data)
    b = _make(tmp_path / "b", parent=a)
    c = _make(tmp_path / "c", parent=b)
    chain = c.lineage()
    assert [art.path.name for art, _ in chain] == ["c", "b", "a"]
    assert not any(link.get("changed") for _, link in chain)
    assert c.manifest["parent"]["sha256"] == b.digest()
    # the dataset default comes from the lineage
    from mk.core.dataset import dataset_for
    assert dataset_for(c, None).path == data.path.resolve()
    # rewriting b (a new run) changes its digest: c's link is flagged
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(manifest | {"metrics": {"accuracy": 0.9}}))
    assert open_artifact(tmp_path / "c").lineage()[1][1]["changed"]


def test_atomic_output_leaves_nothing_on_failure_and_keeps_existing_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    _make(out)
    with pytest.raises(BadInput, match="already exists"):
        with atomic_output(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(out, force=True) as tmp:
            raise RuntimeError("boom")
    assert (out / "payload.bin").read_bytes() == b"weights"  # the old output survives a failed --force
    with atomic_output(out, force=True) as tmp:
        (tmp / "new.bin").write_bytes(b"n")
    assert [p.name for p in out.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_the_middle_of_writing_leaves_nothing(tmp_path, sig):
    # Ctrl-C's default handler set here: a test run started in the background of a
    # non-interactive shell hands its children SIGINT ignored
    script = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from mk.core.outputs import atomic_output
        with atomic_output({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "part.bin").write_bytes(b"x" * 1000)
            print("ready", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert os.listdir(tmp_path) == []


def test_plain_hugging_face_folder_is_a_model_artifact(tiny_model):
    art = open_artifact(tiny_model)
    assert (art.kind, art.format, art.task) == ("model", "safetensors", "text-classification")
    assert art.labels == ["negative", "neutral", "positive"] and not art.has_manifest
    assert len(art.digest()) == 64


def test_pickled_checkpoints_are_refused_unless_trusted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BadInput, match="pickled checkpoint"):
        open_artifact(tmp_path)
    assert open_artifact(tmp_path, trust_pickle=True).kind == "model"


def test_wrong_kind_is_bad_input(tmp_path):
    _make(tmp_path / "d", kind="dataset")
    with pytest.raises(BadInput, match="is a dataset artifact, expected a model"):
        open_artifact(tmp_path / "d", kind="model")


def test_a_tree_of_artifacts_keeps_its_lineage_when_moved(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    data = _make(tree / "data", kind="dataset")
    _make(tree / "tuned", parent=_make(tree / "base"), dataset=data)
    moved = tmp_path / "elsewhere"
    tree.rename(moved)
    tuned = open_artifact(moved / "tuned")
    assert tuned.parent_path() == (moved / "base").resolve()
    assert tuned.dataset_path() == (moved / "data").resolve()
    assert not any(link.get("changed") for _, link in tuned.lineage())


def test_check_output_refuses_what_cannot_or_must_not_be_written(tmp_path):
    from mk.core.outputs import check_output
    from mk.core.errors import BadInput

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(BadInput, match="parent is a file"):
        check_output(afile / "out", force=True)
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    for out in (data, tmp_path / "work"):  # the input itself, or a folder holding it: --force would delete it
        with pytest.raises(BadInput, match="would overwrite the input"):
            check_output(out, force=True, inputs=[data])
    assert check_output(tmp_path / "new", force=False, inputs=[data]) == tmp_path / "new"


def test_a_folder_with_model_onnx_and_config_reads_as_an_onnx_model(tmp_path, tiny_model):
    from mk.core.artifact import open_artifact

    folder = tmp_path / "optimum-export"
    folder.mkdir()
    shutil.copy2(tiny_model / "config.json", folder / "config.json")
    (folder / "model.onnx").write_bytes(b"not checked until a runtime loads it")
    art = open_artifact(folder, kind="model")
    assert (art.format, art.labels) == ("onnx", ["negative", "neutral", "positive"])


@pytest.mark.parametrize("key,value", [("labels", "a,b"), ("parent", "../x"), ("files", {})])
def test_a_hand_edited_manifest_of_the_wrong_shape_is_named(tmp_path, tiny_model, key, value):
    from mk.core.artifact import open_artifact, write_manifest
    from mk.core.errors import BadInput

    art = tmp_path / "art"
    shutil.copytree(tiny_model, art)
    manifest = write_manifest(art, kind="model", format="safetensors", labels=["a", "b"])
    (art / "mk.json").write_text(json.dumps({**manifest, key: value}))
    with pytest.raises(BadInput, match=f"invalid manifest: '{key}' is a"):
        open_artifact(art)


@pytest.mark.parametrize("entry, problem", [
    ({"name": "../../elsewhere.csv", "bytes": 1}, "not a plain relative name"),
    ({"name": "/etc/passwd", "bytes": 1}, "not a plain relative name"),
    ({"bytes": 1}, "files[1] has no 'name'"),
    ({"name": "x", "bytes": "12"}, "files[1].bytes is '12'"),
    (7, "files[1] is a int, expected an object"),
    ({"path": 5, "sha256": "x"}, "parent.path is 5, expected a string"),
])
def test_manifest_file_entries_stay_inside_the_artifact(tmp_path, entry, problem):
    _make(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    if problem.startswith("parent"):
        manifest["parent"] = entry
    else:
        manifest["files"].append(entry)
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match=re.escape(problem)):
        open_artifact(tmp_path / "m")


def test_verify_hashes_every_listed_file_from_disk_and_reports_extra_files(tmp_path):
    from mk.core.info import describe

    _make(tmp_path / "m")
    assert describe(tmp_path / "m", verify=True)["problems"] == []
    (tmp_path / "m" / "payload.bin").write_bytes(b"WEIGHTS")  # same size, other bytes
    (tmp_path / "m" / "extra.txt").write_text("x")
    problems = describe(tmp_path / "m", verify=True)["problems"]
    assert problems == ["payload.bin: sha256 differs from the manifest", "extra.txt: not listed in the manifest"]
    (tmp_path / "m" / "payload.bin").unlink()
    os.mkfifo(tmp_path / "m" / "payload.bin")  # unreadable as a file: reported, not trusted
    problems = describe(tmp_path / "m", verify=True)["problems"]
    assert problems[0] == "payload.bin: not a regular file inside the artifact"
