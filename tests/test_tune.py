"""`mk tune`: training that learns, artifacts that load, runs that resume to the
same weights after a real SIGTERM, LoRA, distillation, DDP on CPU, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import interrupt_at_first_checkpoint, LABELS, make_tiny_model, mk_cli, run_mk

MK = str(Path(sys.executable).with_name("mk"))
# A fast, deterministic tiny run: small batches, no warm-up surprises.
FAST = ["--batch-size", "8", "--device", "cpu", "--seed", "3"]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    assert worst <= atol, f"weights differ by up to {worst}"


def _log(path: Path) -> list[dict]:
    return [json.loads(l) for l in (path / "train_log.jsonl").read_text().splitlines()]


def _no_dropout_model(out: Path, tokenizer_dir: Path, labels=LABELS, seed=0) -> Path:
    """A tiny classifier without dropout, so that any two equivalent runs agree exactly."""
    make_tiny_model(out, tokenizer_dir, labels=labels, seed=seed)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _small_student(out: Path, tokenizer_dir: Path) -> Path:
    """Narrower and shallower than make_tiny_model's: hidden 16, one layer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    torch.manual_seed(5)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, id2label=dict(enumerate(LABELS)),
                        label2id={l: i for i, l in enumerate(LABELS)})
    BertForSequenceClassification(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def quiet_model(tmp_path_factory, minilm_dir) -> Path:
    return _no_dropout_model(tmp_path_factory.mktemp("m") / "quiet", minilm_dir)


def _tune(data, model, out, **kw):
    from mk.core.training.train import TuneOptions, tune
    force = kw.pop("force", False)
    return tune(data, model, out, TuneOptions(**{"device": "cpu", "batch_size": 8, "seed": 3, **kw}), force=force)


# --- learning and the artifact --------------------------------------------------------------


def test_training_reduces_loss_and_the_output_loads(tiny_dataset, tiny_model, tmp_path):
    out = tmp_path / "tuned"
    result = _tune(tiny_dataset, tiny_model, out, epochs=12, lr=2e-3, warmup=0.05)
    assert result["path"] == str(out) and not (tmp_path / "tuned.ckpt").exists()
    log = _log(out)
    losses = [e["loss"] for e in log if e["event"] == "step"]
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15])
    assert {"lr", "samples_per_s", "epoch"} <= next(e for e in log if e["event"] == "step").keys()
    evals = [e for e in log if e["event"] == "eval"]
    assert len(evals) == 12 and all("val_macro_f1" in e for e in evals)

    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.id2label == dict(enumerate(LABELS))
    manifest = json.loads((out / "mk.json").read_text())
    assert manifest["kind"] == "model" and manifest["labels"] == LABELS
    assert manifest["dataset"]["abs_path"] == str(tiny_dataset.resolve())
    assert manifest["parent"]["abs_path"] == str(tiny_model.resolve())
    assert {"accuracy", "macro_f1"} <= manifest["metrics"].keys()
    assert "train_log.jsonl" in {f["name"] for f in manifest["files"]}

    # better than chance, measured on what it was trained on (30 test tweets are too few to say)
    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split
    from mk.core.evaluation import evaluate
    from mk.core.runtime import load_runtime
    train = load_split(open_artifact(tiny_dataset), "train")
    assert evaluate(load_runtime(out, "cpu"), train, 3)["accuracy"] > 0.6


def test_cli_reads_data_on_stdin_and_prints_json(tiny_dataset, tiny_model, tmp_path):
    r = run_mk("tune", "--model", str(tiny_model), "-o", str(tmp_path / "t"), "--max-steps", "3", *FAST,
               "--json", input=f"{tiny_dataset}\n")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["path"] == str(tmp_path / "t") and result["training"]["steps"] == 3
    assert "accuracy" in result["metrics"]


def test_same_seed_same_weights(tiny_dataset, quiet_model, tmp_path):
    _tune(tiny_dataset, quiet_model, tmp_path / "a", max_steps=6, grad_accum=2, schedule="cosine")
    _tune(tiny_dataset, quiet_model, tmp_path / "b", max_steps=6, grad_accum=2, schedule="cosine")
    _assert_same_weights(tmp_path / "a", tmp_path / "b", atol=0)


