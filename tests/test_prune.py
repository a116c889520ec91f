"""`mk prune`: a smaller model that loads with stock transformers and answers as
mk's runtime does, measured importance, targets met, the recovery pipe, and every
bad input refused with exit 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from typer.testing import CliRunner

from conftest import LABELS, copy_with_other_tokenizer, relabelled_copy, run_mk
from mk.cli.main import app

runner = CliRunner()


def make_varied_model(out: Path, tokenizer_dir: Path, arch: str = "bert", layers: int = 3) -> Path:
    """A tiny classifier with weights large enough (init 0.3) that inputs get varied
    answers and layers and neurons differ in what they do."""
    import torch
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config_cls, model_cls = ((BertConfig, BertForSequenceClassification) if arch == "bert"
                             else (RobertaConfig, RobertaForSequenceClassification))
    config = config_cls(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=130,
                        num_labels=3, id2label=dict(enumerate(LABELS)),
                        label2id={l: i for i, l in enumerate(LABELS)}, initializer_range=0.3,
                        pad_token_id=tok.pad_token_id)
    model_cls(config).eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, minilm_dir) -> Path:
    return make_varied_model(tmp_path_factory.mktemp("prune") / "model", minilm_dir)


def _logits(path: Path, split: dict) -> np.ndarray:
    from mk.core.dataset import batches
    from mk.core.runtime import load_runtime

    runtime = load_runtime(path, "cpu")
    return np.concatenate([runtime(x) for x, _ in batches(split, 16)])


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_pruned_model_loads_with_stock_transformers_and_matches_the_runtime(arch, tmp_path, minilm_dir,
                                                                            tiny_dataset):
    import torch
    from transformers import AutoModelForSequenceClassification

    from mk.core.compression.prune import PruneTargets, prune
    from mk.core.dataset import load_split, open_dataset

    model = make_varied_model(tmp_path / "model", minilm_dir, arch)
    result = prune(model, tmp_path / "p", PruneTargets(layers=2, ffn=0.5), data=tiny_dataset)
    stock = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "p")).eval()
    assert (stock.config.num_hidden_layers, stock.config.intermediate_size) == (2, 32)
    assert stock.config.model_type == arch

    test = load_split(open_dataset(tiny_dataset), "test")
    with torch.inference_mode():
        ours = stock(input_ids=torch.from_numpy(test["input_ids"]).long(),
                     attention_mask=torch.from_numpy(test["attention_mask"]).long()).logits.numpy()
    np.testing.assert_allclose(_logits(tmp_path / "p", test), ours, atol=1e-4)

    manifest = json.loads((tmp_path / "p" / "mk.json").read_text())
    m = manifest["metrics"]
    assert m["params"] == sum(p.numel() for p in stock.parameters()) < m["parent_params"]
    assert m["flops_per_sequence"] < m["parent_flops_per_sequence"]
    assert m["size_bytes"] < m["parent_size_bytes"]
    assert 0 <= m["accuracy"] <= 1 and m["n"] == len(test["labels"])
    record = manifest["pruning"]
    assert len(record["removed"]["layers"]) == 1 and record["kept"]["intermediate_size"] == 32
    assert set(record["layer_scores"]) == {"0", "1", "2"}
    detail = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert all(len(v) == 32 for v in detail["removed_neurons"].values())
    assert result["metrics"] == m


def test_removal_is_exactly_what_the_scores_measured(varied_model, tiny_dataset):
    """Skipping a layer and masking neurons (how importance is measured) gives the
    same logits as the pruned model written to disk: the scores are about this model."""
    import torch

    from mk.core.compression import structured as st
    from mk.core.dataset import load_split, open_dataset
    from mk.core.runtime.torch_runtime import load_classifier

    model = load_classifier(varied_model, "text-classification").eval()
    test = load_split(open_dataset(tiny_dataset), "test")
    inputs = st.feed({k: v for k, v in test.items() if k != "labels"}, "cpu", True)
    scores = [np.random.default_rng(i).random(64) for i in range(3)]
    with torch.inference_mode(), st.ffn_masks(model, st.keep_masks(scores, 0.25)), st.skipping(model, [1]):
        masked = model(**inputs).logits.numpy()
    st.remove(model, [0, 2], [st.kept_neurons(scores[i], 0.25) for i in (0, 2)])
    with torch.inference_mode():
        pruned = model(**inputs).logits.numpy()
    assert model.config.intermediate_size == 48 and len(st.encoder_layers(model)) == 2
    np.testing.assert_allclose(pruned, masked, atol=1e-5)


def test_taylor_scores_rank_a_dead_neuron_last(varied_model, tiny_dataset):
    import torch

    from mk.core.compression import structured as st
    from mk.core.compression.prune import _calibration
    from mk.core.dataset import open_dataset
    from mk.core.runtime.torch_runtime import load_classifier

    model = load_classifier(varied_model, "text-classification").eval()
    with torch.no_grad():  # neuron 5 of layer 1 no longer reaches the output
        st.encoder_layers(model)[1].output.dense.weight[:, 5] = 0
    calib, info = _calibration(open_dataset(tiny_dataset), model, 64, 16, seed=0)
    scores = st.taylor_neuron_scores(model, calib)
    assert info["rows"] == 64 and scores[1][5] == 0 and (np.delete(scores[1], 5) > 0).all()


def test_target_flops_is_met_and_the_search_is_recorded(tmp_path, varied_model, tiny_dataset):
    r = runner.invoke(app, ["prune", str(varied_model), "--data", str(tiny_dataset), "--target-flops", "0.6",
                            "-o", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    m = result["metrics"]
    assert m["flops_per_sequence"] <= 0.6 * m["parent_flops_per_sequence"]
    assert result["pruning"]["steps"] and result["pruning"]["importance"] == "taylor"
    assert "FLOPs per 128-token sequence" in r.stderr and "test accuracy" in r.stderr


def test_with_no_target_half_the_layers_and_half_of_every_ffn_go(tmp_path, varied_model, tiny_dataset):
    parent = json.loads((varied_model / "config.json").read_text())
    r = runner.invoke(app, ["prune", str(varied_model), "--data", str(tiny_dataset), "-o", str(tmp_path / "p"),
                            "--json"])
    assert r.exit_code == 0, r.stderr
    pruning = json.loads(r.stdout)["pruning"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert pruning["targets"] == {"layers": parent["num_hidden_layers"] // 2, "ffn": 0.5, "default": True}
    assert config["num_hidden_layers"] == parent["num_hidden_layers"] // 2 == len(pruning["kept"]["layers"])
    assert config["intermediate_size"] == parent["intermediate_size"] // 2


def test_magnitude_needs_no_data(tmp_path, varied_model):
    r = runner.invoke(app, ["prune", str(varied_model), "--importance", "magnitude", "--target-params",
                            "990000", "-o", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.stderr
    m = json.loads(r.stdout)["metrics"]
    assert m["params"] <= 990_000 and "accuracy" not in m


@pytest.mark.slow  # an end-to-end chain of real mk processes: `make check` and CI run it
def test_the_recovery_pipe_distils_then_quantizes(tmp_path, varied_model, tiny_dataset):
    """mk prune MODEL -o p && mk tune DATA --model p --teacher MODEL -o p-tuned, then
    mk quant on the result: the pruned model is a valid input to the next steps."""
    p = run_mk("prune", str(varied_model), "--data", str(tiny_dataset), "--layers", "2", "-o",
               str(tmp_path / "p"), check=True).stdout.strip()
    tuned = run_mk("tune", str(tiny_dataset), "--model", p, "--teacher", str(varied_model), "--max-steps", "2",
                   "-o", str(tmp_path / "p-tuned"), check=True).stdout.strip()
    quant = run_mk("quant", "-o", str(tmp_path / "int8"), "--max-drop", "100", input=tuned + "\n", check=True)
    lineage = json.loads(run_mk("info", quant.stdout.strip(), "--lineage", "--json", check=True).stdout)
    assert [Path(s["path"]).name for s in lineage["lineage"]] == ["int8", "int8-onnx", "p-tuned", "p", "model"]
    manifest = json.loads((tmp_path / "p-tuned" / "mk.json").read_text())
    assert manifest["training"]["temperature"] and "teacher" in manifest


@pytest.mark.parametrize("args, says", [
    (["--ffn", "1.0"], "--ffn 1: a fraction"),
    (["--ffn", "-0.1"], "in [0, 1)"),
    (["--heads", "0.25"], "head size as hidden_size / num_attention_heads"),
    (["--layers", "0"], "at least one layer"),
    (["--layers", "4"], "the model has 3"),
    (["--target-flops", "1.5"], "--target-flops 1.5"),
    (["--target-flops", "0.5", "--layers", "2"], "give either a target"),
    (["--target-params", "1000"], "the embeddings and the head are not pruned"),
    (["--importance", "random"], "expected one of taylor, magnitude"),
])
def test_bad_targets_are_exit_2_with_nothing_written(tmp_path, varied_model, tiny_dataset, args, says):
    r = runner.invoke(app, ["prune", str(varied_model), "--data", str(tiny_dataset), *args,
                            "-o", str(tmp_path / "p")])
    assert r.exit_code == 2, r.stderr
    assert says in r.stderr and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


def test_bad_models_and_data_are_exit_2(tmp_path, varied_model, tiny_dataset, minilm_dir):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    distil = tmp_path / "distil"
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2,
                                                         hidden_dim=64, num_labels=3)).save_pretrained(distil)
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(distil)
    other = copy_with_other_tokenizer(tiny_dataset, tmp_path / "other-data")
    nums = relabelled_copy(tiny_dataset, tmp_path / "nums", ["2", "9", "10"])  # as many labels, other classes
    cases = [([str(distil), "--data", str(tiny_dataset)], "handles bert, roberta, xlm-roberta"),
             (["minilm", "--data", str(tiny_dataset)], "not a text classifier"),
             ([str(varied_model), "--data", str(other)], "tokenized with another tokenizer"),
             ([str(varied_model), "--data", str(nums)],
              "the model's labels (negative, neutral, positive) differ from the dataset's (2, 9, 10)"),
             ([str(varied_model)], "Taylor importance is measured on it")]
    for args, says in cases:
        r = runner.invoke(app, ["prune", *args, "-o", str(tmp_path / "p")])
        assert r.exit_code == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "p").exists() and not list(tmp_path.glob(".p.tmp-*"))
