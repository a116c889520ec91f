"""`mk quant`: dynamic / static / fp16 models that load and agree with their parent,
a real accuracy gate, safetensors input exported first (in the lineage), pipes,
and every bad input refused with exit 2 and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_with_other_tokenizer, LABELS, mk_cli, relabelled_copy, run_mk

MK = str(Path(sys.executable).with_name("mk"))


def make_model(out: Path, tokenizer_dir: Path, init_range: float) -> Path:
    """A tiny BERT classifier (hidden 32, 2 layers, the real MiniLM tokenizer) whose
    weights are drawn with `init_range`: with the usual 0.02 a random head answers
    one class for every input and nothing could ever disagree; 0.3 gives varied
    answers with clear margins, 1.0 varied answers with many near ties."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from conftest import LABELS

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
                        initializer_range=init_range)
    BertForSequenceClassification(config).eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _export(tmp_path_factory, minilm_dir, tiny_dataset, init_range: float) -> Path:
    from mk.core.compression.export import export_onnx

    root = tmp_path_factory.mktemp(f"qparent{init_range}")
    model = make_model(root / "model", minilm_dir, init_range)
    export_onnx(model, root / "onnx", data=tiny_dataset)
    return root / "onnx"


@pytest.fixture(scope="module")
def onnx_parent(tmp_path_factory, minilm_dir, tiny_dataset) -> Path:
    return _export(tmp_path_factory, minilm_dir, tiny_dataset, 0.3)


@pytest.fixture(scope="module")
def near_ties_parent(tmp_path_factory, minilm_dir, tiny_dataset) -> Path:
    return _export(tmp_path_factory, minilm_dir, tiny_dataset, 1.0)


def _predictions(path, split):
    from mk.core.evaluation import predict
    from mk.core.runtime import load_runtime

    return predict(load_runtime(path, "cpu"), split).argmax(-1)


@pytest.mark.parametrize("method, marker", [("dynamic", "MatMulInteger"), ("static", "QuantizeLinear"),
                                            ("fp16", "fp16")])
def test_each_method_loads_and_agrees_with_its_parent(tmp_path, onnx_parent, tiny_dataset, method, marker):
    import onnx

    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split
    from mk.core.compression.quantize import QuantSettings, quantize, quantized_nodes

    test = load_split(open_artifact(tiny_dataset), "test")
    assert len(set(_predictions(onnx_parent, test))) > 1  # agreement would mean nothing otherwise

    out = tmp_path / method
    result = quantize(onnx_parent, out, method=method, max_drop=100,
                      settings=QuantSettings(method=method, calib_size=64))
    graph = onnx.load(str(out / "model.onnx"))
    found = quantized_nodes(graph)
    assert any(marker in f for f in found), found
    agree = np.mean(_predictions(out, test) == _predictions(onnx_parent, test))
    assert agree >= 0.8, agree
    m = json.loads((out / "mk.json").read_text())
    assert m["quantization"]["method"] == method and m["parent"]["abs_path"] == str(onnx_parent.resolve())
    assert {"accuracy", "parent_accuracy", "accuracy_drop_points"} <= m["metrics"].keys()
    assert m["metrics"]["size_bytes"] == result["size_bytes"]
    assert result["size_bytes"] > 0 and result["parent_size_bytes"] > 0


def _teacher_labelled(tmp_path, dataset: Path, onnx_model: Path) -> Path:
    """The dataset with its test labels replaced by the fp32 model's own predictions,
    so the parent scores 100 % and every prediction int8 changes is a real drop."""
    import shutil

    from mk.core.artifact import open_artifact, write_manifest
    from mk.core.dataset import load_split, save_split

    out = tmp_path / "teacher-data"
    shutil.copytree(dataset, out)
    (out / "mk.json").unlink()
    data = open_artifact(dataset)
    test = load_split(data, "test")
    save_split(out, "test", {**test, "labels": _predictions(onnx_model, test)})
    write_manifest(out, kind="dataset", format="safetensors", task="text-classification", labels=data.labels)
    return out


