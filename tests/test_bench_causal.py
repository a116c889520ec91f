"""`mk bench` on causal LMs: a real tiny Llama (SmolLM2's tokenizer) measured through
CausalLM; the JSON fields and their sanity, perplexity and exact match against direct
computations, the gate, bad input; and synthetic inputs within a tiny vocabulary."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import mk_cli, run_mk

ENV = {"COLUMNS": "220", "NO_COLOR": "1"}
FAST = ["--threads", "1", "--rounds", "2", "--warmup-calls", "1"]
PAIRS = [("Classify the sentiment: I love this phone", "positive"),
         ("Classify the sentiment: the worst service ever", "negative"),
         ("Classify the sentiment: the bus leaves at nine", "neutral"),
         ("Classify the sentiment: what a wonderful morning", "positive"),
         ("Classify the sentiment: I lost my keys again", "negative")]


def make_generation_dataset(out: Path, tokenizer_dir: Path, rows, labels=(), max_length: int = 48) -> Path:
    """A generation dataset artifact in llm-contract.md's layout, built by hand: `rows`
    are (prompt ids, completion ids); the completion's labels end with EOS."""
    from transformers import AutoTokenizer

    from mk.core.artifact import write_manifest
    from mk.core.dataset import save_split

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = len(rows)
    arrays = {"input_ids": np.full((n, max_length), pad, np.int32), "attention_mask": np.zeros((n, max_length), np.int8),
              "labels": np.full((n, max_length), -100, np.int64), "prompt_lengths": np.zeros(n, np.int32)}
    for i, (prompt, completion) in enumerate(rows):
        row = prompt + completion + [tok.eos_token_id]
        arrays["input_ids"][i, :len(row)], arrays["attention_mask"][i, :len(row)] = row, 1
        arrays["labels"][i, len(prompt):len(row)] = row[len(prompt):]
        arrays["prompt_lengths"][i] = len(prompt)
    out.mkdir(parents=True)
    for split in ("train", "val", "test"):
        save_split(out, split, arrays)
    tok.save_pretrained(str(out))
    write_manifest(out, kind="dataset", format="safetensors", task="text-generation", labels=list(labels),
                   max_length=max_length, splits={s: n for s in ("train", "val", "test")},
                   generation={"chat_template": True, "packed": False, "max_length": max_length, "recipe": None,
                               "prompt_column": "prompt", "completion_column": "completion"})
    return out


def chat_rows(tokenizer_dir: Path, pairs) -> list[tuple[list[int], list[int]]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [(list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)),
             tok(c, add_special_tokens=False)["input_ids"]) for p, c in pairs]


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory, llm_tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("gen-data")
    return make_generation_dataset(root / "gen", llm_tokenizer_dir, chat_rows(llm_tokenizer_dir, PAIRS),
                                   labels=["negative", "neutral", "positive"])


