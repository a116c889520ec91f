"""The CUDA paths: torch on the GPU, mixed-precision fine-tuning, GPU benchmarks,
and the TensorRT runtime. Skipped where torch sees no CUDA device (conftest)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_mk

pytestmark = pytest.mark.gpu


def _batch(dataset, n=8):
    from mk.core.dataset import batches, load_split, open_dataset

    inputs, _ = next(batches(load_split(open_dataset(dataset), "test"), n))
    return inputs


def test_torch_runtime_on_cuda_matches_cpu(tiny_model, tiny_dataset):
    from mk.core.runtime import load_runtime

    batch = _batch(tiny_dataset)
    cpu = load_runtime(tiny_model, device="cpu")(batch)
    gpu_runtime = load_runtime(tiny_model, device="cuda")
    assert gpu_runtime.device.startswith("cuda")
    np.testing.assert_allclose(gpu_runtime(batch), cpu, atol=1e-4)


def test_tune_on_cuda_with_autocast_writes_a_loadable_model(tiny_model, tiny_dataset, tmp_path):
    out = tmp_path / "tuned"
    r = run_mk("tune", str(tiny_dataset), "--model", str(tiny_model), "--device", "cuda",
               "--max-steps", "6", "--json", "-o", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert 0 <= result["metrics"]["accuracy"] <= 1
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(str(out))


def test_bench_on_cuda_reports_gpu_memory(tiny_model, tiny_dataset):
    r = run_mk("bench", str(tiny_model), "--device", "cuda", "--batch-sizes", "1,8", "--seq-lens", "32",
               "--iters", "20", "--data", str(tiny_dataset), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["environment"]["gpu"]["name"]
    assert report["artifacts"][0]["device"].startswith("cuda")
    assert report["artifacts"][0]["gpu_peak_bytes"] > 0


def _build_engine(onnx_dir, out_dir, max_batch=8, max_len=64):
    """A TensorRT engine with one profile, as `mk export-trt` will build it."""
    trt = pytest.importorskip("tensorrt")
    from mk.core.artifact import open_artifact, write_manifest

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((onnx_dir / "model.onnx").read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, (1, 8), (max_batch, max_len // 2), (max_batch, max_len))
    config.add_optimization_profile(profile)
    out_dir.mkdir()
    (out_dir / "model.plan").write_bytes(bytes(builder.build_serialized_network(network, config)))
    for f in onnx_dir.iterdir():
        if f.name not in ("model.onnx", "mk.json") and f.is_file():
            shutil.copy2(f, out_dir / f.name)
    src = open_artifact(onnx_dir)
    write_manifest(out_dir, kind="model", format="tensorrt", task=src.task, labels=src.labels, parent=src)
    return out_dir


def test_tensorrt_runtime_matches_torch_and_checks_its_profile(tiny_model, tiny_dataset, tmp_path):
    pytest.importorskip("tensorrt")
    from mk.core.errors import BadInput
    from mk.core.runtime import load_runtime

    onnx_dir = tmp_path / "onnx"
    run_mk("export-onnx", str(tiny_model), "--data", str(tiny_dataset), "-o", str(onnx_dir), check=True)
    engine = _build_engine(onnx_dir, tmp_path / "trt")
    batch = _batch(tiny_dataset)
    trt_runtime = load_runtime(engine, device="cuda")
    np.testing.assert_allclose(trt_runtime(batch), load_runtime(tiny_model, device="cpu")(batch), atol=1e-3)
    too_big = {k: np.concatenate([v, v]) for k, v in batch.items()}  # batch 16 > profile max 8
    with pytest.raises(BadInput, match="outside the engine's profile"):
        trt_runtime(too_big)


def test_onnx_runtime_runs_on_the_gpu_it_was_given(tiny_model, tiny_dataset, tmp_path):
    """`--device cuda:N` reaches ONNX Runtime's CUDA provider as device_id N and is
    reported as such (needs onnxruntime-gpu)."""
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    from mk.core.runtime import load_runtime

    onnx_dir = tmp_path / "onnx"
    assert run_mk("export-onnx", str(tiny_model), "-o", str(onnx_dir)).returncode == 0
    last = f"cuda:{torch.cuda.device_count() - 1}"
    runtime = load_runtime(onnx_dir, device=last)
    assert runtime.device == last
    batch = _batch(tiny_dataset)
    np.testing.assert_allclose(runtime(batch), load_runtime(onnx_dir, device="cpu")(batch), atol=1e-3)


def test_export_onnx_verifies_on_the_gpu(tiny_model, tiny_dataset, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    r = run_mk("export-onnx", str(tiny_model), "--data", str(tiny_dataset), "--device", "cuda", "--json",
               "-o", str(tmp_path / "onnx"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verification"]["max_abs_diff"] < 1e-2


def test_quant_fp16_gate_evaluates_on_the_gpu(tiny_model, tiny_dataset, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider")
    r = run_mk("quant", str(tiny_model), "--data", str(tiny_dataset), "--method", "fp16", "--device", "cuda",
               "--json", "-o", str(tmp_path / "fp16"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["evaluated_on"].startswith("cuda")
