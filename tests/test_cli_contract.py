"""The command-line contract: stdout is the result, stdin carries the input,
bad input is one clear line with exit 2, and no traceback unless MK_DEBUG=1."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import run_mk, write_labelled_csv
from mk.cli.main import app
from mk.core.artifact import write_manifest

runner = CliRunner()


def test_help_lists_commands_and_exits_0():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "info" in r.stdout


def test_info_json_is_the_only_thing_on_stdout(tiny_model):
    r = run_mk("info", str(tiny_model), "--json", check=True)
    info = json.loads(r.stdout)
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["labels"] == ["negative", "neutral", "positive"] and info["kind"] == "model"


@pytest.mark.parametrize("stdin", ["{path}\n", '{{"path": "{path}"}}'])
def test_input_path_arrives_on_a_real_pipe(tiny_model, stdin):
    shell = f"printf '%s' '{stdin.format(path=tiny_model)}' | {Path(sys.executable).with_name('mk')} info --json"
    r = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(tiny_model)


def test_empty_stdin_is_bad_usage():
    r = run_mk("info", input="")
    assert r.returncode == 2 and "stdin was empty" in r.stderr and r.stdout == ""


def _one_error_line(r, *needles):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr
    assert r.stdout == ""


def test_missing_path(tmp_path):
    _one_error_line(run_mk("info", str(tmp_path / "nope")), "nope", "no such file")


def test_folder_that_is_not_an_artifact(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    _one_error_line(run_mk("info", str(tmp_path)), str(tmp_path), "not an artifact")


def test_corrupt_manifest(tmp_path):
    (tmp_path / "mk.json").write_text("{ not json")
    _one_error_line(run_mk("info", str(tmp_path)), "mk.json", "corrupt manifest")


def test_manifest_missing_fields(tmp_path):
    (tmp_path / "mk.json").write_text(json.dumps({"schema": 1, "kind": "model"}))
    _one_error_line(run_mk("info", str(tmp_path)), "missing 'format'", "missing 'files'")


def test_truncated_safetensors(tmp_path, tiny_model):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = sorted(p.name for p in bad.iterdir())
    r = run_mk("info", str(bad))  # the report, then its problems, then exit 2
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "kind" in r.stdout and "problem: model.safetensors: truncated" in r.stdout, r.stdout
    assert r.stderr.startswith("error: ") and "truncated" in r.stderr
    assert sorted(p.name for p in bad.iterdir()) == before  # nothing written
    for command in ("export-onnx", "quant"):  # they load the weights through transformers
        r = run_mk("-q", command, str(bad), "-o", str(tmp_path / command), *(["--no-gate"] * (command == "quant")))
        _one_error_line(r, "cannot load the model")
        assert not list(tmp_path.glob(f"*{command}*"))


def test_changed_file_is_reported_and_exits_2(tmp_path):
    art = tmp_path / "a"
    art.mkdir()
    (art / "w.bin").write_bytes(b"1234")
    write_manifest(art, kind="model", format="safetensors", labels=[])
    (art / "w.bin").write_bytes(b"12")
    r = run_mk("info", str(art))
    assert r.returncode == 2 and "w.bin: 2 bytes, manifest says 4" in r.stderr


def test_debug_shows_the_traceback(tmp_path):
    r = run_mk("info", str(tmp_path / "nope"), env={"MK_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_lineage_walks_back(tmp_path):
    from mk.core.artifact import open_artifact
    from mk.core.outputs import atomic_output

    prev = None
    for name in ("base", "tuned", "int8"):
        with atomic_output(tmp_path / name) as tmp:
            (tmp / "x").write_text(name)
            write_manifest(tmp, kind="model", format="safetensors", labels=[], parent=prev)
        prev = open_artifact(tmp_path / name)
    r = runner.invoke(app, ["info", str(tmp_path / "int8"), "--lineage", "--json"])
    assert r.exit_code == 0
    assert [Path(s["path"]).name for s in json.loads(r.stdout)["lineage"]] == ["int8", "tuned", "base"]
    shutil.rmtree(tmp_path / "base")
    r = runner.invoke(app, ["info", str(tmp_path / "int8"), "--lineage", "--json"])
    assert json.loads(r.stdout)["lineage"][-1]["missing"]


def test_no_color_and_quiet_keep_stderr_plain(tmp_path):
    r = run_mk("-q", "info", str(tmp_path / "nope"), env={"NO_COLOR": "1"})
    assert "\x1b[" not in r.stderr and r.returncode == 2


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("mk ")


def test_setup_never_pins_gpu_users_to_the_cpu_build():
    """pyproject asks for a torch range; only scripts/setup.sh picks the CPU wheel, and only without a GPU."""
    root = Path(__file__).resolve().parent.parent
    deps = (root / "pyproject.toml").read_text()
    assert '"torch>=' in deps and "+cpu" not in deps and "torch==" not in deps
    setup = (root / "scripts" / "setup.sh").read_text()
    assert "nvidia-smi" in setup and os.access(root / "scripts" / "setup.sh", os.X_OK)


@pytest.mark.parametrize("piped, expected", [
    ("a/b\n", "a/b"), ('{"path": "x/y", "kind": "model"}', "x/y"),
    ("a\nb\n", "stdin: 2 lines where one model path was expected"),
    ('{"path": null}', 'stdin: JSON without a "path" string'),
    ('{"path": "x/y", "kind": ', "stdin: invalid JSON"),
    ("  \n", "stdin was empty"),
])
def test_piped_input_is_one_path_and_ambiguity_is_refused(monkeypatch, piped, expected):
    import io

    from mk.cli.output import read_input
    from mk.core.errors import BadInput

    monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
    if "/" in expected and " " not in expected:
        assert str(read_input(None, "model")) == expected
    else:
        with pytest.raises(BadInput, match=re.escape(expected)):
            read_input(None, "model")


@pytest.mark.parametrize("args, message", [
    (["prep", "--seed", "x"], "error: invalid value for '--seed'"),
    (["bench", "--rounds", "0"], "error: invalid value for '--rounds'"),
    (["prep", "--no-such-option"], "error: no such option"),
])
def test_option_errors_read_like_every_other_error(args, message):
    r = run_mk(*args)
    assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
    assert "Error:" not in r.stderr and "Usage:" not in r.stderr and r.stdout == ""
    assert f"hint: see `mk {args[0]} --help`" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["export-onnx", "minilm", "-o", "OUT", "--atol", "nan"], "--atol nan: expected a finite number"),
    (["quant", "minilm", "-o", "OUT", "--max-drop", "inf"], "--max-drop inf: expected a finite number"),
    (["bench", "minilm", "--duration", "inf"], "--duration inf: expected a finite number"),
    (["bench", "minilm", "--baseline", "b.json", "--max-regress", "nan"], "--max-regress 'nan'"),
])
def test_nan_and_infinite_gate_options_are_refused_before_any_work(tmp_path, args, message):
    args = [str(tmp_path / a) if a in ("OUT", "b.json") else a for a in args]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_onnx_runtime_log_lines_stay_off_stderr_unless_verbose(tmp_path):
    """ONNX Runtime logs in colour from C++, whatever NO_COLOR says: mk keeps them off."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(np.zeros(1, np.float32), "unused")])  # ORT warns of it
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "w.onnx")
    script = textwrap.dedent(f"""
        import sys
        import onnxruntime
        from mk.core.console import configure, quiet_onnxruntime
        configure(verbose=sys.argv[1] == "v")
        quiet_onnxruntime()  # what mk calls before ONNX Runtime's tooling makes its own sessions
        onnxruntime.InferenceSession({str(tmp_path / "w.onnx")!r}, providers=["CPUExecutionProvider"])
    """)
    for verbosity, shown in (("", False), ("v", True)):
        r = subprocess.run([sys.executable, "-c", script, verbosity], capture_output=True, text=True,
                           env={**os.environ, "NO_COLOR": "1"})
        assert r.returncode == 0 and ("Removing initializer" in r.stderr) == shown, r.stderr