@pytest.fixture(scope="module")
def causal(tiny_llm, gen_data, tmp_path_factory):
    """One real run: the tiny LLM twice (compared like encoders), two prompt lengths,
    two batch sizes, 6 new tokens, with a CSV and the JSON."""
    root = tmp_path_factory.mktemp("bench-causal")
    proc = run_mk("bench", str(tiny_llm), str(tiny_llm), "--seq-lens", "16,40", "--batch-sizes", "1,3",
                  "--new-tokens", "6", "--data", str(gen_data), *FAST, "--json", "-o", str(root / "llm.csv"),
                  env=ENV, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {"result": json.loads(proc.stdout), "stderr": proc.stderr, "root": root}


def test_causal_result_fields_and_their_sanity(causal):
    r = causal["result"]
    assert r["schema"] == "mk.bench/1" and r["mode"] == "offline" and r["task"] == "text-generation"
    s = r["settings"]
    assert s["prompt_lens"] == [16, 40] and s["batch_sizes"] == [1, 3] and s["new_tokens"] == 6
    assert s["rounds"] == 2 and s["warmup"] == 1 and s["threads"] == 1
    assert r["environment"]["cpu"] and r["environment"]["load_average"]["before"] is not None
    assert [(x["artifact"], x["batch_size"], x["seq_len"]) for x in r["results"]] == [
        (a, b, p) for p in (16, 40) for b in (1, 3) for a in ("tiny-llm", "tiny-llm#2")]
    for x in r["results"]:
        b = x["batch_size"]
        assert x["calls"] == 2 and x["generated_tokens"] == x["calls"] * b * 6  # exactly 6 new tokens a row
        assert x["prefill"]["tokens_per_s"]["median"] > 0 and x["throughput"]["median"] > 0
        assert x["throughput_unit"] == "decode tokens/s"
        ttft, total, itl = x["ttft_ms"], x["total_ms"], x["latency_ms"]
        assert 0 < ttft["p50"] < total["p50"] and ttft["max"] < total["max"]
        assert 0 < itl["min"] <= itl["p50"] <= itl["p90"] <= itl["p99"] <= itl["max"]
        # 5 gaps after the first token: decode tokens/s is b × 5 over their sum (per round, medians)
        assert x["throughput"]["min"] <= x["throughput"]["median"] <= x["throughput"]["max"]
        assert b * 1000 / itl["max"] <= x["throughput"]["median"] <= b * 1000 / itl["min"]
    a = r["artifacts"][0]
    assert a["runtime"] == "torch" and a["peak_rss_bytes"] > 0 and a["parameters"] > 0
    assert a["eval_rows"] == len(PAIRS) and 0 <= a["accuracy"] <= 1 and a["perplexity"] > 1
    assert r["results"][1]["speedup"]["vs"] == "tiny-llm" and r["results"][1]["speedup"]["median"] > 0
    err = causal["stderr"]
    assert "decode tok/s" in err and "TTFT p50 ms" in err and "perplexity" in err and "load average" in err
    csv = (causal["root"] / "llm.csv").read_text().splitlines()
    assert len(csv) == 1 + len(r["results"]) and "decode_tokens_s" in csv[0] and "itl_p99_ms" in csv[0]


def test_perplexity_equals_a_direct_computation(causal, tiny_llm, gen_data):
    """exp of the mean NLL of every completion token, each row run alone through
    transformers' own loss (a mean per row, weighted back by its token count)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split

    split = load_split(open_artifact(gen_data), "test")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm)).eval()
    nll, count = 0.0, 0
    for ids, mask, labels in zip(split["input_ids"], split["attention_mask"], split["labels"]):
        n = int(mask.sum())
        with torch.no_grad():
            loss = model(input_ids=torch.tensor(ids[None, :n], dtype=torch.long),
                         labels=torch.tensor(labels[None, :n])).loss.item()
        k = int((labels[1:n] != -100).sum())
        nll, count = nll + loss * k, count + k
    measured = causal["result"]["artifacts"][0]["perplexity"]
    assert measured == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert causal["result"]["artifacts"][0]["perplexity_tokens"] == count


def test_exact_match_counts_greedy_answers_equal_to_the_reference(tiny_llm, llm_tokenizer_dir, tmp_path):
    """A reference that is the model's own greedy answer matches, another does not.
    The tiny model never says EOS by itself: its answer is made to end after k tokens
    by naming the token it greedily says next as its end of generation (a random
    model may repeat one token: k is then 0, an empty answer)."""
    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split
    from mk.core.runtime.causal_runtime import CausalLM, Sampling

    lm = CausalLM.load(open_artifact(tiny_llm), threads=1)
    (prompt, _), (other, answer) = chat_rows(llm_tokenizer_dir, PAIRS[:2])
    says = lm.generate([prompt], Sampling(max_new_tokens=12, ignore_eos=True)).tokens[0]
    k = max(i for i in range(12) if says[i] not in says[:i])
    model = shutil.copytree(tiny_llm, tmp_path / "stops")
    cfg = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": says[k]}))
    data = make_generation_dataset(tmp_path / "em", llm_tokenizer_dir, [(prompt, says[:k]), (other, answer)],
                                   labels=["x"])
    got = CausalLM.load(open_artifact(model), threads=1).exact_match(load_split(open_artifact(data), "test"))
    assert got == {"exact_match": 0.5, "rows": 2}


def test_the_gate_reads_causal_results_and_never_an_encoders(causal):
    from mk.core.errors import BadInput
    from mk.core.measurement.bench_gate import compare

    r = causal["result"]
    verdict = compare(r, r, 0.05)
    with_em = sum(1 for a in r["artifacts"] if a["accuracy"])  # an exact match of 0 cannot worsen
    assert verdict["passed"] and verdict["checked"] == 2 * len(r["results"]) + with_em  # decode tok/s, ITL p99
    slower = json.loads(json.dumps(r))
    for x in slower["results"]:
        x["throughput"]["median"] *= 0.5
    assert not compare(slower, r, 0.05)["passed"]
    encoder = {**r, "task": None}
    with pytest.raises(BadInput, match="a result of encoders cannot gate a run of text-generation models"):
        compare(r, encoder, 0.05)


@pytest.mark.parametrize("args, message", [
    (["--seq-lens", "250"], "--seq-lens 250 and --new-tokens 32 exceed the model's context of 256 tokens"),
    (["--seq-lens", "data"], "--seq-lens data: causal LMs are measured at fixed prompt lengths"),
    (["--new-tokens", "1"], "--new-tokens 1: decode speed needs at least 2 new tokens"),
    (["--duration", "2"], "--duration: a causal LM is measured in calls"),
    (["--batch-sizes", "0"], "--batch-sizes '0': every value must be at least 1"),
])
def test_bad_causal_options_exit_2_in_one_line(tiny_llm, tmp_path, args, message):
    proc = mk_cli("bench", str(tiny_llm), *args, "-o", str(tmp_path / "r.json"), env=ENV)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2 and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "r.json").exists()


def test_mixed_tasks_and_wrong_datasets_are_refused(tiny_llm, tiny_model, tiny_dataset, tmp_path):
    for args, message in (
            ([str(tiny_model), str(tiny_llm)], f"{tiny_model}: is a text-classification model and {tiny_llm} a "
                                               "text-generation model; mk bench compares models of one task"),
            ([str(tiny_llm), "--seq-lens", "16", "--data", str(tiny_dataset)],
             f"{tiny_dataset}: is a text-classification dataset; a causal LM is measured on a text-generation dataset"),
            ([str(tiny_model), "--new-tokens", "8"], "--new-tokens: only text-generation models generate")):
        proc = mk_cli("bench", *args, "--threads", "1", env=ENV)
        assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2 and proc.stdout == ""


# ------------------------------------------------------ a tiny vocabulary ---

@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory) -> Path:
    """A BERT classifier over a vocabulary of 9 tokens: ids from 9 on are out of range."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from mk.core.artifact import write_manifest

    out = tmp_path_factory.mktemp("tiny-vocab") / "model"
    out.mkdir()
    vocab = out.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "fox", "dog"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(out))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=64, num_labels=2)
                                  ).eval().save_pretrained(str(out))
    write_manifest(out, kind="model", format="safetensors", task="text-classification", labels=["no", "yes"])
    return out


def test_synthetic_inputs_stay_in_a_tiny_vocabulary(tiny_vocab_model):
    """mk serve warms up, mk bench --url and offline mk bench run their synthetic ids,
    on a model whose vocabulary is 9 tokens (a fixed id like 1000 would crash it)."""
    from test_serve import start, stop

    url, proc = start(tiny_vocab_model)
    try:
        over_http = run_mk("bench", "--url", url, "--concurrency", "1", "--iters", "3", "--seq-lens", "16",
                           "--json", env=ENV)
    finally:
        code, err = stop(proc)
    assert over_http.returncode == 0, over_http.stderr
    assert json.loads(over_http.stdout)["results"][0]["errors"] == 0 and code == 0, err
    offline = run_mk("bench", str(tiny_vocab_model), "--batch-sizes", "2", "--seq-lens", "16", "--iters", "2",
                     *FAST, "--json", env=ENV)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["results"][0]["throughput"]["median"] > 0