def test_gate_writes_both_accuracies_and_exits_3_on_a_real_drop(tmp_path, near_ties_parent, tiny_dataset):
    data = _teacher_labelled(tmp_path, tiny_dataset, near_ties_parent)
    out = tmp_path / "int8"
    # the default int8 really flips some near ties of this model; the point gate allows none
    r = run_mk("quant", str(near_ties_parent), "-o", str(out), "--data", str(data), "--max-drop", "0",
               "--gate-test", "point")
    assert r.returncode == 3, r.stderr
    assert r.stdout.strip() == str(out) and "more than --max-drop 0" in r.stderr
    metrics = json.loads((out / "mk.json").read_text())["metrics"]
    assert metrics["parent_accuracy"] == 1.0 and metrics["accuracy"] < 1.0
    assert metrics["accuracy_drop_points"] == pytest.approx(100 * (1 - metrics["accuracy"]), abs=1e-3)
    gate = metrics["gate"]
    assert gate["failed"] and gate["test"] == "point" and gate["better"] == 0
    assert gate["worse"] == round(gate["rows"] * (1 - metrics["accuracy"]))

    # the paired gate fails the same flips only when its interval clears 0, and says
    # that 30 test rows are too few for a fine gate
    paired = tmp_path / "int8-paired"
    r = run_mk("quant", str(near_ties_parent), "-o", str(paired), "--data", str(data), "--max-drop", "0")
    gate = json.loads((paired / "mk.json").read_text())["metrics"]["gate"]
    assert gate["test"] == "paired" and gate["confidence"] == 0.95
    assert gate["failed"] == (gate["interval_points"][0] > 0) == (r.returncode == 3), r.stderr
    assert gate["worse"] >= 1 and "95% interval" in r.stderr and "too few" in r.stderr