def test_grad_accumulation_equals_a_larger_batch(tiny_dataset, quiet_model, tmp_path):
    _tune(tiny_dataset, quiet_model, tmp_path / "a", max_steps=5, batch_size=4, grad_accum=4)
    _tune(tiny_dataset, quiet_model, tmp_path / "b", max_steps=5, batch_size=16)
    _assert_same_weights(tmp_path / "a", tmp_path / "b", atol=1e-5)


def test_early_stopping_keeps_the_best_weights(tiny_dataset, tiny_model, tmp_path):
    out = tmp_path / "t"
    result = _tune(tiny_dataset, tiny_model, out, epochs=30, lr=5e-3, patience=1)
    evals = [e for e in _log(out) if e["event"] == "eval"]
    assert result["training"]["stopped_early"] and len(evals) < 30
    best = max(evals, key=lambda e: e["val_macro_f1"])
    assert result["training"]["best_step"] == best["step"]
    assert result["metrics"]["val_macro_f1"] == best["val_macro_f1"]


# --- never lose work ---------------------------------------------------------------------------


def _start(args, **kw):
    return subprocess.Popen([MK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_checkpoints_exits_130_and_resume_reaches_the_same_weights(tiny_dataset, quiet_model, tmp_path):
    args = ["tune", str(tiny_dataset), "--model", str(quiet_model), "--epochs", "8", "--save-every", "5",
            "--lr", "1e-3", *FAST]
    # the uninterrupted run in a process of its own, as the interrupted one: an in-process run
    # shares whatever process-wide state earlier tests left, and rounds differently
    ref = tmp_path / "ref"
    assert run_mk(*args, "-o", str(ref)).returncode == 0

    out = tmp_path / "run"
    proc, err = interrupt_at_first_checkpoint(args, out)
    ckpt = tmp_path / "run.ckpt" / "last.pt"
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err
    assert ckpt.is_file() and not out.exists()
    assert not list(tmp_path.glob(".run.tmp-*"))
    state = json.loads((tmp_path / "run.ckpt" / "state.json").read_text())
    assert 0 < state["step"] < state["total_steps"]

    # without --resume the checkpoint is not thrown away
    r = mk_cli(*args, "-o", str(out))
    assert r.returncode == 2 and "--resume" in r.stderr and ckpt.is_file()
    # with other options, --resume refuses
    r = mk_cli(*args[:-2], "--seed", "4", "-o", str(out), "--resume")
    assert r.returncode == 2 and "different run" in r.stderr

    r = run_mk(*args, "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    _assert_same_weights(ref, out)
    assert not (tmp_path / "run.ckpt").exists()
    log = _log(out)
    steps = [e["step"] for e in log if e["event"] == "step"]
    assert steps == list(range(1, steps[-1] + 1))  # the log resumes without gaps or repeats
    assert any(e["event"] == "resume" for e in log)


def test_a_failure_while_writing_the_output_keeps_the_training(tiny_dataset, tiny_model, tmp_path, monkeypatch):
    from mk.core.training import train

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(train, "write_manifest", broken)
    with pytest.raises(OSError):
        _tune(tiny_dataset, tiny_model, tmp_path / "t", max_steps=5)
    assert not (tmp_path / "t").exists()
    assert json.loads((tmp_path / "t.ckpt" / "state.json").read_text())["step"] == 5
    monkeypatch.undo()
    result = _tune(tiny_dataset, tiny_model, tmp_path / "t", max_steps=5, resume=True)
    assert result["training"]["steps"] == 5 and (tmp_path / "t" / "mk.json").is_file()
    assert [e["step"] for e in _log(tmp_path / "t") if e["event"] == "step"] == [1, 2, 3, 4, 5]


def test_resume_without_a_checkpoint_is_bad_usage(tiny_dataset, tiny_model, tmp_path):
    from mk.core.errors import BadInput
    with pytest.raises(BadInput, match="no checkpoint"):
        _tune(tiny_dataset, tiny_model, tmp_path / "t", max_steps=2, resume=True)


@pytest.mark.parametrize("args", [["--lr", "nan"], ["--epochs", "inf"], ["--temperature", "nan"],
                                  ["--max-steps", "2", "--max-grad-norm", "inf"], ["--lora-alpha", "8"],
                                  ["--seed", "-1"]])
def test_non_finite_or_inapplicable_options_are_bad_usage(tiny_dataset, tiny_model, tmp_path, args):
    """nan/inf pass typer's ranges; they are exit 2 naming the option, not an unexpected error
    (and --lora-alpha without --lora is not silently ignored)."""
    from typer.testing import CliRunner

    from mk.cli.main import app
    r = CliRunner().invoke(app, ["tune", str(tiny_dataset), "-m", str(tiny_model), "-o", str(tmp_path / "t"), *args])
    assert r.exit_code == 2, r.output
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: ") and args[-2] in first and "unexpected" not in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()


def test_output_that_is_an_input_is_refused_even_with_force(tiny_dataset, tiny_model, tmp_path):
    from mk.core.errors import BadInput
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    before = (data / "mk.json").read_bytes()
    with pytest.raises(BadInput, match="would overwrite the input"):
        _tune(data, tiny_model, data, max_steps=1, force=True)
    assert (data / "mk.json").read_bytes() == before and (data / "train.safetensors").is_file()


def test_teacher_with_other_label_names_says_they_differ(tiny_dataset, tiny_model, minilm_dir, tmp_path):
    from mk.core.errors import BadInput
    teacher = make_tiny_model(tmp_path / "teacher", minilm_dir, labels=["x", "y", "z"])
    with pytest.raises(BadInput, match=r"teacher's labels \(x, y, z\) differ from the dataset's"):
        _tune(tiny_dataset, tiny_model, tmp_path / "t", max_steps=1, teacher=str(teacher))


def test_output_under_a_file_or_a_file_named_like_the_checkpoint_is_bad_usage(tiny_dataset, tiny_model, tmp_path):
    from mk.core.errors import BadInput
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput, match="parent is a file"):
        _tune(tiny_dataset, tiny_model, tmp_path / "afile" / "t", max_steps=1)
    (tmp_path / "t.ckpt").write_text("x")
    with pytest.raises(BadInput, match="t.ckpt: is a file, where mk tune keeps its checkpoints"):
        _tune(tiny_dataset, tiny_model, tmp_path / "t", max_steps=1)


def test_corrupt_model_weights_are_bad_input(tiny_dataset, tiny_model, tmp_path):
    from mk.core.errors import BadInput
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(BadInput, match="broken: cannot load the model"):
        _tune(tiny_dataset, broken, tmp_path / "t", max_steps=1)
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.ckpt").exists()


# --- LoRA and distillation -----------------------------------------------------------------------


def test_lora_merged_is_a_plain_model(tiny_dataset, tiny_model, tmp_path):
    out = tmp_path / "lora"
    result = _tune(tiny_dataset, tiny_model, out, max_steps=6, lora=4)
    assert result["training"]["mode"] == "lora" and result["training"]["merged"]
    assert not (out / "adapter_config.json").exists()
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in model.named_parameters())
    base = _weights(tiny_model)
    tuned = _weights(out)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not np.allclose(base[name].numpy(), tuned[name].numpy())  # the adapter was merged in
    assert np.allclose(base["bert.embeddings.word_embeddings.weight"].numpy(),
                       tuned["bert.embeddings.word_embeddings.weight"].numpy())  # frozen stays frozen


def test_lora_no_merge_keeps_the_adapter(tiny_dataset, tiny_model, tmp_path):
    out = tmp_path / "adapter"
    result = _tune(tiny_dataset, tiny_model, out, max_steps=4, lora=4, merge=False)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "mk.json").read_text())
    assert manifest["adapter"]["r"] == 4
    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split
    from mk.core.evaluation import evaluate
    from mk.core.runtime import load_runtime
    test = load_split(open_artifact(tiny_dataset), "test")
    again = evaluate(load_runtime(out, "cpu"), test, 3)  # the torch runtime loads adapter + base
    assert again["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    # what needs the whole model's weights refuses it in one line, and writes nothing
    for args in (["tune", str(tiny_dataset), "--model", str(out), "--max-steps", "1"],
                 ["tune", str(tiny_dataset), "--model", str(tiny_model), "--teacher", str(out), "--max-steps", "1"],
                 ["export-onnx", str(out)], ["quant", str(out), "--no-gate"], ["prune", str(out)]):
        r = run_mk(*args, "-o", str(tmp_path / "refused"))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "unmerged LoRA adapter" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not list(tmp_path.glob("refused*")), args


def test_distillation_from_a_teacher_of_another_size(tiny_dataset, minilm_dir, tmp_path):
    teacher = make_tiny_model(tmp_path / "teacher", minilm_dir, layers=3, seed=1)
    student = _small_student(tmp_path / "student", minilm_dir)
    out = tmp_path / "distilled"
    result = _tune(tiny_dataset, student, out, max_steps=6, teacher=str(teacher), alpha=0.7, temperature=3.0)
    manifest = json.loads((out / "mk.json").read_text())
    assert manifest["teacher"]["abs_path"] == str(teacher.resolve())
    assert manifest["training"]["alpha"] == 0.7 and result["training"]["steps"] == 6
    assert _weights(out)["bert.embeddings.word_embeddings.weight"].shape[1] == 16
    # the teacher changes what the student learns
    plain = tmp_path / "plain"
    _tune(tiny_dataset, student, plain, max_steps=6)
    a, b = _weights(out), _weights(plain)
    assert not all(np.allclose(a[k].numpy(), b[k].numpy()) for k in a)


def test_distillation_loss_matches_the_formula():
    import torch
    from mk.core.training.distill import per_example_loss
    s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 3.0]])
    y = torch.tensor([0])
    T = 2.0
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum() * T * T
    ce = -torch.log_softmax(s, -1)[0, 0]
    assert per_example_loss(s, y, t, T, 0.25).item() == pytest.approx((0.25 * kl + 0.75 * ce).item(), rel=1e-5)
    assert per_example_loss(s, y).item() == pytest.approx(ce.item(), rel=1e-6)


