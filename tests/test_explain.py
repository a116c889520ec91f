"""`mk explain`: one score per word from every method, the completeness of integrated
gradients, every method finding the one word that decides a trained model's label,
ONNX models explained through the runtime, dataset rows, the HTML page in a real
browser, and bad input refused with exit 2 and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_tiny_model

METHODS = ["ig", "occlusion", "shap", "lime", "attention"]
KEYWORD = "excellent"
FILLER = "the a cat dog house tree car red blue green small big old new walks runs sees near under over".split()
KEYWORD_TEXTS = ["the cat excellent sees a dog", "excellent old car", "red house near the tree walks excellent",
                 "the big dog runs under a green excellent tree"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads
    contend with other work (measured: 30 ms against 1.1 s per training step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sample(rng, n: int, tok) -> tuple[list[list[int]], list[int]]:
    """Filler sentences; label 1 exactly when the keyword is in them. One in eight
    examples is the integrated-gradients baseline ([PAD] for every word, label 0): a
    pretrained model's [PAD] is neutral, a model trained from scratch must learn it."""
    rows, labels = [], []
    for i in range(n):
        words = list(rng.choice(FILLER, rng.integers(2, 9)))
        label = i % 2
        if label:
            words.insert(int(rng.integers(0, len(words) + 1)), KEYWORD)
        ids = tok(" ".join(words))["input_ids"]
        if i % 8 == 0:
            ids, label = [ids[0]] + [tok.pad_token_id] * (len(ids) - 2) + [ids[-1]], 0
        rows.append(ids)
        labels.append(label)
    return rows, labels


