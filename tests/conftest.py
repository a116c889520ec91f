"""Shared fixtures: tiny models built from a config with the real MiniLM
tokenizer, and a tiny dataset artifact of real tweets, so tests run in seconds."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests run in parallel workers, each with torch's OpenMP threads (and the `mk` processes
# they start): OpenMP threads that spin while they wait took a quarter of the suite's CPU
# from the other workers (test_tune + test_bench on 2 cores: 143 s of CPU, 108 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

LABELS = ["negative", "neutral", "positive"]


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where torch sees a CUDA device."""
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _torch_default_threads() -> int:
    """torch's thread count as a fresh `mk` process has it, read before any fixture runs."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_restored(_torch_default_threads):
    """A runtime given --threads sets torch's process-wide thread count, in module fixtures too;
    each test starts from the default a subprocess gets (reductions over other thread counts
    round differently, and resume tests compare an in-process run with a subprocess)."""
    import torch

    torch.set_num_threads(_torch_default_threads)
    yield
    torch.set_num_threads(_torch_default_threads)


@pytest.fixture(scope="session", autouse=True)
def _mk_cache(tmp_path_factory) -> Path:
    """mk's cache (the converted GGUF model) lives in the session's temporary folder,
    never in the user's home; `mk` subprocesses inherit it."""
    cache = tmp_path_factory.mktemp("mk-cache")
    os.environ["MK_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def smollm2_dir(_mk_cache) -> Path:
    """The real embedded causal LM, converted from its GGUF file (about 40 s, once)."""
    from mk.core.embedded import resolve_model
    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def llm_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer with its chat template, read from the embedded GGUF file."""
    from transformers import AutoTokenizer

    from mk.core.embedded import gguf_path

    gguf = gguf_path("smollm2")
    out = tmp_path_factory.mktemp("llm-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


def make_tiny_llm(out: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """A Llama causal LM with hidden size 32 and SmolLM2's real tokenizer (a plain
    Hugging Face folder, as a user would bring)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory, llm_tokenizer_dir) -> Path:
    return make_tiny_llm(tmp_path_factory.mktemp("llms") / "tiny-llm", llm_tokenizer_dir)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from mk.core.embedded import model_path
    return model_path("minilm")


@pytest.fixture(scope="session")
def tweets_rows() -> list[tuple[str, str]]:
    """(text, label) rows of the real embedded dataset, read lossily like `mk prep` does."""
    from mk.core.embedded import data_path
    raw = data_path("tweets").read_bytes().decode("utf-8", errors="replace")
    return [(r["text"], r["sentiment"]) for r in csv.DictReader(io.StringIO(raw))]


def write_labelled_csv(path: Path, rows, per_label: int) -> Path:
    """A text,label CSV of the first `per_label` rows of each label."""
    by_label: dict[str, list[str]] = {}
    for text, label in rows:
        by_label.setdefault(label, []).append(text)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label")] + [(t, l) for l, ts in by_label.items() for t in ts[:per_label]])
    return path


def make_tiny_model(out: Path, tokenizer_dir: Path, labels=LABELS, seed: int = 0, layers: int = 2,
                    hidden: int = 32) -> Path:
    """A BERT classifier with hidden size 32 (or `hidden`) and the real MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                        num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={l: i for i, l in enumerate(labels)})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", minilm_dir)


def make_tiny_dataset(out: Path, tokenizer_dir: Path, rows, sizes=(120, 30, 30), max_length: int = 32) -> Path:
    """A dataset artifact in the contract's layout, from real rows, round-robin by label."""
    from transformers import AutoTokenizer

    from mk.core.artifact import write_manifest
    from mk.core.dataset import save_split

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    by_label = {l: [t for t, lab in rows if lab == l] for l in LABELS}
    picked = [(by_label[l][i], j) for i in range(sum(sizes)) for j, l in enumerate(LABELS)][: sum(sizes)]
    out.mkdir(parents=True)
    start = 0
    for split, n in zip(("train", "val", "test"), sizes):
        chunk = picked[start:start + n]
        start += n
        enc = tok([t for t, _ in chunk], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np")
        save_split(out, split, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                "labels": np.array([j for _, j in chunk])})
    tok.save_pretrained(str(out))
    write_manifest(out, kind="dataset", format="safetensors", task="text-classification", labels=LABELS,
                   max_length=max_length, splits=dict(zip(("train", "val", "test"), sizes)))
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, minilm_dir, tweets_rows) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", minilm_dir, tweets_rows)


def copy_with_other_tokenizer(dataset: Path, out: Path) -> Path:
    """A copy of a dataset artifact whose tokenizer files are another (tiny) vocabulary's:
    the shape of data prepared for some other model."""
    import shutil

    from transformers import BertTokenizerFast

    shutil.copytree(dataset, out)
    for f in out.glob("tokenizer*"):
        f.unlink()
    vocab = out.parent / f"{out.name}-vocab.txt"
    vocab.write_text("\n".join(["<pad>", "<unk>", "<s>", "</s>", "<mask>", "a", "b"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), pad_token="<pad>", unk_token="<unk>", cls_token="<s>",
                      sep_token="</s>", mask_token="<mask>").save_pretrained(str(out))
    return out


def relabelled_copy(dataset: Path, out: Path, labels: list[str]) -> Path:
    """A copy of a dataset artifact whose label ids are named `labels` in its manifest:
    the same count as the original's, other classes (as `mk prep` of other data makes)."""
    import json
    import shutil

    shutil.copytree(dataset, out)
    manifest = json.loads((out / "mk.json").read_text())
    (out / "mk.json").write_text(json.dumps(manifest | {"labels": labels}, indent=2) + "\n")
    return out


def run_mk(*args: str, input: str | None = None, env: dict | None = None, cwd=None, check=False,
           timeout: float = 600):
    """Run the real `mk` console script in a subprocess (stdout and stderr apart)."""
    mk = Path(sys.executable).with_name("mk")
    proc = subprocess.run([str(mk), *args], input=input, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mk {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def mk_cli(*args: str, input: str | None = None, env: dict | None = None):
    """`mk ARGS` in this process through typer's CliRunner, with run_mk's result fields
    (returncode, stdout, stderr): for checks of an exit code and a message, without a
    new interpreter that imports torch each time. An exception that escaped mk (which
    a user would see as a traceback) fails the test."""
    from typer.testing import CliRunner

    from mk.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args], input=input, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def interrupt_at_first_checkpoint(args: list[str], out: Path, timeout: float = 120):
    """`mk ARGS -o OUT` in a subprocess, sent SIGTERM once its first checkpoint
    (OUT.ckpt/last.pt) is on disk: (the process, its stderr)."""
    import signal
    import time

    mk = Path(sys.executable).with_name("mk")
    proc = subprocess.Popen([str(mk), *args, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpt = out.parent / f"{out.name}.ckpt" / "last.pt"
    deadline = time.monotonic() + timeout
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc, err