@pytest.mark.slow  # an end-to-end chain of real mk processes: `make check` and CI run it
def test_the_readme_makefile_runs_from_an_empty_folder(tmp_path, tiny_model, tweets_rows):
    """`make -f scripts/Makefile OUT=…` in a fresh folder: each -o's missing parents are
    made (it stopped at its first step with "the output's parent folder does not exist")."""
    repo = Path(__file__).resolve().parents[1]
    write_labelled_csv(tmp_path / "reviews.csv", tweets_rows, 40)
    work = tmp_path / "empty"
    work.mkdir()
    mk = str(Path(sys.executable).with_name("mk"))
    r = subprocess.run(["make", "-f", str(repo / "scripts" / "Makefile"), "OUT=build/deep", f"MK={mk}",
                        f"MODEL={tiny_model}", f"SOURCE={tmp_path / 'reviews.csv'}", "SAMPLE=",
                        "TUNE_FLAGS=--epochs 1 --batch-size 16", "QUANT_FLAGS=--no-gate",
                        "BENCH_FLAGS=--iters 2 --rounds 1 --warmup-calls 1 --batch-sizes 1 --eval-limit 0"],
                       cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bench = json.loads((work / "build" / "deep" / "bench.json").read_text())
    assert [a["name"] for a in bench["artifacts"]] == ["tuned", "onnx", "int8"]
    assert sorted(os.listdir(work / "build" / "deep")) == ["bench.json", "data", "int8", "int8.gate-passed", "onnx", "tuned"]
