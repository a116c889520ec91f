"""Never destroy what mk did not make: what --force may replace, races at the final
rename, stale temporaries, missing parent folders, file outputs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from conftest import write_labelled_csv
from mk.cli.main import app
from mk.core import outputs
from mk.core.artifact import write_manifest
from mk.core.errors import BadInput
from mk.core.outputs import atomic_file, atomic_output, check_output

runner = CliRunner()


def _artifact(path, content=b"weights"):
    with atomic_output(path) as tmp:
        (tmp / "payload.bin").write_bytes(content)
        write_manifest(tmp, kind="model", format="safetensors", labels=["a", "b"])
    return path


@pytest.fixture(params=["renameat2", "portable"])
def swap(request, monkeypatch):
    """Every race test runs on both paths: renameat2 and the lock-file fallback."""
    if request.param == "portable":
        monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    elif outputs._renameat2() is None:
        pytest.skip("no renameat2 here")
    return request.param


def _foreign_things(tmp_path):
    """What --force must never replace, built in tmp_path (never a system path)."""
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("draft")
    afile = tmp_path / "afile"
    afile.write_text("notes")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "empty-target", target_is_directory=True)
    (tmp_path / "empty-target").mkdir()
    spoiled = _artifact(tmp_path / "spoiled")
    (spoiled / "my-notes.txt").write_text("mine")
    return {"a folder that is not an mk artifact": folder, "a file": afile, "a FIFO": fifo,
            "a symbolic link": link, "files that mk did not write": spoiled}


def test_force_refuses_everything_but_an_mk_artifact_or_an_empty_folder(tmp_path):
    for what, path in _foreign_things(tmp_path).items():
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(BadInput, match=what):
            with atomic_output(path, force=True) as tmp:
                (tmp / "x").write_text("new")
        assert sorted(p.name for p in tmp_path.iterdir()) == before, what
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "draft"
    assert (tmp_path / "spoiled" / "my-notes.txt").read_text() == "mine"
    assert os.path.islink(tmp_path / "link") and (tmp_path / "empty-target").is_dir()
    # what --force may replace
    (tmp_path / "empty").mkdir()
    _artifact(tmp_path / "art")
    for path in (tmp_path / "empty", tmp_path / "art"):
        with atomic_output(path, force=True) as tmp:
            (tmp / "x").write_text("new")
        assert [p.name for p in path.iterdir()] == ["x"]


def test_mk_prep_force_keeps_a_folder_of_other_files(tmp_path, tweets_rows, minilm_dir):
    src = write_labelled_csv(tmp_path / "data.csv", tweets_rows, 20)
    (tmp_path / "out" / "precious").mkdir(parents=True)
    (tmp_path / "out" / "precious" / "thesis.txt").write_text("draft")
    r = runner.invoke(app, ["prep", str(src), "--tokenizer", str(minilm_dir),
                            "-o", str(tmp_path / "out" / "precious"), "--force"])
    assert r.exit_code == 2, r.output
    assert "error: " in r.stderr and "not an mk artifact" in r.stderr
    assert (tmp_path / "out" / "precious" / "thesis.txt").read_text() == "draft"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["precious"]


@pytest.mark.parametrize("notes", [["notes.txt"], []])  # even an empty folder is not replaced
def test_a_folder_made_at_the_output_during_the_run_is_kept(tmp_path, swap, notes):
    out = tmp_path / "race"
    with pytest.raises(BadInput, match="changed while this run was writing"):
        with atomic_output(out) as tmp:
            (tmp / "result").write_text("mine")
            out.mkdir()
            for name in notes:
                (out / name).write_text("notes")
    assert os.listdir(out) == notes and sorted(os.listdir(tmp_path)) == ["race"]


def test_force_does_not_replace_what_was_swapped_in_during_the_run(tmp_path, swap):
    out = _artifact(tmp_path / "out", b"old")
    with pytest.raises(BadInput, match="changed while this run was writing"):
        with atomic_output(out, force=True) as tmp:
            (tmp / "result").write_text("mine")
            _artifact(tmp_path / "other", b"another run's")  # another writer finished first
            os.rename(out, tmp_path / "moved")
            os.rename(tmp_path / "other", out)
    assert (out / "payload.bin").read_bytes() == b"another run's"
    assert sorted(os.listdir(tmp_path)) == ["moved", "out"]


def test_force_swaps_in_a_replacement_and_removes_the_old_artifact(tmp_path, swap):
    out = _artifact(tmp_path / "out", b"old")
    with atomic_output(out, force=True) as tmp:
        (tmp / "result").write_text("new")
    assert os.listdir(out) == ["result"] and os.listdir(tmp_path) == ["out"]


def _writer(out, force=False) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys, time
        from mk.core.outputs import atomic_output
        from mk.core.errors import BadInput
        try:
            with atomic_output({str(out)!r}, force={force}) as tmp:
                print("writing", flush=True)
                sys.stdin.readline()
        except BadInput as e:
            print("refused:", e.message, flush=True)
            sys.exit(2)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    out = tmp_path / "x"
    first = _writer(out)
    assert first.stdout.readline().strip() == "writing"
    second = _writer(out, force=True)
    line = second.stdout.readline()
    assert second.wait(timeout=60) == 2
    assert "another process" in line and f"pid {first.pid}" in line
    first.communicate("\n", timeout=60)
    assert first.returncode == 0 and out.is_dir()


def test_stale_temporaries_of_killed_runs_are_removed_and_said(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".x.tmp-{gone}"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 100)
    other = tmp_path / f".y.tmp-{gone}"  # another output's: not ours to judge
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="mk"):
        with atomic_output(tmp_path / "x") as tmp:
            (tmp / "r").write_text("r")
    assert not stale.exists() and other.exists()
    assert f"removed {stale}" in caplog.text and "did not finish" in caplog.text


def test_the_portable_lock_refuses_while_another_live_process_holds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_renameat2", lambda: None)
    (tmp_path / ".x.lock").write_text(str(os.getppid()))  # a live process
    with pytest.raises(BadInput, match="is putting it in place now"):
        with atomic_output(tmp_path / "x") as tmp:
            (tmp / "r").write_text("r")
    assert not (tmp_path / "x").exists()
    (tmp_path / ".x.lock").write_text("999999999")  # a process that is gone: its lock is stale
    with atomic_output(tmp_path / "x") as tmp:
        (tmp / "r").write_text("r")
    assert sorted(os.listdir(tmp_path)) == ["x"]


def test_missing_parent_folders_are_made_and_removed_again_on_failure(tmp_path):
    deep = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(deep) as tmp:
            assert (tmp_path / "a" / "b").is_dir()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("k")
    with pytest.raises(RuntimeError):
        with atomic_output(deep):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "a") == ["keep"]  # only what this run made is removed
    with atomic_output(deep) as tmp:
        (tmp / "r").write_text("r")
    assert (deep / "r").is_file()


def test_parents_below_a_file_are_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput, match="parent is a file"):
        check_output(tmp_path / "afile" / "sub" / "out", force=True)


def test_file_outputs_replace_only_what_the_command_recognises(tmp_path, swap):
    def ours(path):
        return None if path.read_text().startswith("mk") else "a file mk did not write"

    target = tmp_path / "r.json"
    target.write_text("someone's data")
    with pytest.raises(BadInput, match="already exists"):
        check_output(target, False, blocker=outputs.file_blocker(ours))
    with pytest.raises(BadInput, match="a file mk did not write"):
        with atomic_file(target, True, ours) as tmp:
            tmp.write_text("mk new")
    assert target.read_text() == "someone's data"
    target.write_text("mk old")
    with atomic_file(target, True, ours) as tmp:
        tmp.write_text("mk new")
    assert target.read_text() == "mk new" and os.listdir(tmp_path) == ["r.json"]
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="FIFO"):
        with atomic_file(fifo, True, ours) as tmp:
            tmp.write_text("mk new")


def test_bench_outputs_keep_a_file_mk_did_not_write(tmp_path):
    from mk.core.measurement.bench_report import check_paths, write_output

    result = {"schema": "mk.bench/1", "mode": "offline", "artifacts": [], "results": []}
    target = tmp_path / "results.json"
    target.write_text('{"mine": 1}')
    with pytest.raises(BadInput, match="already exists"):
        check_paths(target, None, force=False)
    with pytest.raises(BadInput, match="not a `mk bench` result"):
        check_paths(target, None, force=True)
    (tmp_path / "plot.png").write_bytes(b"png")
    with pytest.raises(BadInput, match="already exists"):
        check_paths(None, tmp_path / "plot.png", force=False)
    check_paths(None, tmp_path / "plot.png", force=True)  # a plot cannot say who made it: any regular file
    target.write_text(json.dumps(result | {"old": True}))
    write_output(result, target, force=True)
    assert json.loads(target.read_text()) == result
    write_output(result, tmp_path / "new" / "deep" / "r.json")  # missing parents are made
    assert (tmp_path / "new" / "deep" / "r.json").is_file()


def test_two_mk_prep_started_together_one_wins_the_other_says_so(tmp_path, tweets_rows, minilm_dir):
    src = write_labelled_csv(tmp_path / "data.csv", tweets_rows, 30)
    mk = os.path.join(os.path.dirname(sys.executable), "mk")
    args = [mk, "prep", str(src), "--tokenizer", str(minilm_dir), "-o", str(tmp_path / "out" / "x")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "another process" in loser or "changed while this run was writing" in loser, loser
    assert json.loads((tmp_path / "out" / "x" / "mk.json").read_text())["kind"] == "dataset"
    assert os.listdir(tmp_path / "out") == ["x"]


def test_an_output_inside_an_input_or_any_mk_artifact_is_refused(tmp_path):
    """-o inside an input, or inside any mk artifact, would add files the artifact's
    manifest does not list (it would no longer verify, nor be replaceable with --force)."""
    d2, data = _artifact(tmp_path / "d2"), _artifact(tmp_path / "data")
    plain = tmp_path / "hf"  # an input that is not an mk artifact: a folder it reads is an input all the same
    plain.mkdir()
    with pytest.raises(BadInput, match="-o .*d2/int8: inside the input .*d2"):
        check_output(d2 / "int8", force=False, inputs=[d2])
    with pytest.raises(BadInput, match="inside the input .*hf"):
        check_output(plain / "deep" / "out", force=True, inputs=[plain])
    with pytest.raises(BadInput, match=f"inside the mk artifact {data}"):
        check_output(data / "sub" / "out", force=False, inputs=[d2])
    with pytest.raises(BadInput, match="would overwrite the input"):  # and the converse, even with --force
        check_output(tmp_path, force=True, inputs=[d2])
    assert check_output(tmp_path / "beside", force=False, inputs=[d2, data]) == tmp_path / "beside"
    other = tmp_path / "project"  # another tool's mk.json does not make its folder an artifact
    other.mkdir()
    (other / "mk.json").write_text('{"tasks": []}')
    assert check_output(other / "out", force=False) == other / "out"


def test_commands_refuse_an_output_inside_their_input_before_any_work(tmp_path, tiny_model, tweets_rows,
                                                                       minilm_dir):
    import shutil

    from mk.core.artifact import open_artifact
    from mk.core.info import check_files

    model = tmp_path / "d2"
    shutil.copytree(tiny_model, model)
    before = sorted(p.name for p in model.iterdir())
    r = runner.invoke(app, ["quant", str(model), "--no-gate", "-o", str(model / "int8")])
    assert r.exit_code == 2 and f"-o {model / 'int8'}: inside the input {model}" in r.stderr, r.stderr
    r = runner.invoke(app, ["bench", str(model), "--iters", "1", "--rounds", "1", "--batch-sizes", "1",
                            "--seq-lens", "8", "-o", str(model / "bench.json")])
    assert r.exit_code == 2 and "inside the input" in r.stderr, r.stderr
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "d2-onnx").exists()
    # a dataset artifact that is not this command's input: mk prep -o inside it
    src = write_labelled_csv(tmp_path / "two.csv", tweets_rows, per_label=20)
    data = tmp_path / "data"
    r = runner.invoke(app, ["-q", "prep", str(src), "--tokenizer", str(minilm_dir), "-o", str(data)])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["-q", "prep", str(src), "--tokenizer", str(minilm_dir), "-o", str(data / "sub")])
    assert r.exit_code == 2 and "inside the mk artifact" in r.stderr, r.stderr
    assert not (data / "sub").exists() and check_files(open_artifact(data), verify=True) == []
