"""`mk tune` on causal LMs: LoRA by default (merged into stock weights, or kept
as an adapter), full fine-tuning, the same resume as encoders, loss, perplexity
and exact match, and the wrong pairings of model and data refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import interrupt_at_first_checkpoint, mk_cli, run_mk
from generation_data import INSTRUCTION, make_generation_dataset, tweet_pairs

MK = str(Path(sys.executable).with_name("mk"))
FAST = ["--batch-size", "8", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def gen_dataset(tmp_path_factory, llm_tokenizer_dir, tweets_rows) -> Path:
    """48/16/16 tweets as sentiment instructions, answers = the labels."""
    return make_generation_dataset(tmp_path_factory.mktemp("gen") / "tweets-gen", llm_tokenizer_dir,
                                   tweet_pairs(tweets_rows))


def _tune(data, model, out, **kw):
    from mk.core.training.train import TuneOptions, tune
    return tune(data, model, out, TuneOptions(**{"device": "cpu", "batch_size": 8, "seed": 3, **kw}))


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _log(path: Path) -> list[dict]:
    return [json.loads(l) for l in (path / "train_log.jsonl").read_text().splitlines()]


# --- LoRA, the default ---------------------------------------------------------------------------


def test_lora_by_default_trains_only_adapters_and_merges_into_a_stock_model(gen_dataset, tiny_llm, tmp_path):
    out = tmp_path / "lora"
    result = _tune(gen_dataset, tiny_llm, out, max_steps=6, lr=5e-3, save_every=3)
    t = result["training"]
    assert t["mode"] == "lora" and t["lora_r"] == 16 and t["lora_alpha"] == 32 and t["merged"]
    manifest = json.loads((out / "mk.json").read_text())
    assert manifest["task"] == "text-generation" and manifest["labels"] == []
    assert not (out / "adapter_config.json").exists()

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(out))  # stock transformers, no peft
    assert not any("lora" in n for n, _ in model.named_parameters())
    base, tuned = _weights(tiny_llm), _weights(out)
    for proj in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):  # the adapters were merged in
        name = f"model.layers.0.{proj}.weight"
        assert not np.allclose(base[name].numpy(), tuned[name].numpy())
    for name in ("model.embed_tokens.weight", "model.norm.weight"):  # frozen stays frozen
        assert np.array_equal(base[name].numpy(), tuned[name].numpy())

    log = _log(out)
    losses = [e["loss"] for e in log if e["event"] == "step"]
    assert len(losses) == 6 and all(math.isfinite(l) for l in losses)
    m = result["metrics"]
    assert m["split"] == "test" and m["n"] == 16 and m["tokens"] > 16
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert "val_loss" in m and "val_perplexity" in m


def test_no_merge_keeps_an_adapter_that_loads_through_the_runtime(gen_dataset, tiny_llm, tmp_path):
    out = tmp_path / "adapter"
    result = _tune(gen_dataset, tiny_llm, out, max_steps=4, lora=4, lr=5e-3, merge=False, exact_match_rows=0)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "mk.json").read_text())["adapter"]["r"] == 4

    from mk.core.artifact import open_artifact
    from mk.core.runtime.causal_runtime import CausalLM, Sampling
    lm = CausalLM.load(open_artifact(out), "cpu")
    assert type(lm.model).__name__.startswith("Peft")
    prompt = lm.chat_ids([{"role": "user", "content": INSTRUCTION + "what a day"}])
    assert len(lm.generate([prompt], Sampling(max_new_tokens=3)).tokens[0]) <= 3
    # the adapter on its base computes the loss the run reported
    from mk.core.dataset import load_split
    from mk.core.training.causal import CausalLMTask
    from mk.core.training.train import TuneOptions
    from contextlib import nullcontext
    task = CausalLMTask(open_artifact(gen_dataset), open_artifact(tiny_llm), TuneOptions(batch_size=8))
    task.device = "cpu"
    again = task.evaluate(lm.model, load_split(open_artifact(gen_dataset), "test"), nullcontext, "test")
    assert again["loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-5)


# --- full fine-tuning and exact match -------------------------------------------------------------


def test_full_fine_tune_learns_an_answer_and_exact_match_measures_it(llm_tokenizer_dir, tiny_llm, tweets_rows,
                                                                     tmp_path):
    """Every test answer is "positive": trained in full, the tiny model answers it
    (exact match 1.0) where the untrained one does not (0.0)."""
    pairs = [(INSTRUCTION + " ".join(t.split()), "positive") for t, _ in tweets_rows[:120]]
    data = make_generation_dataset(tmp_path / "pos", llm_tokenizer_dir, pairs, sizes=(48, 8, 16))
    untrained = _tune(data, tiny_llm, tmp_path / "zero", max_steps=1, full=True, lr=1e-9)
    assert untrained["metrics"]["exact_match"] == 0.0
    result = _tune(data, tiny_llm, tmp_path / "full", max_steps=30, full=True, lr=3e-2, warmup=0,
                   exact_match_rows=10)
    m = result["metrics"]
    assert result["training"]["mode"] == "full" and "lora_r" not in result["training"]
    assert m["exact_match"] == 1.0 and m["exact_match_n"] == 10 and m["exact_match_of"] == 16
    assert m["loss"] < untrained["metrics"]["loss"]
    base, tuned = _weights(tiny_llm), _weights(tmp_path / "full")
    assert not np.allclose(base["model.embed_tokens.weight"].numpy(), tuned["model.embed_tokens.weight"].numpy())


def test_cli_reports_exact_match_on_stderr_and_json(gen_dataset, tiny_llm, tmp_path):
    out = tmp_path / "cli"
    r = run_mk("tune", str(gen_dataset), "-m", str(tiny_llm), "-o", str(out), "--max-steps", "2", "--json",
               "--exact-match-rows", "4", *FAST)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    m = result["metrics"]
    assert 0.0 <= m["exact_match"] <= 1.0 and m["exact_match_n"] == 4 and m["exact_match_of"] == 16
    assert "perplexity" in r.stderr and "exact match" in r.stderr and "(4 of 16 rows)" in r.stderr
    assert json.loads((out / "mk.json").read_text())["metrics"]["exact_match_n"] == 4


def test_a_dataset_without_answers_reports_no_exact_match(llm_tokenizer_dir, tiny_llm, tweets_rows, tmp_path):
    data = make_generation_dataset(tmp_path / "free", llm_tokenizer_dir, tweet_pairs(tweets_rows), answers=False)
    m = _tune(data, tiny_llm, tmp_path / "t", max_steps=1)["metrics"]
    assert "exact_match" not in m and math.isfinite(m["loss"])


# --- never lose work -------------------------------------------------------------------------------


def test_sigterm_then_resume_reaches_the_weights_of_an_uninterrupted_run(gen_dataset, tiny_llm, tmp_path):
    args = ["tune", str(gen_dataset), "--model", str(tiny_llm), "--epochs", "3", "--save-every", "4",
            "--lr", "5e-3", "--exact-match-rows", "0", *FAST]
    ref = tmp_path / "ref"
    assert run_mk(*args, "-o", str(ref)).returncode == 0

    out = tmp_path / "run"
    proc, err = interrupt_at_first_checkpoint(args, out)
    ckpt = tmp_path / "run.ckpt" / "last.pt"
    assert proc.returncode == 130, err
    state = json.loads((tmp_path / "run.ckpt" / "state.json").read_text())
    assert 0 < state["step"] < state["total_steps"]
    # a LoRA checkpoint holds the adapters, not the frozen model
    assert ckpt.stat().st_size < (tiny_llm / "model.safetensors").stat().st_size

    r = run_mk(*args, "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert _max_diff(_weights(ref), _weights(out)) <= 1e-6
    steps = [e["step"] for e in _log(out) if e["event"] == "step"]
    assert steps == list(range(1, steps[-1] + 1))


# --- bad input -------------------------------------------------------------------------------------


def _refused(r, out: Path, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert r.stdout == "" and not out.exists() and not out.with_name(out.name + ".ckpt").exists()


def test_an_encoder_with_a_generation_dataset_is_refused(gen_dataset, tiny_model, tmp_path):
    out = tmp_path / "t"
    _refused(mk_cli("tune", str(gen_dataset), "-m", str(tiny_model), "-o", str(out), *FAST), out,
             "text-classification model", "text-generation")


def test_a_causal_lm_with_a_classification_dataset_is_refused(tiny_dataset, tiny_llm, tmp_path):
    out = tmp_path / "t"
    _refused(mk_cli("tune", str(tiny_dataset), "-m", str(tiny_llm), "-o", str(out), *FAST), out,
             "causal LM", "text-classification")


@pytest.mark.parametrize("args, words", [
    (["--full", "--lora", "4"], ["--full", "--lora"]),
    (["--full", "--no-merge"], ["--no-merge"]),
    (["--teacher", "x"], ["--teacher", "causal LM"]),
    (["--new-head"], ["--new-head"]),
])
def test_options_that_do_not_apply_are_refused(gen_dataset, tiny_llm, tmp_path, args, words):
    out = tmp_path / "t"
    _refused(mk_cli("tune", str(gen_dataset), "-m", str(tiny_llm), "-o", str(out), *args, *FAST), out, *words)


def test_sequences_beyond_the_context_and_foreign_splits_are_refused(gen_dataset, llm_tokenizer_dir, tiny_llm,
                                                                    tmp_path):
    from conftest import make_tiny_llm
    from mk.core.errors import BadInput
    short = make_tiny_llm(tmp_path / "short", llm_tokenizer_dir)
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 64}))
    with pytest.raises(BadInput, match="96 tokens exceed the model's context of 64"):
        _tune(gen_dataset, short, tmp_path / "t", max_steps=1)

    import shutil
    from mk.core.dataset import save_split
    flat = tmp_path / "flat"
    shutil.copytree(gen_dataset, flat)
    from safetensors.numpy import load_file
    val = load_file(str(flat / "val.safetensors"))
    save_split(flat, "val", {**val, "labels": np.zeros(len(val["labels"]), np.int64)})  # class ids, not tokens
    with pytest.raises(BadInput, match="val split is not a text-generation split"):
        _tune(flat, tiny_llm, tmp_path / "t", max_steps=1)
    assert not (tmp_path / "t").exists()


def test_ddp_on_cpu_equals_one_process_with_the_global_batch(gen_dataset, tiny_llm, tmp_path):
    """The loss is a mean over the global batch's label tokens, whichever rank holds them."""
    import os
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mk.cli.main", "tune", str(gen_dataset), "--model", str(tiny_llm), "-o", str(out), "--full",
           "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--seed", "3",
           "--exact-match-rows", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert next(e for e in _log(out) if e["event"] == "ranks")["agree"]
    _tune(gen_dataset, tiny_llm, tmp_path / "one", max_steps=4, batch_size=8, lr=1e-3, full=True, exact_match_rows=0)
    assert _max_diff(_weights(out), _weights(tmp_path / "one")) <= 1e-5
