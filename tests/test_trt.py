"""mk export-trt, --triton-repo and the TensorRT portability guard, on CPU: profile
derivation, the Triton configs parsed by Triton's own protobuf, the checks on a
recorded manifest, and every error path that needs no TensorRT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import mk_cli, run_mk
from mk.core.compression import profiles
from mk.core.errors import BadInput

HAS_TENSORRT = True
try:
    import tensorrt  # noqa: F401
except ImportError:
    HAS_TENSORRT = False


# --------------------------------------------------------------------------- profiles


def test_profile_from_token_lengths():
    lengths = np.array([3] * 50 + [10] * 45 + [60] * 5)
    p = profiles.derive(lengths, max_batch_size=16, percentile=90)
    assert p["batch"] == [1, 16, 16]
    assert p["sequence"] == [3, 10, 60]  # opt at the 90th percentile, max the longest
    assert "100 rows" in p["source"]


def test_profile_respects_the_model_limit_and_given_bounds():
    lengths = np.array([5, 20, 300, 700])
    p = profiles.derive(lengths, limit=512)
    assert p["sequence"][2] == 512
    assert profiles.derive(lengths, seq=(None, None, 16))["sequence"] == [5, 16, 16]   # derived opt moved inside
    assert profiles.derive(lengths, seq=(64, None, None), limit=512)["sequence"][:2] == [64, 512]
    assert profiles.derive(None, seq=(8, 64, 128), batch=(2, 4, None), max_batch_size=8) == \
        {"batch": [2, 4, 8], "sequence": [8, 64, 128], "source": "given"}


@pytest.mark.parametrize("kwargs, message", [
    ({"seq": (64, 32, 128)}, "--min-seq 64 ≤ --opt-seq 32"),
    ({"seq": (8, 64, 128), "batch": (8, 2, None)}, "--min-batch 8 ≤ --opt-batch 2"),
    ({"seq": (8, 64, 1024), "limit": 512}, "longer than the model's 512 positions"),
    ({"seq": (None, 64, 128)}, "no dataset to derive sequence lengths"),
    ({"seq": (8, 64, 128), "max_batch_size": 0}, "--max-batch-size 0"),
    ({"seq": (8, 64, 128), "percentile": 0}, "--opt-percentile 0"),
])
def test_profile_errors(kwargs, message):
    with pytest.raises(BadInput, match=message):
        profiles.derive(None, **kwargs)


def test_fit_batch_pads_to_min_and_cuts_to_max():
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=np.int8)
    batch = {"input_ids": np.arange(12).reshape(2, 6) * mask, "attention_mask": mask}
    assert profiles.fit_batch(batch, [4, 4, 8])["input_ids"].shape == (2, 4)  # longest 2, raised to min 4
    assert profiles.fit_batch(batch, [1, 1, 1])["attention_mask"].shape == (2, 1)
    wide = profiles.fit_batch(batch, [8, 8, 8])
    assert wide["attention_mask"].shape == (2, 8) and wide["attention_mask"][:, 6:].sum() == 0


def test_preferred_batch_sizes():
    assert profiles.preferred_batch_sizes({"batch": [1, 64, 64]}) == [8, 16, 32, 64]
    assert profiles.preferred_batch_sizes({"batch": [1, 4, 8]}) == [4]


# --------------------------------------------------------------------------- portability on a recorded manifest


RECORD = {"version": "10.13.3.9", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _engine_artifact(tmp_path, record=RECORD, profile=None):
    from mk.core.artifact import write_manifest

    out = tmp_path / "trt"
    out.mkdir()
    (out / "model.plan").write_bytes(b"not an engine: never deserialized by these tests")
    profile = profile or {"batch": [1, 8, 8], "sequence": [4, 16, 32], "source": "given",
                          "inputs": profiles.input_shapes({"batch": [1, 8, 8], "sequence": [4, 16, 32]},
                                                          ["input_ids", "attention_mask"])}
    write_manifest(out, kind="model", format="tensorrt", task="text-classification",
                   labels=["negative", "neutral", "positive"],
                   tensorrt={**record, "profile": profile,
                             "io": {"input_ids": "int64", "attention_mask": "int64", "logits": "float32"}})
    return out


def test_portability_names_both_sides(tmp_path):
    from mk.core.artifact import open_artifact
    from mk.core.runtime.tensorrt_runtime import check_portable

    art = open_artifact(_engine_artifact(tmp_path))
    check_portable(art, dict(RECORD))  # the same machine: loads
    other = {"version": "10.13.3.9", "gpu": "NVIDIA A10G", "compute_capability": "8.6"}
    with pytest.raises(BadInput) as e:
        check_portable(art, other)
    assert "built with GPU NVIDIA H100 80GB HBM3, this machine has NVIDIA A10G" in e.value.message
    assert "compute capability 9.0, this machine has 8.6" in e.value.message
    assert e.value.code == 2 and "mk export-trt" in e.value.hint
    with pytest.raises(BadInput, match="built with TensorRT 10.13.3.9, this machine has 11.0.0"):
        check_portable(art, {**RECORD, "version": "11.0.0"})


def test_portability_refuses_an_engine_without_a_record(tmp_path):
    from mk.core.artifact import open_artifact
    from mk.core.runtime.tensorrt_runtime import check_portable

    art = open_artifact(_engine_artifact(tmp_path, record={}))
    with pytest.raises(BadInput, match="does not record the TensorRT it was built with"):
        check_portable(art, dict(RECORD))


def test_shape_outside_the_recorded_profile():
    from mk.core.runtime.tensorrt_runtime import outside_profile

    shapes = profiles.input_shapes({"batch": [1, 8, 8], "sequence": [4, 16, 32]}, ["input_ids"])
    assert outside_profile(shapes, "input_ids", (8, 32)) is None
    assert "input input_ids of shape [16, 32] is outside the engine's profile (min [1, 4], max [8, 32])" == \
        outside_profile(shapes, "input_ids", (16, 32))
    assert "outside" in outside_profile(shapes, "input_ids", (2, 2))
    assert "no input 'pixel_values'" in outside_profile(shapes, "pixel_values", (1, 3, 224, 224))


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message where TensorRT is absent")
def test_loading_an_engine_without_tensorrt_is_bad_input(tmp_path):
    from mk.core.runtime import load_runtime

    with pytest.raises(BadInput, match="TensorRT is not installed") as e:
        load_runtime(_engine_artifact(tmp_path), device="cuda")
    assert "mk[gpu]" in e.value.hint and "pypi.nvidia.com" in e.value.hint


# --------------------------------------------------------------------------- Triton configs, parsed by Triton's protobuf


def test_plan_repository_parses_as_triton_model_config(tmp_path):
    pytest.importorskip("tritonclient.grpc")
    from mk.core.artifact import open_artifact
    from mk.core.compression.tensorrt import write_plan_repo
    from mk.core.compression.triton import parse_config

    art = open_artifact(_engine_artifact(tmp_path))
    model_dir = write_plan_repo(art, {"repo": tmp_path / "repo", "count": 2, "kind": "gpu"}, force=False)
    assert model_dir == tmp_path / "repo" / "trt"
    assert (model_dir / "1" / "model.plan").read_bytes() == (art.path / "model.plan").read_bytes()
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.name == "trt" and cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("input_ids", 9, [-1]),
                                                                        ("attention_mask", 9, [-1])]  # TYPE_INT64
    assert [(o.name, o.data_type, list(o.dims), o.label_filename) for o in cfg.output] == \
        [("logits", 11, [3], "labels.txt")]  # TYPE_FP32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == 1  # KIND_GPU
    assert (model_dir / "labels.txt").read_text().split() == ["negative", "neutral", "positive"]


def test_export_onnx_writes_a_triton_repository(tiny_model, tiny_dataset, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    import onnxruntime as ort
    from mk.core.artifact import open_artifact
    from mk.core.compression.triton import check_model_dir, parse_config, write_onnx_repo

    repo = tmp_path / "repo"
    r = run_mk("export-onnx", str(tiny_model), "--data", str(tiny_dataset), "-o", str(tmp_path / "onnx"),
               "--triton-repo", str(repo), "--triton-name", "tweets", "--triton-instance-kind", "cpu",
               "--triton-max-batch-size", "64", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["triton_repo"] == str(repo / "tweets")
    cfg = parse_config((repo / "tweets" / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
    assert cfg.instance_group[0].kind == 2  # KIND_CPU
    session = ort.InferenceSession(str(repo / "tweets" / "1" / "model.onnx"))
    graph_inputs = {i.name for i in session.get_inputs()}
    assert {i.name for i in cfg.input} == graph_inputs
    assert [list(i.dims) for i in cfg.input] == [[-1]] * len(graph_inputs)  # batch axis left to Triton
    assert sorted(p.name for p in (repo / "tweets").iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    # again: refused without --force, replaced with it (it is a model folder mk wrote)
    with pytest.raises(BadInput, match="already exists"):
        check_model_dir(repo, "tweets", force=False)
    write_onnx_repo(open_artifact(tmp_path / "onnx"), {"repo": repo, "name": "tweets"}, force=True)
    assert parse_config((repo / "tweets" / "config.pbtxt").read_text()).max_batch_size == 32


def test_triton_repo_refuses_a_folder_mk_did_not_write(tiny_model, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("mine")
    r = run_mk("export-onnx", str(tiny_model), "-o", str(tmp_path / "onnx"), "--triton-repo", str(repo), "--force")
    assert r.returncode == 2 and "is a folder that is not a Triton model repository (notes.txt" in r.stderr
    assert (repo / "notes.txt").read_text() == "mine" and not (tmp_path / "onnx").exists()


def test_a_repository_gains_models_and_force_replaces_only_the_one_named(tiny_model, tmp_path):
    """A Triton repository holds many models: a new name is added without --force, and
    --force replaces that model folder alone, never the others (mk's or not)."""
    from mk.core.artifact import open_artifact
    from mk.core.compression.triton import write_onnx_repo

    repo, onnx = tmp_path / "repo", tmp_path / "x1"
    theirs = repo / "theirs"  # a model mk did not write (Triton's Python backend)
    (theirs / "1").mkdir(parents=True)
    (theirs / "config.pbtxt").write_text('backend: "python"\n')
    (theirs / "1" / "model.py").write_text("# theirs\n")
    r = mk_cli("-q", "export-onnx", tiny_model, "-o", onnx, "--triton-repo", repo, "--triton-name", "first")
    assert r.returncode == 0, r.stderr
    art = open_artifact(onnx)
    first = (repo / "first" / "config.pbtxt").read_text()
    assert write_onnx_repo(art, {"repo": repo, "name": "second"}) == repo / "second"  # no --force needed
    with pytest.raises(BadInput, match="second: already exists") as e:
        write_onnx_repo(art, {"repo": repo, "name": "second"})
    assert "pass --force" in e.value.hint
    write_onnx_repo(art, {"repo": repo, "name": "second", "max_batch_size": 4}, force=True)
    assert "max_batch_size: 4" in (repo / "second" / "config.pbtxt").read_text()
    assert sorted(p.name for p in repo.iterdir()) == ["first", "second", "theirs"]
    assert (repo / "first" / "config.pbtxt").read_text() == first
    assert (theirs / "1" / "model.py").read_text() == "# theirs\n"
    with pytest.raises(BadInput, match="not a Triton model folder written by mk"):
        write_onnx_repo(art, {"repo": repo, "name": "theirs"}, force=True)
    assert (theirs / "1" / "model.py").read_text() == "# theirs\n"
    r = mk_cli("export-onnx", tiny_model, "-o", onnx, "--force", "--triton-repo", onnx / "repo")
    assert r.returncode == 2 and "overlap" in r.stderr, r.stderr  # the repository inside the -o artifact
    assert sorted(p.name for p in repo.iterdir()) == ["first", "second", "theirs"]


@pytest.mark.parametrize("option", [["--triton-instance-kind", "tpu"], ["--triton-name", ".."]])
def test_triton_options_are_checked_before_the_export(tiny_model, tmp_path, option):
    out, repo = tmp_path / "e1", tmp_path / "tri"
    r = mk_cli("export-onnx", tiny_model, "-o", out, "--triton-repo", repo, *option)
    assert r.returncode == 2 and "exported" not in r.stderr, r.stderr
    assert ("expected one of auto, gpu, cpu" if "tpu" in option else "no usable Triton model name") in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_triton_options_without_a_repository_are_refused(tiny_model, tmp_path):
    r = mk_cli("export-onnx", tiny_model, "-o", tmp_path / "e", "--triton-instance-kind", "cpu")
    assert r.returncode == 2 and "--triton-instance-kind only applies with --triton-repo" in r.stderr, r.stderr
    r = mk_cli("export-trt", tiny_model, "-o", tmp_path / "t", "--triton-name", "m", "--triton-instances", "2")
    assert r.returncode == 2 and "--triton-name and --triton-instances only apply with --triton-repo" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_trt_checks_the_triton_name_before_any_work(tiny_model, tiny_dataset, tmp_path):
    r = mk_cli("export-trt", tiny_model, "--data", tiny_dataset, "-o", tmp_path / "trt",
               "--triton-repo", tmp_path / "repo", "--triton-name", "..")
    assert r.returncode == 2 and "'..': no usable Triton model name" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_triton_config_errors():
    from mk.core.compression.triton import config_text, model_name

    with pytest.raises(BadInput, match="--triton-instance-kind 'tpu'"):
        config_text("m", "onnx", [], [], 8, [8], kind="tpu")
    with pytest.raises(BadInput, match="type complex64 has no Triton data type"):
        config_text("m", "onnx", [("x", "complex64", [-1])], [], 8, [8])
    assert model_name("my model/v2") == "my_model_v2"


# --------------------------------------------------------------------------- export-trt error paths (no TensorRT needed)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message where TensorRT is absent")
def test_export_trt_without_tensorrt_is_one_line_exit_2(tiny_model, tiny_dataset, tmp_path):
    r = run_mk("export-trt", str(tiny_model), "--data", str(tiny_dataset), "-o", str(tmp_path / "trt"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: TensorRT is not installed")
    assert lines[1].startswith("hint: pip install 'mk[gpu]' --extra-index-url https://pypi.nvidia.com")
    assert r.stdout == "" and not (tmp_path / "trt").exists() and not (tmp_path / "trt-onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--fp16", "--int8"], "--fp16 and --int8: choose one precision"),
    (["--workspace", "0"], "--workspace 0: expected GiB above 0"),
    (["--builder-optimization-level", "7"], "--builder-optimization-level 7: expected 0 to 5"),
    (["--atol", "-1"], "--atol -1: a tolerance cannot be negative"),
    (["--min-seq", "64", "--max-seq", "16"], "--min-seq 64 ≤ --opt-seq"),
    (["--int8"], "--int8 builds from an explicitly quantized (QDQ) ONNX model, not a safetensors one"),
    (["--gate-test", "exact"], "--gate-test 'exact'"),
])
def test_export_trt_bad_options_are_exit_2_before_any_work(tiny_model, tiny_dataset, tmp_path, args, message):
    r = mk_cli("export-trt", str(tiny_model), "--data", str(tiny_dataset), "-o", str(tmp_path / "trt"), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "trt").exists() and not (tmp_path / "trt-onnx").exists()