def test_image_classification(tmp_path):
    import torch
    from transformers import AutoModelForImageClassification, ViTConfig, ViTModel
    from mk.core.artifact import write_manifest
    from mk.core.dataset import save_split

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_channels=3)
    ViTModel(config).save_pretrained(str(tmp_path / "vit"))  # a base encoder: mk tune gives it a head
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        y = np.arange(n) % 2
        x = rng.normal(size=(n, 3, 16, 16)).astype(np.float32) + y[:, None, None, None]  # learnable
        save_split(data, split, {"pixel_values": x, "labels": y})
    write_manifest(data, kind="dataset", format="safetensors", task="image-classification", labels=["cat", "dog"])
    result = _tune(data, tmp_path / "vit", tmp_path / "out", epochs=3, lr=1e-3)
    model = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out"))
    assert model.config.id2label == {0: "cat", 1: "dog"} and result["metrics"]["n"] == 8


# --- several processes ---------------------------------------------------------------------------


def test_ddp_on_cpu_with_two_processes(tiny_dataset, quiet_model, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mk.cli.main", "tune", str(tiny_dataset), "--model", str(quiet_model), "-o", str(out),
           "--max-steps", "6", "--batch-size", "4", "--device", "cpu", "--seed", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(out)  # one result line: only rank 0 writes
    log = _log(out)
    ranks = next(e for e in log if e["event"] == "ranks")
    assert ranks["world_size"] == 2 and ranks["agree"]
    assert next(e for e in log if e["event"] == "start")["global_batch"] == 8
    # two processes of batch 4 take the same steps as one process of batch 8
    _tune(tiny_dataset, quiet_model, tmp_path / "one", max_steps=6, batch_size=8)
    _assert_same_weights(out, tmp_path / "one", atol=1e-5)


# --- bad input -----------------------------------------------------------------------------------


def _other_tokenizer_dataset(tiny_dataset: Path, minilm_dir: Path, dest: Path) -> Path:
    """The tiny dataset, but shipped with a tokenizer of 5000 WordPiece tokens."""
    shutil.copytree(tiny_dataset, dest)
    spec = json.loads((minilm_dir / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i < 5000}
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    (dest / "vocab.txt").unlink(missing_ok=True)
    return dest


def test_dataset_from_another_tokenizer_is_exit_2(tiny_dataset, tiny_model, minilm_dir, tmp_path):
    data = _other_tokenizer_dataset(tiny_dataset, minilm_dir, tmp_path / "other")
    r = mk_cli("tune", str(data), "--model", str(tiny_model), "-o", str(tmp_path / "t"), *FAST)
    assert r.returncode == 2, r.stderr
    assert "another tokenizer" in r.stderr and "vocabulary of 5000" in r.stderr and r.stdout == ""
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.ckpt").exists()


@pytest.mark.parametrize("vocab_size, cls_id, ok", [(30522, 101, True), (5000, 101, False), (30522, 2, False)])
def test_a_dataset_without_tokenizer_files_is_checked_by_its_manifest(tiny_dataset, tiny_model, tmp_path,
                                                                     vocab_size, cls_id, ok):
    from mk.core.artifact import write_manifest
    from mk.core.errors import BadInput
    data = tmp_path / "bare"
    shutil.copytree(tiny_dataset, data)
    for f in data.glob("tokenizer*"):
        f.unlink()
    write_manifest(data, kind="dataset", format="safetensors", task="text-classification", labels=LABELS,
                   tokenizer={"vocab_size": vocab_size, "special_token_ids": {"cls_token": cls_id, "pad_token": 0}})
    if ok:
        assert _tune(data, tiny_model, tmp_path / "t", max_steps=1)["training"]["steps"] == 1
    else:
        with pytest.raises(BadInput, match="another tokenizer"):
            _tune(data, tiny_model, tmp_path / "t", max_steps=1)


def test_label_count_that_disagrees_with_a_trained_head(tiny_dataset, minilm_dir, tmp_path):
    from mk.core.errors import BadInput
    two = make_tiny_model(tmp_path / "two", minilm_dir, labels=["bad", "good"])
    with pytest.raises(BadInput, match="head has 2 labels") as e:
        _tune(tiny_dataset, two, tmp_path / "t", max_steps=2)
    assert "--new-head" in e.value.hint
    result = _tune(tiny_dataset, two, tmp_path / "t", max_steps=2, new_head=True)
    assert json.loads((tmp_path / "t" / "config.json").read_text())["id2label"] == {
        str(i): l for i, l in enumerate(LABELS)}
    assert result["training"]["steps"] == 2


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tiny_dataset, tiny_model, tmp_path):
    r = run_mk("tune", str(tiny_dataset), "--model", str(tiny_model), "-o", str(tmp_path / "t"),
               "--lr", "1e30", "--warmup", "0", "--max-grad-norm", "0", "--save-every", "1",
               "--max-steps", "20", *FAST)
    assert r.returncode == 1, r.stderr
    assert "non-finite" in r.stderr and "at step" in r.stderr and "--lr" in r.stderr
    step = int(r.stderr.split("at step ")[1].split(";")[0])
    ckpt = tmp_path / "t.ckpt"
    assert (ckpt / "last.pt").is_file() and not (tmp_path / "t").exists()
    assert json.loads((ckpt / "state.json").read_text())["step"] == step - 1


def test_cuda_out_of_memory_suggests_a_batch_size(tiny_dataset, tiny_model, tmp_path, monkeypatch):
    import torch
    from mk.core.training import classify
    from mk.core.errors import MkError

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(classify, "make_batch", oom)
    with pytest.raises(MkError, match="out of memory") as e:
        _tune(tiny_dataset, tiny_model, tmp_path / "t", max_steps=2, batch_size=32)
    assert e.value.code == 1 and "--batch-size 16" in e.value.hint and "--grad-accum 2" in e.value.hint


def test_a_checkpoint_folder_holding_other_files_is_not_removed(tiny_dataset, tiny_model, tmp_path):
    from mk.core.errors import BadInput
    (tmp_path / "t.ckpt").mkdir()
    (tmp_path / "t.ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match=r"t.ckpt: holds files mk tune did not write \(notes.txt\)"):
        _tune(tiny_dataset, tiny_model, tmp_path / "t", max_steps=1, force=True)
    assert (tmp_path / "t.ckpt" / "notes.txt").read_text() == "mine"