def test_a_failed_gate_leaves_a_state_make_and_mk_agree_on(tmp_path, near_ties_parent, tiny_dataset, tiny_model):
    """make's .DELETE_ON_ERROR deleted int8/mk.json when the gate failed; now the target is a
    stamp mk quant's folder gets only when the gate passed."""
    import os
    import shutil

    out = tmp_path / "build"
    from mk.core.artifact import write_manifest

    for name, src in (("data", tiny_dataset), ("tuned", tiny_model), ("onnx", near_ties_parent)):
        shutil.copytree(src, out / name)
    write_manifest(out / "tuned", kind="model", format="safetensors", task="text-classification", labels=LABELS)
    for age, name in enumerate(("data", "tuned", "onnx")):  # upstream targets up to date, in order
        os.utime(out / name / "mk.json", (1_000_000 + age, 1_000_000 + age))
    teacher = _teacher_labelled(tmp_path, tiny_dataset, near_ties_parent)
    makefile = Path(__file__).resolve().parents[1] / "scripts" / "Makefile"
    target = f"{out}/int8.gate-passed"

    def make(*args):
        return subprocess.run(["make", "-f", str(makefile), f"OUT={out}", f"MK={MK}", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    failing = f"QUANT_FLAGS=--data {teacher} --gate-test point --max-drop 0"
    r = make(failing, target)
    assert r.returncode != 0 and "Error 3" in r.stderr, r.stderr
    assert not Path(target).exists()
    manifest = json.loads((out / "int8" / "mk.json").read_text())  # kept, whole, readable by mk
    assert manifest["metrics"]["gate"]["failed"] is True
    assert run_mk("info", str(out / "int8")).returncode == 0
    assert make("-q", failing, target).returncode == 1  # make still wants to build it

    r = make("QUANT_FLAGS=--max-drop 100", target)
    assert r.returncode == 0, r.stderr
    assert Path(target).is_file() and make("-q", "QUANT_FLAGS=--max-drop 100", target).returncode == 0
    assert json.loads((out / "int8" / "mk.json").read_text())["metrics"]["gate"]["failed"] is False


def test_safetensors_input_is_exported_first_through_a_real_pipe(tmp_path, tiny_model, tiny_dataset):
    from mk.core.artifact import open_artifact

    out = tmp_path / "int8"
    shell = f"echo {tiny_model} | {MK} quant -o {out} --data {tiny_dataset} --method dynamic"
    r = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    export = tmp_path / "int8-onnx"
    chain = [a.path.resolve() for a, _ in open_artifact(out).lineage()]
    assert chain == [out.resolve(), export.resolve(), tiny_model.resolve()]
    assert open_artifact(export).format == "onnx"
    assert json.loads((out / "mk.json").read_text())["quantization"]["exported_first"] is True
    lineage = run_mk("info", str(out), "--lineage", check=True).stdout
    assert "int8-onnx" in lineage and str(tiny_model.name) in lineage


# --------------------------------------------------------------------------- bad input


def _refused(r, out: Path, *needles):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    assert r.stdout == "" and not out.exists() and not Path(f"{out}-onnx").exists()


def _onnx_artifact(tmp_path, name: str, payload: bytes | None = None, model=None) -> Path:
    from mk.core.artifact import write_manifest

    d = tmp_path / name
    d.mkdir()
    if model is not None:
        import onnx
        onnx.save_model(model, str(d / "model.onnx"))
    else:
        (d / "model.onnx").write_bytes(payload)
    write_manifest(d, kind="model", format="onnx", labels=["negative", "neutral", "positive"],
                   task="text-classification")
    return d


def test_corrupt_and_truncated_onnx(tmp_path, onnx_parent, tiny_dataset):
    whole = (onnx_parent / "model.onnx").read_bytes()
    for name, payload in [("garbage", b"\x08\x07this is not a protobuf" * 50), ("truncated", whole[: len(whole) // 2])]:
        src = _onnx_artifact(tmp_path, name, payload)
        out = tmp_path / f"out-{name}"
        _refused(mk_cli("quant", str(src), "-o", str(out), "--data", str(tiny_dataset)), out, "model.onnx")


def test_onnx_without_recognisable_inputs(tmp_path, tiny_dataset):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])])
    src = _onnx_artifact(tmp_path, "odd", model=helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    out = tmp_path / "out"
    _refused(mk_cli("quant", str(src), "-o", str(out), "--data", str(tiny_dataset)), out,
             "no recognisable inputs", "input_ids")


def test_calibration_data_from_another_tokenizer(tmp_path, onnx_parent, tiny_dataset):
    other = copy_with_other_tokenizer(tiny_dataset, tmp_path / "other-data")
    out = tmp_path / "out"
    _refused(mk_cli("quant", str(onnx_parent), "-o", str(out), "--data", str(other), "--method", "static"), out,
             "another tokenizer", "the model's has 30522")


def _recording(tmp_path, name: str, onnx_parent: Path, dataset: Path) -> Path:
    """A copy of the ONNX parent whose manifest records `dataset`: its lineage's data."""
    import shutil

    from mk.core.artifact import open_artifact, write_manifest

    d = tmp_path / name
    shutil.copytree(onnx_parent, d)
    (d / "mk.json").unlink()
    write_manifest(d, kind="model", format="onnx", labels=LABELS, task="text-classification",
                   dataset=open_artifact(dataset))
    return d


def test_a_dataset_whose_labels_are_other_classes_is_refused(tmp_path, onnx_parent, tiny_dataset):
    """As many labels as the model's, other names: the gate would compare ids of unrelated
    classes. Refused, whether given or found through the lineage."""
    nums = relabelled_copy(tiny_dataset, tmp_path / "nums", ["2", "9", "10"])
    says = "the model's labels (negative, neutral, positive) differ from the dataset's (2, 9, 10)"
    out = tmp_path / "out"
    _refused(mk_cli("quant", str(onnx_parent), "-o", str(out), "--data", str(nums)), out, str(nums), says)
    _refused(mk_cli("quant", str(_recording(tmp_path, "m", onnx_parent, nums)), "-o", str(out)), out, says)
    shuffled = relabelled_copy(tiny_dataset, tmp_path / "shuffled", LABELS[::-1])
    _refused(mk_cli("quant", str(onnx_parent), "-o", str(out), "--data", str(shuffled)), out,
             "the same names in another order")


def test_a_lineage_dataset_changed_since_it_was_recorded_is_used_with_a_warning(tmp_path, onnx_parent,
                                                                               tiny_dataset, caplog):
    import shutil

    from mk.core.artifact import open_artifact
    from mk.core.dataset import lineage_dataset

    data = shutil.copytree(tiny_dataset, tmp_path / "data")
    model = _recording(tmp_path, "m", onnx_parent, data)
    assert lineage_dataset(open_artifact(model)).path == data and "not the dataset" not in caplog.text
    manifest = json.loads((data / "mk.json").read_text())  # remade: another sample, say
    (data / "mk.json").write_text(json.dumps(manifest | {"seed": manifest.get("seed", 0) + 1}))
    r = mk_cli("quant", str(model), "-o", str(tmp_path / "q"), "--max-drop", "100")
    assert r.returncode == 0, r.stderr
    assert f"{data}: not the dataset {model / 'mk.json'} recorded (its sha256 differs" in r.stderr


def test_a_quantized_model_is_not_quantized_again(tmp_path, onnx_parent, tiny_dataset):
    from mk.core.compression.quantize import quantize

    int8 = tmp_path / "int8"
    quantize(onnx_parent, int8, data=tiny_dataset, gate=False)
    out = tmp_path / "int8-again"
    _refused(mk_cli("quant", str(int8), "-o", str(out), "--data", str(tiny_dataset)), out, "already quantized")
    # the graph alone gives it away too, without the manifest's record
    (int8 / "mk.json").unlink()
    bare = _onnx_artifact(tmp_path, "bare", (int8 / "model.onnx").read_bytes())
    _refused(mk_cli("quant", str(bare), "-o", str(out), "--data", str(tiny_dataset)), out,
             "already quantized", "MatMulInteger")


def test_gate_hint_suggests_only_settings_not_already_used():
    # after a static/entropy run the hint said "try --method static with --calib-method entropy"
    from mk.core import cpu
    from mk.core.compression.quantize import QuantSettings, _other_settings

    static = _other_settings(QuantSettings(method="static", calib_method="entropy"))
    assert "entropy" not in static and "--method static" not in static and "--per-channel" not in static
    assert "--op-types MatMul" in static and static.endswith("or a larger --max-drop")
    assert "--method static with --calib-method entropy" in _other_settings(QuantSettings(method="dynamic"))
    assert "--per-channel" in _other_settings(QuantSettings(method="dynamic", per_channel=False))
    assert _other_settings(QuantSettings(method="fp16")) == "a larger --max-drop"
    full = _other_settings(QuantSettings(method="dynamic", reduce_range=False))
    assert ("--reduce-range" in full) == (cpu.this_cpu().int8_path == cpu.SATURATING)


def test_op_types_that_match_nothing_are_refused(tmp_path, onnx_parent, tiny_dataset):
    # a typo in --op-types used to write an unquantized copy and exit 0
    out = tmp_path / "out"
    _refused(mk_cli("quant", str(onnx_parent), "-o", str(out), "--data", str(tiny_dataset), "--op-types", "Matmul"),
             out, "--op-types Matmul", "nothing would be quantized", "MatMul")


def test_static_through_the_cli_keeps_stdout_for_the_result(tmp_path, onnx_parent, tiny_dataset):
    """ONNX Runtime's calibrators print progress; it must not reach stdout."""
    out = tmp_path / "static"
    r = run_mk("quant", str(onnx_parent), "-o", str(out), "--data", str(tiny_dataset), "--method", "static",
               "--calib-method", "entropy", "--calib-size", "32", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["path"] == str(out) and result["quantization"]["calibration"]["method"] == "entropy"
    assert result["metrics"]["parent_accuracy"] > 0 and "size_bytes" in result


def test_output_holding_the_input_is_refused_even_with_force(tmp_path, onnx_parent, tiny_dataset):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(onnx_parent, work / "onnx")
    r = run_mk("quant", str(work / "onnx"), "-o", str(work), "--force", "--data", str(tiny_dataset))
    assert r.returncode == 2 and "would overwrite the input" in r.stderr, r.stderr
    assert (work / "onnx" / "model.onnx").is_file()


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_the_input_artifact_is_only_read(tmp_path, onnx_parent, tiny_dataset, method):
    """ONNX Runtime's tooling writes a scratch `model-inferred.onnx` beside the model it
    reads and deletes it after: never in the input (a user's file of that name was lost)."""
    import hashlib
    import shutil

    def snapshot(folder: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    src = tmp_path / "in"
    shutil.copytree(onnx_parent, src)
    (src / "model-inferred.onnx").write_text("a file of the user's")
    before = snapshot(src)
    r = run_mk("quant", str(src), "-o", str(tmp_path / "q"), "--method", method, "--data", str(tiny_dataset),
               "--calib-size", "16", "--no-gate")
    assert r.returncode == 0, r.stderr
    assert snapshot(src) == before
    assert not list((tmp_path / "q").glob(".source-*"))


def test_a_users_folder_where_the_export_would_go_is_never_replaced(tmp_path, tiny_model):
    """The sibling OUT-onnx holding a user's files: the hint does not offer --force, which refuses it too."""
    (tmp_path / "q-onnx").mkdir()
    (tmp_path / "q-onnx" / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        r = run_mk("quant", str(tiny_model), "-o", str(tmp_path / "q"), "--no-gate", *force)
        assert r.returncode == 2 and "not an fp32 export" in r.stderr and "does not replace" in r.stderr, r.stderr
    assert (tmp_path / "q-onnx" / "notes.txt").read_text() == "mine" and not (tmp_path / "q").exists()


# --------------------------------------------------------------------------- int8 arithmetic of other CPUs


def test_settings_chosen_for_a_cpu_without_vnni_avoid_the_saturation_the_vnni_settings_hit(
        tmp_path, onnx_parent, tiny_dataset):
    """The test model's real weights and activations through the arithmetic of both kinds of
    CPU (tests/u8s8_emulation.py): with full-range int8 weights, 16-bit pair sums clip and
    change answers; with the 7-bit weights mk chooses for such a CPU nothing clips."""
    import onnx

    from mk.core import cpu
    from mk.core.artifact import open_artifact
    from mk.core.compression.quantize import QuantSettings, quantize
    from mk.core.dataset import load_split
    from u8s8_emulation import run as emulate

    test = load_split(open_artifact(tiny_dataset), "test")
    feeds = [{"input_ids": test["input_ids"].astype(np.int64), "attention_mask": test["attention_mask"].astype(np.int64),
              "token_type_ids": np.zeros(test["input_ids"].shape, np.int64)}]
    fp32 = _predictions(onnx_parent, test)
    avx2 = cpu.int8_settings(["avx2"], "dynamic")
    assert avx2["reduce_range"] and not cpu.int8_settings(["avx512_vnni"], "dynamic")["reduce_range"]
    for method, extra in (("dynamic", {}), ("static", {"calib_method": "entropy", "calib_size": 32})):
        answers = {}
        for reduce_range in (False, True):
            out = tmp_path / f"{method}-{reduce_range}"
            quantize(onnx_parent, out, method=method, gate=False,
                     settings=QuantSettings(method=method, reduce_range=reduce_range, **extra))
            model = onnx.load(str(out / "model.onnx"))
            exact, _ = emulate(model, feeds, saturate=False)
            pairs16, clipped = emulate(model, feeds, saturate=True)
            # the emulation is ONNX Runtime's own arithmetic on the CPU at hand, answer for answer
            here = pairs16 if cpu.this_cpu().int8_path == cpu.SATURATING else exact
            assert np.array_equal(here.argmax(-1), _predictions(out, test))
            answers[reduce_range] = (exact.argmax(-1), pairs16.argmax(-1), clipped)
        (vnni_exact, vnni_on_avx2, vnni_clips), (rr_exact, rr_on_avx2, rr_clips) = answers[False], answers[True]
        # full 8-bit weights: pairs clip on a CPU without VNNI, and answers change
        assert vnni_clips.clipped > 0 and np.mean(vnni_on_avx2 == fp32) < np.mean(vnni_exact == fp32), method
        # 7-bit weights: 255 · 64 · 2 < 32767, no pair clips, the same answers on both kinds of CPU
        assert rr_clips.clipped == 0 and np.array_equal(rr_on_avx2, rr_exact), method
        assert np.mean(rr_on_avx2 == fp32) >= 0.8, method  # what the agreement test asks of every CPU


def test_calibration_is_capped_at_the_split_and_fed_in_chunks(tmp_path, onnx_parent, tiny_dataset, monkeypatch,
                                                             caplog):
    """ONNX Runtime holds every activation of the rows it is given: a --calib-size past
    the split is capped (and said), and the rows reach it a batch at a time (the
    histogram calibrators failed on a last, shorter batch)."""
    import logging

    from mk.core.compression import quantize as q

    chunks = []
    real = q.DatasetCalibrationReader.set_range
    monkeypatch.setattr(q.DatasetCalibrationReader, "set_range",
                        lambda self, start_index, end_index: chunks.append((start_index, end_index))
                        or real(self, start_index, end_index))
    with caplog.at_level(logging.WARNING, logger="mk"):
        result = q.quantize(onnx_parent, tmp_path / "p", method="static", max_drop=100,
                            settings=q.QuantSettings(method="static", calib_size=100_000, calib_method="percentile"))
    calibration = result["quantization"]["calibration"]
    assert "--calib-size 100000: the train split holds 120 rows" in caplog.text
    assert calibration["rows"] == 120 and calibration["batches"] == 8 and calibration["rows_per_call"] == 16
    assert chunks == [(i, i + 1) for i in range(8)]  # one batch per call, the last one shorter


def test_bad_gate_options_are_refused(tmp_path, onnx_parent, tiny_dataset):
    out = tmp_path / "out"
    for args, needle in ((["--confidence", "1.5"], "--confidence 1.5"), (["--confidence", "0.2"], "--confidence 0.2"),
                         (["--gate-test", "exact"], "--gate-test 'exact'")):
        _refused(mk_cli("quant", str(onnx_parent), "-o", str(out), "--data", str(tiny_dataset), *args), out, needle)


def test_a_device_that_cannot_evaluate_is_refused_before_quantizing(tmp_path, onnx_parent, tiny_dataset):
    import torch

    out = tmp_path / "out"
    _refused(mk_cli("quant", str(onnx_parent), "-o", str(out), "--device", "tpu"), out, "--device 'tpu'")
    if not torch.cuda.is_available():
        _refused(mk_cli("quant", str(onnx_parent), "-o", str(out), "--device", "cuda"), out,
                 "--device cuda: no CUDA GPU is visible to torch")