def test_export_trt_refuses_an_engine_and_a_missing_dataset(tmp_path, tiny_model):
    engine = _engine_artifact(tmp_path)
    r = mk_cli("export-trt", str(engine), "-o", str(tmp_path / "again"))
    assert r.returncode == 2 and "a tensorrt model cannot be built into an engine" in r.stderr
    r = mk_cli("export-trt", str(tiny_model), "-o", str(tmp_path / "nodata"))
    assert r.returncode == 2 and "--data" in r.stderr


def test_int8_needs_symmetric_signed_qdq(tiny_model, tiny_dataset, tmp_path):
    """mk quant --method static makes uint8 activations (ONNX Runtime's CPU kernels);
    TensorRT quantizes to signed int8 with zero point 0: refused with both named."""
    from mk.core.compression.quantize import QuantSettings, quantize
    from mk.core.compression.tensorrt import export_trt

    int8 = tmp_path / "int8"
    quantize(tiny_model, int8, method="static", data=tiny_dataset, gate=False,
             settings=QuantSettings(method="static", calib_size=16))
    with pytest.raises(BadInput, match="TensorRT cannot build int8 from it: .*uint8"):
        export_trt(int8, tmp_path / "trt", precision="int8")
    with pytest.raises(BadInput, match="no QuantizeLinear/DequantizeLinear nodes"):
        export_trt(tmp_path / "int8-onnx", tmp_path / "trt", precision="int8")
    assert not (tmp_path / "trt").exists()


