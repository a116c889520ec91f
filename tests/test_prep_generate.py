"""`mk prep --task generate`: the generation dataset contract (loss on the completion
only, the chat template as inference applies it, plain prompt + completion + EOS
without one), packing, the instruction recipe on real tweets, chat messages from
JSON lines, and each bad input (exit 2, one line, nothing written). SmolLM2's real
tokenizer, a few rows each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mk.cli.main import app
from mk.core.artifact import open_artifact
from mk.core.data.prep import PrepOptions, prep
from mk.core.dataset import load_split, open_dataset

runner = CliRunner()
LABELS = ["negative", "neutral", "positive"]
PAIRS = [(f"What is {a} plus {b}?", f"{a + b}") for a in range(6) for b in range(5)]  # 30 distinct rows


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs_file(tmp_path, rows=PAIRS, prompt="prompt", completion="completion") -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [{prompt: p, completion: c} for p, c in rows])


def gen_prep(src, out, tokenizer, **kw) -> dict:
    return prep(src, out, PrepOptions(tokenizer=str(tokenizer), task=kw.pop("task", "generate"), **kw))


def rows_of(out: Path):
    ds = open_dataset(out)
    return {s: load_split(ds, s) for s in ("train", "val", "test")}


def tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def plain_tokenizer_dir(tmp_path_factory, llm_tokenizer_dir) -> Path:
    """SmolLM2's tokenizer without its chat template (as a base model's would be)."""
    out = tmp_path_factory.mktemp("plain-tok")
    tok = tokenizer(llm_tokenizer_dir)
    tok.chat_template = None
    tok.save_pretrained(str(out))
    for f in out.glob("chat_template*"):
        f.unlink()
    assert not getattr(tokenizer(out), "chat_template", None)
    return out


def one_error_line(r, out: Path, *needles: str):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.exit_code == 2, r.stderr
    assert lines[0].startswith("error: ") and all(l.startswith(("error: ", "hint: ")) for l in lines), r.stderr
    for n in needles:
        assert n in lines[0], (n, r.stderr)
    assert r.stdout == "" and not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def bad(tmp_path, *args):
    out = tmp_path / "out"
    return runner.invoke(app, ["-q", "prep", *map(str, args), "-o", str(out)]), out


# ------------------------------------------------------------------ the contract

def test_labels_mask_exactly_the_completion_and_the_prompt_is_what_inference_feeds(tmp_path, tiny_llm):
    from mk.core.runtime.causal_runtime import CausalLM

    out = tmp_path / "out"
    r = gen_prep(pairs_file(tmp_path), out, tiny_llm)
    assert r["task"] == "text-generation" and r["labels"] == [] and r["generation"]["chat_template"] is True
    assert r["generation"]["prompt_column"] == "prompt" and r["generation"]["completion_column"] == "completion"
    lm = CausalLM.load(open_artifact(tiny_llm), "cpu")
    tok, answers = lm.tokenizer, dict(PAIRS)
    seen = 0
    for split, a in rows_of(out).items():
        assert a["input_ids"].dtype == np.int32 and a["attention_mask"].dtype == np.int8
        assert a["labels"].dtype == np.int64 and a["prompt_lengths"].dtype == np.int32
        for ids, mask, labels, pl in zip(a["input_ids"], a["attention_mask"], a["labels"], a["prompt_lengths"]):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any() and (ids[n:] == tok.pad_token_id).all()
            question = tok.decode(ids[:pl]).split("user\n")[1].split("<|im_end|>")[0]
            messages = [{"role": "user", "content": question}]
            assert list(ids[:pl]) == lm.chat_ids(messages)  # the prompt is what generation starts from
            full = tok.apply_chat_template(messages + [{"role": "assistant", "content": answers[question]}],
                                           tokenize=True, return_dict=False)
            assert list(ids[:n]) == list(full)
            assert (labels[:pl] == -100).all() and (labels[n:] == -100).all()
            assert (labels[pl:n] == ids[pl:n]).all()
            assert tok.decode(labels[pl:n]) == answers[question] + "<|im_end|>\n"  # end of turn included
            assert tok.decode(labels[pl:n], skip_special_tokens=True).strip() == answers[question]
            seen += 1
    assert seen == len(PAIRS) and r["splits"] == {"train": 24, "val": 3, "test": 3}


def test_without_a_chat_template_prompt_then_completion_then_eos(tmp_path, plain_tokenizer_dir):
    out = tmp_path / "out"
    r = gen_prep(pairs_file(tmp_path), out, plain_tokenizer_dir)
    assert r["generation"]["chat_template"] is False
    tok = tokenizer(plain_tokenizer_dir)
    a = rows_of(out)["train"]
    for ids, labels, pl, mask in zip(a["input_ids"], a["labels"], a["prompt_lengths"], a["attention_mask"]):
        prompt = tok.decode(ids[:pl])
        completion = dict(PAIRS)[prompt]
        want = tok(prompt)["input_ids"] + tok(" " + completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert list(ids[:int(mask.sum())]) == want
        assert list(labels[labels != -100]) == want[pl:]


def test_auto_detected_said_on_stderr_and_seeded(tmp_path, llm_tokenizer_dir):
    src = pairs_file(tmp_path)
    args = ["prep", str(src), "--tokenizer", str(llm_tokenizer_dir), "--json"]
    r1 = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r1.exit_code == 0, r1.stderr
    assert "task: generate" in r1.stderr and "'prompt'" in r1.stderr
    result = json.loads(r1.stdout)
    assert result["task"] == "text-generation" and result["cleaning"]["rows_kept"] == 30
    r2 = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert r2.exit_code == 0
    for s in ("train", "val", "test"):  # same seed, same bytes
        assert (tmp_path / "a" / f"{s}.safetensors").read_bytes() == (tmp_path / "b" / f"{s}.safetensors").read_bytes()


def test_renamed_columns_cleaning_and_duplicates(tmp_path, llm_tokenizer_dir):
    rows = PAIRS + [PAIRS[0], ("  ", "x"), ("Say hi", "")]
    src = pairs_file(tmp_path, rows, prompt="question", completion="answer")
    r = gen_prep(src, tmp_path / "out", llm_tokenizer_dir, prompt_col="question", completion_col="answer")
    c = r["cleaning"]
    assert c["rows_read"] == 33 and c["empty_text"] == 2 and c["duplicates"] == 1 and c["rows_kept"] == 30
    assert "no_label" not in c


def test_chat_messages_from_json_lines(tmp_path, llm_tokenizer_dir):
    convs = [[{"role": "system", "content": "Answer in one word."},
              {"role": "user", "content": f"Colour number {i}?"},
              {"role": "assistant", "content": "Red" if i % 2 else "Blue"},
              {"role": "user", "content": "And again?"},
              {"role": "assistant", "content": f"Green{i}"}] for i in range(20)]
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in convs] + [{"messages": []}])
    out = tmp_path / "out"
    r = gen_prep(src, out, llm_tokenizer_dir, task="auto")
    assert r["generation"]["messages_column"] == "messages" and r["cleaning"]["empty_text"] == 1
    tok = tokenizer(llm_tokenizer_dir)
    by_last = {m[-1]["content"]: m for m in convs}
    for a in rows_of(out).values():
        for ids, labels, pl in zip(a["input_ids"], a["labels"], a["prompt_lengths"]):
            answer = tok.decode(labels[labels != -100], skip_special_tokens=True).strip()
            m = by_last[answer]  # the completion is the last assistant turn alone
            assert list(ids[:pl]) == list(tok.apply_chat_template(m[:-1], add_generation_prompt=True,
                                                                  tokenize=True, return_dict=False))
            prompt = tok.decode(ids[:pl])
            assert "Answer in one word." in prompt and m[2]["content"] in prompt and answer not in prompt


def test_packing_keeps_every_token_in_order_and_only_train(tmp_path, llm_tokenizer_dir):
    src = pairs_file(tmp_path)
    gen_prep(src, tmp_path / "one", llm_tokenizer_dir, max_length=160)
    r = gen_prep(src, tmp_path / "packed", llm_tokenizer_dir, max_length=160, pack=True)
    one, packed = rows_of(tmp_path / "one"), rows_of(tmp_path / "packed")
    assert r["generation"]["packed"] and r["splits"]["train"] == 24
    n_rows = r["generation"]["train_rows"]
    assert packed["train"]["input_ids"].shape == (n_rows, 160) and n_rows < 24  # ~50-token examples, 3 a row
    assert (packed["train"]["prompt_lengths"] == 0).all()
    for key in ("input_ids", "labels"):  # the same examples, in the same (shuffled) order, end to end
        flat_one = np.concatenate([v[m.astype(bool)] for v, m in zip(one["train"][key], one["train"]["attention_mask"])])
        flat_packed = np.concatenate([v[m.astype(bool)] for v, m in zip(packed["train"][key],
                                                                         packed["train"]["attention_mask"])])
        assert (flat_one == flat_packed).all()
    assert (packed["train"]["labels"][packed["train"]["attention_mask"] == 0] == -100).all()
    for s in ("val", "test"):  # one example a row, as exact match needs
        assert all((packed[s][k] == one[s][k]).all() for k in one[s])


def test_a_prompt_that_does_not_fit_is_dropped_and_counted(tmp_path, llm_tokenizer_dir):
    rows = PAIRS + [("word " * 200 + "?", "long")]
    r = gen_prep(pairs_file(tmp_path, rows), tmp_path / "out", llm_tokenizer_dir, max_length=64)
    assert r["cleaning"]["prompt_too_long"] == 1 and sum(r["splits"].values()) == 30
    a = rows_of(tmp_path / "out")
    assert all((s["prompt_lengths"] < 64).all() for s in a.values())


def test_default_max_length_is_the_95th_percentile_of_the_examples(tmp_path, llm_tokenizer_dir):
    r = gen_prep(pairs_file(tmp_path), tmp_path / "out", llm_tokenizer_dir)
    assert r["max_length"] % 8 == 0 and "95th percentile" in r["max_length_from"]
    assert r["truncation_rate"] == 0.0


# ------------------------------------------------------------------ the recipe

def test_recipe_turns_real_tweets_into_instructions(tmp_path, llm_tokenizer_dir):
    out = tmp_path / "out"
    r = runner.invoke(app, ["prep", "tweets", "--task", "generate", "--sample", "60", "--max-length", "192",
                            "--tokenizer", str(llm_tokenizer_dir), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["labels"] == LABELS and result["generation"]["recipe"] == "classify"
    assert result["generation"]["prompt_column"] == "text" and result["generation"]["completion_column"] == "sentiment"
    assert sum(result["splits"].values()) == 60 and result["truncation_rate"] == 0
    counts = result["label_counts"]
    for s, n in result["splits"].items():  # stratified by answer: each split holds each label's share within one
        for label in LABELS:
            share = sum(counts[x][label] for x in counts) / 60
            assert abs(counts[s][label] - n * share) <= 1, (s, label, counts)
    tok = tokenizer(out)
    for a in rows_of(out).values():
        for ids, labels, pl in zip(a["input_ids"], a["labels"], a["prompt_lengths"]):
            prompt = tok.decode(ids[:pl])
            assert "<|im_start|>user\nClassify the sentiment of this tweet as negative, neutral or positive. " \
                   "Answer with one word.\nTweet: " in prompt and prompt.endswith("<|im_start|>assistant\n")
            assert tok.decode(labels[labels != -100], skip_special_tokens=True).strip() in LABELS
    assert json.loads((out / "mk.json").read_text())["task"] == "text-generation"


def test_recipe_without_a_template_ends_the_prompt_with_a_cue(tmp_path, plain_tokenizer_dir):
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([("review", "stars")] + [(f"Review number {i}", str(1 + i % 2)) for i in range(20)])
    out = tmp_path / "out"
    r = gen_prep(tmp_path / "d.csv", out, plain_tokenizer_dir)
    assert r["labels"] == ["1", "2"]
    tok = tokenizer(out)
    a = rows_of(out)["test"]
    prompt = tok.decode(a["input_ids"][0][:a["prompt_lengths"][0]])
    assert prompt.startswith("Classify the stars of this review as 1 or 2. Answer with one word.\nReview: Review number")
    assert prompt.endswith("\nAnswer:")


# ------------------------------------------------------------------ bad input

def test_chat_messages_with_a_tokenizer_without_template(tmp_path, plain_tokenizer_dir):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "yo"}]}] * 3)
    r, out = bad(tmp_path, src, "--tokenizer", plain_tokenizer_dir)
    one_error_line(r, out, "no chat template", "'messages'")


def test_an_encoder_tokenizer_without_eos(tmp_path, minilm_dir):
    r, out = bad(tmp_path, pairs_file(tmp_path), "--tokenizer", minilm_dir)
    one_error_line(r, out, "no end-of-sequence token", "--task generate")


def test_missing_columns_are_named(tmp_path, llm_tokenizer_dir):
    src = pairs_file(tmp_path)
    r, out = bad(tmp_path, src, "--tokenizer", llm_tokenizer_dir, "--prompt-col", "question")
    one_error_line(r, out, "no column 'question' (--prompt-col)", "'prompt', 'completion'")
    lonely = write_jsonl(tmp_path / "lonely.jsonl", [{"prompt": p} for p, _ in PAIRS])
    r, out = bad(tmp_path, lonely, "--tokenizer", llm_tokenizer_dir, "--task", "generate")
    one_error_line(r, out, "a 'prompt' column but no 'completion' column")
    r, out = bad(tmp_path, lonely, "--tokenizer", llm_tokenizer_dir)  # not said to be for generation
    one_error_line(r, out, "no text column")
    assert "needs a 'completion' column beside its 'prompt'" in r.stderr


def test_messages_not_ending_with_the_answer_name_the_row(tmp_path, llm_tokenizer_dir):
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rows = [{"messages": ok + [{"role": "user", "content": f"more {i}"}, {"role": "assistant", "content": "x"}]}
            for i in range(5)] + [{"messages": [{"role": "user", "content": "unanswered"}]}]
    r, out = bad(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows), "--tokenizer", llm_tokenizer_dir)
    one_error_line(r, out, "row 6", "last message must be the assistant's")


def test_max_length_beyond_the_context_and_all_prompts_too_long(tmp_path, tiny_llm):
    src = pairs_file(tmp_path)
    r, out = bad(tmp_path, src, "--tokenizer", tiny_llm, "--max-length", "512")
    one_error_line(r, out, "--max-length 512 exceeds the model's limit of 256")
    r, out = bad(tmp_path, src, "--tokenizer", tiny_llm, "--max-length", "16")
    one_error_line(r, out, "split is empty once the rows whose prompt does not fit in 16 tokens are dropped")


def test_generation_options_with_task_classify(tmp_path, llm_tokenizer_dir):
    r, out = bad(tmp_path, pairs_file(tmp_path), "--tokenizer", llm_tokenizer_dir, "--task", "classify", "--pack")
    one_error_line(r, out, "--pack is an option of --task generate")


def test_an_image_folder_cannot_be_a_generation_source(tmp_path, llm_tokenizer_dir):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    shutil.copy(Path(__file__), tmp_path / "imgs" / "cat" / "a.png")
    r, out = bad(tmp_path, tmp_path / "imgs", "--tokenizer", llm_tokenizer_dir, "--task", "generate")
    one_error_line(r, out, "--task generate takes text")
