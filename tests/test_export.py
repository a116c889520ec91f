"""`mk export-onnx`: dynamic axes, verification against torch, the --atol gate,
transformer fusions, fp16 with fp32 inputs and outputs, external data."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import mk_cli, run_mk


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, tiny_dataset):
    from mk.core.compression.export import export_onnx

    out = tmp_path_factory.mktemp("export") / "onnx"
    result = export_onnx(tiny_model, out, data=tiny_dataset)
    return out, result


def _torch_logits(model_dir, ids, mask):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()


def test_dynamic_batch_and_sequence_axes_match_torch_at_other_shapes(exported, tiny_model, tiny_dataset):
    import onnx
    import onnxruntime as ort

    out, result = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "sequence"]
    # verified at two batch sizes or more and two lengths or more, on the dataset's rows
    shapes = [tuple(s["shape"]) for s in result["verification"]["shapes"]]
    assert len({b for b, _ in shapes}) >= 2 and len({l for _, l in shapes}) >= 2, shapes
    assert result["verification"]["max_abs_diff"] < 1e-4 and str(tiny_dataset) in result["verification"]["inputs"]
    # and at shapes it was not exported or verified at
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch, length in [(1, 7), (5, 29)]:
        ids = rng.integers(1000, 20000, (batch, length)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, length // 2:] = 0
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        got = session.run(None, {k: v for k, v in feed.items() if k in {i.name for i in graph.input}})[0]
        assert got.shape == (batch, 3)
        assert np.abs(got - _torch_logits(tiny_model, ids, mask)).max() < 1e-4


def test_manifest_lineage_tokenizer_and_opset(exported, tiny_model, tiny_dataset):
    from mk.core.artifact import open_artifact

    out, result = exported
    art = open_artifact(out)
    assert art.format == "onnx" and art.labels == ["negative", "neutral", "positive"]
    assert art.parent_path() == tiny_model.resolve() and art.dataset_path() == tiny_dataset.resolve()
    assert art.manifest["onnx"]["opset"] >= 17 and result["exporter"] == "torchscript"
    assert art.metrics["max_abs_logit_diff"] == result["verification"]["max_abs_diff"]
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(str(out))("hello")["input_ids"][0] == 101


def test_impossible_atol_exits_3_and_keeps_the_artifact(tmp_path, tiny_model, tiny_dataset):
    out = tmp_path / "onnx"
    r = run_mk("export-onnx", str(tiny_model), "-o", str(out), "--data", str(tiny_dataset), "--atol", "0")
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip() == str(out) and "above --atol 0" in r.stderr
    manifest = json.loads((out / "mk.json").read_text())
    assert manifest["onnx"]["verification"]["passed"] is False
    assert manifest["onnx"]["verification"]["max_abs_diff"] > 0 and (out / "model.onnx").is_file()


def test_opset_past_what_onnx_knows_exit_2_and_exporter_dumps_stay_off_stdout(tmp_path, tiny_model, tiny_dataset):
    r = run_mk("export-onnx", str(tiny_model), "-o", str(tmp_path / "o99"), "--opset", "99")
    assert r.returncode == 2 and "error: --opset 99: the installed onnx" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o99").exists()
    # TorchScript stops at opset 23 and dumps its graph from C++ on the way out: it was on stdout
    r = run_mk("export-onnx", str(tiny_model), "-o", str(tmp_path / "o24"), "--data", str(tiny_dataset),
               "--opset", "24", "--exporter", "torchscript")
    assert r.returncode == 1 and "ONNX export failed" in r.stderr, r.stderr
    assert r.stdout == "" and not (tmp_path / "o24").exists()


def test_a_device_that_cannot_verify_is_exit_2_before_exporting(tmp_path, tiny_model):
    import torch

    for device, text in (("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
                         *(() if torch.cuda.is_available() else
                           (("cuda", "--device cuda: no CUDA GPU is visible to torch"),))):
        r = mk_cli("export-onnx", str(tiny_model), "-o", str(tmp_path / "o"), "--device", device)
        assert r.returncode == 2 and text in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()


def test_optimize_fuses_bert_attention_layernorm_gelu(tmp_path, tiny_model, tiny_dataset):
    import onnx

    from mk.core.compression.export import export_onnx

    result = export_onnx(tiny_model, tmp_path / "opt", data=tiny_dataset, optimize=True)
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt" / "model.onnx")).graph.node)
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] == 4, ops
    assert ops["EmbedLayerNormalization"] == 1 and ops["BiasGelu"] + ops["Gelu"] + ops["FastGelu"] == 2, ops
    assert "MatMul" not in ops or ops["MatMul"] <= 6  # Q, K, V and scores folded into Attention
    assert result["fused_operators"]["Attention"] == 2 and result["verification"]["max_abs_diff"] < 1e-4


def test_fp16_keeps_fp32_inputs_and_outputs(tmp_path, tiny_model, tiny_dataset):
    import onnx
    from onnx import TensorProto

    from mk.core.compression.export import export_onnx

    result = export_onnx(tiny_model, tmp_path / "fp16", data=tiny_dataset, fp16=True, optimize=True)
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {TensorProto.INT64}
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    assert result["verification"]["passed"] and result["verification"]["atol"] == 5e-2


def test_external_data_and_sample_sentences_without_a_dataset(tmp_path, tiny_model):
    from mk.core.compression.export import export_onnx
    from mk.core.runtime import load_runtime

    out = tmp_path / "ext"
    result = export_onnx(tiny_model, out, external_data=True)
    assert (out / "model.onnx.data").is_file() and result["external_data"]
    assert (out / "model.onnx").stat().st_size < 100_000 < (out / "model.onnx.data").stat().st_size
    assert "sample sentences" in result["verification"]["inputs"] and result["verification"]["passed"]
    logits = load_runtime(out, "cpu")({"input_ids": np.array([[101, 7592, 102]]),
                                       "attention_mask": np.ones((1, 3), np.int64)})
    assert logits.shape == (1, 3)


def test_an_onnx_model_is_not_exported_again(exported, tmp_path):
    out, _ = exported
    r = mk_cli("export-onnx", str(out), "-o", str(tmp_path / "again"))
    assert r.returncode == 2 and "already an ONNX model" in r.stderr and not (tmp_path / "again").exists()
    assert "`mk quant` takes ONNX models directly" in r.stderr


def test_a_tensorrt_engine_is_not_pointed_to_mk_quant(tmp_path):
    # the hint said "`mk quant` takes ONNX models directly", which refuses TensorRT engines too
    from mk.core.artifact import write_manifest

    trt = tmp_path / "trt"
    trt.mkdir()
    (trt / "model.plan").write_bytes(b"engine")
    write_manifest(trt, kind="model", format="tensorrt", labels=["a", "b"], task="text-classification")
    r = mk_cli("export-onnx", str(trt), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "already a TensorRT model" in r.stderr and "mk quant" not in r.stderr, r.stderr
    assert "mk info --lineage" in r.stderr and not (tmp_path / "out").exists()


def test_an_image_classifier_exports_and_quantizes(tmp_path):
    """pixel_values in, dynamic batch; verified on random images when there is no dataset."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from mk.core.compression.export import export_onnx
    from mk.core.compression.quantize import quantize
    from mk.core.runtime import load_runtime

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=2, id2label={0: "cat", 1: "dog"},
                       label2id={"cat": 0, "dog": 1})
    ViTForImageClassification(config).eval().save_pretrained(str(tmp_path / "vit"))
    result = export_onnx(tmp_path / "vit", tmp_path / "vit-onnx")
    assert result["verification"]["passed"] and {s["shape"][0] for s in result["verification"]["shapes"]} == {1, 8, 32}
    quantize(tmp_path / "vit-onnx", tmp_path / "vit-int8", gate=False)
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    assert load_runtime(tmp_path / "vit-int8", "cpu")({"pixel_values": images}).shape == (3, 2)
