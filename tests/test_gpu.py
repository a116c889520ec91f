"""The CUDA paths: torch on the GPU, mixed-precision fine-tuning, GPU benchmarks,
and the TensorRT runtime. Skipped where torch sees no CUDA device (conftest)."""

from __future__ import annotations

import importlib.util
import json

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


def test_export_trt_matches_onnx_runtime_and_checks_its_profile(tiny_model, tiny_dataset, tmp_path):
    """mk export-trt end to end: the engine, its record, the gate, the profile guard,
    the timing cache reused, and the Triton repository parsed by Triton's protobuf."""
    pytest.importorskip("tensorrt")
    from mk.core.artifact import open_artifact
    from mk.core.errors import BadInput
    from mk.core.runtime import load_runtime

    cache = tmp_path / "timing.cache"
    r = run_mk("export-trt", str(tiny_model), "--data", str(tiny_dataset), "--max-batch-size", "8",
               "--timing-cache", str(cache), "--triton-repo", str(tmp_path / "repo"), "--json",
               "-o", str(tmp_path / "trt"))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["verification"]["passed"] and result["verification"]["max_abs_diff"] < 1e-3
    assert cache.stat().st_size > 0
    record = open_artifact(tmp_path / "trt").manifest["tensorrt"]
    assert record["profile"]["batch"] == [1, 8, 8] and record["compute_capability"]
    batch = _batch(tiny_dataset)
    engine = load_runtime(tmp_path / "trt", device="cuda")
    np.testing.assert_allclose(engine(batch), load_runtime(tmp_path / "trt-onnx", device="cpu")(batch), atol=1e-3)
    too_big = {k: np.concatenate([v, v]) for k, v in batch.items()}  # batch 16 > profile max 8
    with pytest.raises(BadInput, match="outside the engine's profile"):
        engine(too_big)
    if importlib.util.find_spec("tritonclient") is not None:
        from mk.core.compression.triton import parse_config

        cfg = parse_config((tmp_path / "repo" / "trt" / "config.pbtxt").read_text())
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    r = run_mk("export-trt", str(tmp_path / "trt-onnx"), "--fp16", "--data", str(tiny_dataset),
               "--timing-cache", str(cache), "-o", str(tmp_path / "fp16"))
    assert r.returncode == 0, r.stderr


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