@pytest.fixture(scope="module")
def keyword_model(tmp_path_factory, minilm_dir, one_torch_thread) -> Path:
    """A 2-layer BERT trained here until the keyword alone decides its label."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = make_tiny_model(tmp_path_factory.mktemp("keyword") / "model", minilm_dir, labels=["other", "keyword"])
    tok = AutoTokenizer.from_pretrained(str(out))
    model = BertForSequenceClassification.from_pretrained(str(out))
    rng = np.random.default_rng(0)
    rows, labels = _sample(rng, 512, tok)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    y = torch.tensor(labels)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(80):
        batch = torch.randint(0, len(y), (32,))
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=y[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    enc = tok(KEYWORD_TEXTS + ["the cat sees a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**enc).logits.argmax(-1).tolist() == [1, 1, 1, 1, 0]  # it learned the task
    model.save_pretrained(str(out))
    return out


def _explain(model, texts, **settings):
    from mk.core.explanation.explain import Rows, Settings, explain

    return explain(model, Rows(texts=texts), Settings(threads=1, **settings))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_one_score_per_word(tiny_model, method):
    text = "Unbelievably, the battery didn't last."
    result = _explain(tiny_model, [text], method=method, samples=50)
    rec = result["records"][0]
    words = [w["word"] for w in rec["words"]]
    # the tokenizer's words, each once, in order; a word of several pieces stays one word
    assert words == ["Unbelievably", ",", "the", "battery", "didn", "'", "t", "last", "."]
    assert len(rec["words"][0]["tokens"]) > 1
    assert all(np.isfinite(w["score"]) for w in rec["words"])
    assert rec["method"] == method and rec["prediction"] in ("negative", "neutral", "positive")
    assert abs(sum(rec["probabilities"].values()) - 1) < 1e-6


def test_ig_completeness_holds_against_the_model_itself(tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    text = "the new phone is great but the battery is awful"
    rec = _explain(tiny_model, [text], method="ig", target="positive")["records"][0]
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model)).eval()
    ids = torch.tensor([tok(text)["input_ids"]])
    baseline = torch.full_like(ids, tok.pad_token_id)
    baseline[0, 0], baseline[0, -1] = ids[0, 0], ids[0, -1]
    with torch.no_grad():
        difference = float(model(input_ids=ids).logits[0, 2] - model(input_ids=baseline).logits[0, 2])
    total = sum(w["score"] for w in rec["words"])
    assert abs(total - difference) <= 0.01 * abs(difference) + 1e-4, (total, difference)
    assert rec["completeness"]["ok"] and abs(rec["completeness"]["logit_difference"] - difference) < 1e-4


def test_too_few_ig_steps_are_reported(keyword_model):
    result = _explain(keyword_model, KEYWORD_TEXTS[:2], method="ig", steps=2)
    assert not all(r["completeness"]["ok"] for r in result["records"])
    assert any("--steps 8" in w for w in result["warnings"])


@pytest.mark.parametrize("method", METHODS)
def test_every_method_ranks_the_deciding_keyword_first(keyword_model, method):
    result = _explain(keyword_model, KEYWORD_TEXTS, method=method, steps=300, samples=200, faithfulness=True, top_k=1)
    for rec in result["records"]:
        ranked = sorted(rec["words"], key=lambda w: -w["score"])
        assert rec["target"] == "keyword"
        assert ranked[0]["word"] == KEYWORD, (rec["text"], [(w["word"], round(w["score"], 3)) for w in ranked])
        # removing it costs the keyword class more than removing a random word
        assert rec["faithfulness"]["drop_top"] > rec["faithfulness"]["drop_random"] + 0.1
    assert result["faithfulness"]["share_top_above_random"] == 1.0
    if method == "ig":
        assert all(r["completeness"]["ok"] for r in result["records"])


def test_target_explains_another_class(keyword_model):
    rec = _explain(keyword_model, ["the cat excellent sees a dog"], method="occlusion", target="other")["records"][0]
    assert rec["prediction"] == "keyword" and rec["target"] == "other"
    assert min(rec["words"], key=lambda w: w["score"])["word"] == KEYWORD  # it argues against "other"


def test_onnx_model_is_explained_through_the_runtime(tmp_path, keyword_model):
    from mk.core.compression.export import export_onnx
    from mk.core.errors import BadInput

    onnx = tmp_path / "onnx"
    export_onnx(keyword_model, onnx)
    result = _explain(onnx, KEYWORD_TEXTS, faithfulness=True)
    assert result["method"] == "occlusion" and result["runtime"]["runtime"] == "onnxruntime"
    torch_result = _explain(keyword_model, KEYWORD_TEXTS, method="occlusion")
    for rec, ref in zip(result["records"], torch_result["records"]):
        assert max(rec["words"], key=lambda w: w["score"])["word"] == KEYWORD
        assert np.allclose([w["score"] for w in rec["words"]], [w["score"] for w in ref["words"]], atol=1e-4)
    with pytest.raises(BadInput, match="needs a torch model"):
        _explain(onnx, KEYWORD_TEXTS, method="ig")


def test_dataset_rows_are_decoded_and_errors_selected(tiny_model, tiny_dataset):
    from mk.core.dataset import load_split, open_dataset
    from mk.core.explanation.explain import Rows, Settings, explain

    result = explain(tiny_model, Rows(data=tiny_dataset, split="test", limit=4, errors=True),
                     Settings(method="occlusion", threads=1))
    assert 0 < len(result["records"]) <= 4
    assert all(r["label"] != r["prediction"] and r["correct"] is False for r in result["records"])
    split = load_split(open_dataset(tiny_dataset), "test", limit=1)
    first = explain(tiny_model, Rows(data=tiny_dataset, split="test", limit=1), Settings(method="occlusion"))
    rec = first["records"][0]
    # decoding the stored ids and tokenizing the text again gives the same ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    stored = split["input_ids"][0][split["attention_mask"][0].astype(bool)].tolist()
    assert tok(rec["text"])["input_ids"] == stored
    assert rec["label"] == ["negative", "neutral", "positive"][int(split["labels"][0])]


def _cli(*args, input=None):
    from mk.cli.main import app

    return CliRunner().invoke(app, ["explain", *args], input=input)


def test_cli_json_lines_from_piped_texts(keyword_model):
    r = _cli(str(keyword_model), "--json", "--method", "occlusion", "--threads", "1",
             input="excellent old car\nthe cat sees a dog\n")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [l["kind"] for l in lines] == ["explanation", "explanation", "summary"]
    first = lines[0]
    assert first["text"] == "excellent old car" and first["prediction"] == "keyword"
    assert first["tokens"][0] == "[CLS]" and [w["word"] for w in first["words"]] == ["excellent", "old", "car"]
    assert first["settings"]["method"] == "occlusion" and lines[1]["prediction"] == "other"
    assert "excellent" in r.stderr and "keyword 0." in r.stderr  # the terminal view went to stderr


@pytest.mark.parametrize("args, message", [
    (["   "], "empty text"),
    (["fine", "--target", "nope"], "--target nope: not a label"),
    (["fine", "--method", "magic"], "--method magic: unknown method"),
])
def test_cli_bad_input_exits_2_with_one_line(tiny_model, args, message):
    r = _cli(str(tiny_model), *args)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_cli_model_without_a_classification_head(tmp_path, minilm_dir):
    r = _cli("minilm", "great phone")
    assert r.exit_code == 2 and "no text classification head" in r.stderr and r.stdout == ""


def test_cli_gradient_method_on_onnx_names_the_torch_parent(tmp_path, tiny_model):
    from mk.core.compression.export import export_onnx

    export_onnx(tiny_model, tmp_path / "onnx")
    r = _cli(str(tmp_path / "onnx"), "great phone", "--method", "ig")
    assert r.exit_code == 2 and "needs a torch model" in r.stderr and str(tiny_model) in r.stderr


def test_html_page_is_atomic_and_keeps_other_files(tmp_path, keyword_model):
    page = tmp_path / "page.html"
    page.write_text("<html>my own notes</html>")
    r = _cli(str(keyword_model), "excellent old car", "--method", "occlusion", "--html", str(page))
    assert r.exit_code == 2 and "not a page mk explain wrote" in r.stderr
    assert page.read_text() == "<html>my own notes</html>"
    r = _cli(str(keyword_model), "excellent old car", "--method", "occlusion", "--html", str(page), "--force")
    assert r.exit_code == 0 and r.stdout.strip() == str(page)
    assert "mk explain" in page.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
    # an mk page is replaced without --force; a failure leaves it as it was
    before = page.read_text()
    r = _cli(str(keyword_model), "", "--html", str(page))
    assert r.exit_code == 2 and page.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_html_page_renders_and_sorts_in_headless_chromium(tmp_path, keyword_model):
    from mk.core.explanation.page import write_page

    texts = KEYWORD_TEXTS + ["the cat sees a dog", "a <b>bold</b> & odd text"]
    result = _explain(keyword_model, texts, method="occlusion", faithfulness=True)
    page = write_page(result, tmp_path / "page.html")
    source = page.read_text()
    assert "http://" not in source and "https://" not in source  # self-contained, nothing fetched
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}"]

    def dom(url: str) -> str:
        r = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    import html.parser

    class Rows(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.scores, self.texts, self._col, self._in_body, self._in_texts = [], [], -1, False, False

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self._in_texts = dict(attrs).get("id") == "texts"
            elif tag == "tbody" and self._in_texts:
                self._in_body = True
            elif tag == "tr" and self._in_body:
                self._col = -1
            elif tag == "td" and self._in_body:
                self._col += 1
                if self._col == 3:
                    self.scores.append(float(dict(attrs)["data-sort"]))
                elif self._col == 1:
                    self.texts.append(dict(attrs)["data-sort"])

        def handle_endtag(self, tag):
            if tag == "tbody":
                self._in_body = False

    shown = Rows()
    shown.feed(dom(page.as_uri()))
    assert shown.texts == texts  # one row per text, in order, the escaped text intact
    down, up = Rows(), Rows()
    down.feed(dom(page.as_uri() + "#sort=score"))  # the page's script sorts on load
    up.feed(dom(page.as_uri() + "#sort=score-asc"))
    assert down.scores == sorted(shown.scores, reverse=True) and up.scores == sorted(shown.scores)
    assert down.texts != up.texts and sorted(down.texts) == sorted(texts)
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1000,600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    green = (pixels[..., 1] > pixels[..., 0] + 40) & (pixels[..., 1] > pixels[..., 2] + 20)
    assert green.sum() > 100  # the keyword's highlight is drawn


@pytest.mark.slow
def test_embedded_minilm_with_a_head(tmp_path, minilm_dir):
    """The real 22.7 M-parameter encoder (with a fresh 3-class head): every word scored,
    ig complete at the default steps, occlusion through the same words."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "minilm-head"
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=3)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(str(out))
    text = "@united thanks for losing my luggage AGAIN, great job"
    ig = _explain(out, [text])
    occ = _explain(out, [text], method="occlusion")
    assert ig["method"] == "ig" and ig["records"][0]["completeness"]["ok"]
    assert [w["word"] for w in ig["records"][0]["words"]] == [w["word"] for w in occ["records"][0]["words"]]
    assert [w["word"] for w in ig["records"][0]["words"]] == [
        "@", "united", "thanks", "for", "losing", "my", "luggage", "AGAIN", ",", "great", "job"]