def test_qdq_check_accepts_symmetric_int8():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zp = numpy_helper.from_array(np.zeros((), np.int8), "zp")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [zp, scale])
    from mk.core.compression.tensorrt import qdq_problems

    assert qdq_problems(helper.make_model(graph)) == []
    graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(3, np.int8), "zp"))
    assert "non-zero zero point" in qdq_problems(onnx.ModelProto(graph=graph))[0]


# --------------------------------------------------------------------------- mk doctor


def test_doctor_on_this_machine(capsys):
    """One real run: the JSON report, and --require's exit code and line."""
    import onnxruntime
    import torch

    r = run_mk("doctor", "--json", "--require", "torch,cuda,tensorrt")
    report = json.loads(r.stdout)
    assert report["cpu"]["cores"] >= 1 and isinstance(report["cpu"]["flags"], list)
    assert report["libraries"]["torch"]["version"] == torch.__version__
    assert report["libraries"]["onnxruntime"]["version"] == onnxruntime.__version__
    assert report["have"]["cuda"] == torch.cuda.is_available()
    assert report["have"]["tensorrt"] == HAS_TENSORRT
    assert report["works"]["mk export-onnx, mk quant"] is True
    lacking = [n for n, ok in (("cuda", torch.cuda.is_available()), ("tensorrt", HAS_TENSORRT)) if not ok]
    assert report["required_missing"] == lacking
    if lacking:
        assert r.returncode == 1 and f"error: missing: {', '.join(lacking)}" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
    if not HAS_TENSORRT:
        assert "pypi.nvidia.com" in report["missing"]["tensorrt"]
        assert report["works"]["mk export-trt, TensorRT engines"] is False
    from mk.cli.doctor import _print

    _print(report)
    text = capsys.readouterr().out
    assert text.startswith("cpu") and "works here" in text and ("mk[gpu]" in text) != HAS_TENSORRT


def test_doctor_unknown_requirement_is_exit_2_before_probing():
    r = run_mk("doctor", "--require", "cuda,warp-drive")
    assert r.returncode == 2 and "--require warp-drive: unknown" in r.stderr and r.stdout == ""


def test_doctor_reports_a_broken_install_instead_of_dying(tmp_path):
    """A library whose import crashes is one failed probe; the rest of the report stands."""
    fake = tmp_path / "site"
    (fake / "tensorrt").mkdir(parents=True)
    (fake / "tensorrt" / "__init__.py").write_text("import os\nos.abort()\n")
    r = run_mk("doctor", "--json", env={"PYTHONPATH": str(fake)})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["libraries"]["tensorrt"] == {"ok": False,
                                               "error": "importing tensorrt killed the process (signal 6)"}
    assert report["libraries"]["torch"]["ok"] is True
