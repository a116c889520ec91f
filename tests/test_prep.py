"""`mk prep`: every source format, column detection, cleaning counts, stratified
and reproducible splits, tokenization, images, each bad input (exit 2, one line,
no output), and `mk prep … | mk info` as a real pipe. Small files in tmp_path."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import run_mk
from mk.cli.main import app
from mk.core.dataset import SplitWriter, open_dataset, load_split, save_split
from mk.core.data.prep import PrepOptions, allocate, prep

runner = CliRunner()
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def rows(tweets_rows) -> list[tuple[str, str]]:
    """60 distinct real tweets, 20 per label, interleaved."""
    seen, by = set(), {l: [] for l in LABELS}
    for text, label in tweets_rows:
        key = text.strip()
        if key and key not in seen and len(by[label]) < 20:
            seen.add(key)
            by[label].append(key)
    return [(by[l][i], l) for i in range(20) for l in LABELS]


def write_table(path: Path, rows, text="text", label="label", extra: dict | None = None) -> Path:
    import polars as pl

    frame = {text: [t for t, _ in rows], label: [l for _, l in rows], **(extra or {})}
    df = pl.DataFrame(frame)
    suffix = "".join(path.suffixes)
    if suffix == ".csv":
        df.write_csv(path)
    elif suffix == ".tsv":
        df.write_csv(path, separator="\t")
    elif suffix == ".jsonl":
        df.write_ndjson(path)
    elif suffix == ".parquet":
        df.write_parquet(path)
    else:
        raise ValueError(suffix)
    return path


def run_prep(src, out, minilm_dir, **kw):
    return prep(src, out, PrepOptions(tokenizer=str(minilm_dir), **kw))


def manifest(path: Path) -> dict:
    return json.loads((path / "mk.json").read_text())


def assert_stratified(result: dict, fractions=(0.8, 0.1, 0.1)):
    """Each split keeps every label's proportion within one example."""
    for name in result["labels"]:
        total = sum(result["label_counts"][s][name] for s in ("train", "val", "test"))
        for s, f in zip(("train", "val", "test"), fractions):
            assert abs(result["label_counts"][s][name] - f * total) < 1, (s, name, result["label_counts"])


# ------------------------------------------------------------------ sources

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_table_format(tmp_path, rows, minilm_dir, suffix):
    src = write_table(tmp_path / f"data{suffix}", rows)
    r = run_prep(src, tmp_path / "out", minilm_dir)
    assert r["labels"] == LABELS and sum(r["splits"].values()) == 60
    assert r["splits"] == {"train": 48, "val": 6, "test": 6}
    ds = open_dataset(tmp_path / "out")
    train = load_split(ds, "train")
    assert train["input_ids"].dtype == np.int32 and train["attention_mask"].dtype == np.int8
    assert train["labels"].dtype == np.int64 and train["input_ids"].shape == (48, r["max_length"])
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    m = manifest(tmp_path / "out")
    assert m["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m["tokenizer"]["vocab_size"] == 30522 and m["tokenizer"]["special_tokens"]["cls_token"] == "[CLS]"


def test_tokens_match_the_tokenizer_called_directly(tmp_path, rows, minilm_dir):
    from transformers import AutoTokenizer

    src = write_table(tmp_path / "d.csv", rows)
    r = run_prep(src, tmp_path / "out", minilm_dir, max_length=16)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    split = load_split(open_dataset(tmp_path / "out"), "train")
    texts = {}
    for text, _ in rows:
        ids = tok(text, truncation=True, max_length=16, padding="max_length")["input_ids"]
        texts[tuple(ids)] = text
    assert all(tuple(row) in texts for row in split["input_ids"].tolist())
    # truncation rate: the share of rows longer than 16 tokens
    longer = np.mean([len(tok(t)["input_ids"]) > 16 for t, _ in rows])
    assert r["truncation_rate"] == pytest.approx(longer, abs=1e-6)
    assert (split["attention_mask"].sum(1) == (split["input_ids"] != 0).sum(1)).all()


def test_compressed_csv(tmp_path, rows, minilm_dir):
    import bz2

    plain = write_table(tmp_path / "d.csv", rows)
    packed = tmp_path / "d.csv.bz2"
    packed.write_bytes(bz2.compress(plain.read_bytes()))
    r = run_prep(packed, tmp_path / "out", minilm_dir)
    assert sum(r["splits"].values()) == 60


def test_semicolon_csv_with_bom_crlf_and_multiline_fields(tmp_path, rows, minilm_dir):
    """A spreadsheet export: `;`-separated, a UTF-8 BOM, CRLF, quoted fields across lines."""
    src = tmp_path / "d.csv"
    body = "".join(f'"{t.replace(chr(34), chr(39))}\r\nsecond; line";{l}\r\n' for t, l in rows)
    src.write_bytes(("\ufefftext;label\r\n" + body).encode("utf-8"))
    result = run_prep(src, tmp_path / "out", minilm_dir)
    assert result["labels"] == LABELS and result["columns"]["text"] == "text"
    assert result["cleaning"]["rows_kept"] == len(rows)
    tabs = write_table(tmp_path / "tabs.tsv", rows).rename(tmp_path / "tabs.csv")  # a TSV named .csv
    assert run_prep(tabs, tmp_path / "out2", minilm_dir)["labels"] == LABELS


def test_text_folder(tmp_path, rows, minilm_dir):
    root = tmp_path / "docs"
    for i, (text, label) in enumerate(rows):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.txt").write_text(f"  {text}\n")
    r = run_prep(root, tmp_path / "out", minilm_dir)
    assert r["labels"] == LABELS and sum(r["splits"].values()) == 60
    assert r["cleaning"]["whitespace_stripped"] == 60
    assert manifest(tmp_path / "out")["sources"][0]["files"] == 60


def test_text_folder_skips_hidden_files_and_says_an_empty_class_is_skipped(tmp_path, rows, minilm_dir):
    root = tmp_path / "docs"
    for i, (text, label) in enumerate(rows):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.txt").write_text(text)
    (root / "sarcastic").mkdir()
    (root / "sarcastic" / ".DS_Store").write_bytes(b"\x00\xffBud1")
    (root / ".DS_Store").write_bytes(b"\x00\xffBud1")
    (root / "positive" / ".DS_Store").write_bytes(b"\x00\xffBud1")
    r = runner.invoke(app, ["prep", str(root), "--tokenizer", str(minilm_dir), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.stderr
    assert manifest(tmp_path / "out")["labels"] == LABELS
    assert "sarcastic: empty class folder, skipped" in " ".join(r.stderr.split())


def test_text_folder_with_split_folders(tmp_path, rows, minilm_dir):
    root = tmp_path / "docs"
    for i, (text, label) in enumerate(rows):
        split = "train" if i < 42 else "val" if i < 51 else "test"
        (root / split / label).mkdir(parents=True, exist_ok=True)
        (root / split / label / f"{i}.txt").write_text(text)
    r = run_prep(root, tmp_path / "out", minilm_dir)
    assert r["splits"] == {"train": 42, "val": 9, "test": 9}


def make_image_folder(root: Path, per_class: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def vit_processor(tmp_path_factory) -> Path:
    """A tiny ViT image processor built from its config (8×8 output), saved like a model folder."""
    from transformers import ViTImageProcessor

    out = tmp_path_factory.mktemp("vit")
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(str(out))
    return out


def test_image_folder(tmp_path, vit_processor):
    root = make_image_folder(tmp_path / "imgs")
    r = prep(root, tmp_path / "out", PrepOptions(tokenizer=str(vit_processor)))
    assert r["task"] == "image-classification" and r["labels"] == ["cat", "dog", "fox"]
    assert r["splits"] == {"train": 24, "val": 3, "test": 3}
    split = load_split(open_dataset(tmp_path / "out"), "train")
    assert split["pixel_values"].shape == (24, 3, 8, 8) and split["pixel_values"].dtype == np.float32
    # the red channel is saturated in every cat: the processor's normalisation puts it at +1
    assert np.allclose(split["pixel_values"][split["labels"] == 0][:, 0], 1.0)
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()


def test_undecodable_image_named_or_skipped(tmp_path, vit_processor):
    root = make_image_folder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    r = runner.invoke(app, ["prep", str(root), "--tokenizer", str(vit_processor), "-o", str(tmp_path / "out")])
    one_error_line(r, tmp_path / "out", "broken.png", "will not decode")
    r = runner.invoke(app, ["prep", str(root), "--tokenizer", str(vit_processor), "-o", str(tmp_path / "out"),
                            "--skip-bad", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["cleaning"]["undecodable_skipped"] == 1


# -------------------------------------------------------- columns and labels

def test_columns_detected_and_said(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows, text="Review", label="sentiment", extra={"id": list(range(60))})
    r = runner.invoke(app, ["prep", str(src), "--tokenizer", str(minilm_dir), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.stderr
    assert "text='Review'" in r.stderr and "label='sentiment'" in r.stderr and "detected" in r.stderr
    assert r.stdout.strip() == str(tmp_path / "out")


def test_columns_detected_despite_padded_header_names(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows, text=" Text ", label="label ")
    r = run_prep(src, tmp_path / "out", minilm_dir)
    assert r["columns"]["text"] == " Text " and r["columns"]["label"] == "label " and r["labels"] == LABELS


def test_text_pairs_and_integer_labels(tmp_path, rows, minilm_dir):
    import polars as pl

    src = tmp_path / "pairs.jsonl"
    pl.DataFrame({"sentence1": [t for t, _ in rows], "sentence2": [t[::-1] for t, _ in rows],
                  "label": [LABELS.index(l) * 5 for _, l in rows]}).write_ndjson(src)
    r = run_prep(src, tmp_path / "out", minilm_dir)
    assert r["columns"]["text_pair"] == "sentence2"
    assert r["labels"] == ["0", "5", "10"]  # numbers in numeric order
    split = load_split(open_dataset(tmp_path / "out"), "train")
    assert split["token_type_ids"].dtype == np.int8 and split["token_type_ids"].max() == 1


def test_split_column(tmp_path, rows, minilm_dir):
    splits = ["train"] * 40 + ["validation"] * 10 + ["test"] * 10
    src = write_table(tmp_path / "d.parquet", rows, extra={"split": splits})
    r = run_prep(src, tmp_path / "out", minilm_dir)
    assert r["splits"] == {"train": 40, "val": 10, "test": 10} and r["columns"]["split"] == "split"


# ----------------------------------------------------------------- cleaning

def test_cleaning_counts(tmp_path, rows, minilm_dir):
    import polars as pl

    dirty = [(f"  {t} ", l) for t, l in rows[:3]]          # 3 whitespace stripped
    dirty += [("   ", "negative"), ("", "neutral")]       # 2 empty
    dirty += [(rows[4][0] + " x", None)]                  # 1 without a label
    dirty += [(rows[5][0], rows[5][1])] * 2               # 2 exact duplicates
    dirty += [(rows[6][0], "positive" if rows[6][1] != "positive" else "negative")]  # 1 conflicting
    src = tmp_path / "d.csv"
    all_rows = rows + dirty
    pl.DataFrame({"text": [t for t, _ in all_rows], "label": [l for _, l in all_rows]}).write_csv(src)
    test = write_table(tmp_path / "t.csv", rows[:2] + [(f"fresh test text {i}", l) for i, l in enumerate(LABELS * 2)])
    r = run_prep(src, tmp_path / "out", minilm_dir, test=str(test))
    c = r["cleaning"]
    assert c["rows_read"] == len(all_rows) + 8
    assert c["whitespace_stripped"] == 3 + 1 and c["empty_text"] == 2 and c["no_label"] == 1  # + the blank
    # the stripped copies of rows 0-2 are duplicates of rows 0-2 too
    assert c["duplicates"] == 2 + 3 and c["conflicting_duplicates"] == 1
    assert c["cross_split_duplicates"] == 2  # test rows already in training
    assert r["splits"]["test"] == 6 and c["rows_kept"] == 60 + 6


def test_stratified_within_one_example(tmp_path, rows, minilm_dir):
    unbalanced = rows + [(f"more positive words number {i}", "positive") for i in range(27)]
    src = write_table(tmp_path / "d.csv", unbalanced)
    r = run_prep(src, tmp_path / "out", minilm_dir, split=(0.7, 0.2, 0.1))
    assert_stratified(r, (0.7, 0.2, 0.1))
    r = run_prep(src, tmp_path / "out2", minilm_dir, sample=40)
    assert sum(r["splits"].values()) == 40 and r["cleaning"]["sampled_out"] == len(unbalanced) - 40
    assert_stratified(r)


def test_allocate_keeps_every_part_within_one():
    for n in range(0, 60):
        for fr in ((0.8, 0.1, 0.1), (0.5, 0.3, 0.2), (0.34, 0.33, 0.33)):
            sizes = allocate(n, fr)
            assert sum(sizes) == n and all(abs(s - n * f) < 1 for s, f in zip(sizes, fr))


def test_same_seed_same_bytes_other_seed_other_split(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows)

    def digest(out):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_prep(src, tmp_path / name, minilm_dir, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_max_length_is_the_95th_percentile_rounded_to_8(tmp_path, rows, minilm_dir):
    from transformers import AutoTokenizer

    src = write_table(tmp_path / "d.csv", rows)
    r = run_prep(src, tmp_path / "out", minilm_dir, split=(0.8, 0.1, 0.1))
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    train = load_split(open_dataset(tmp_path / "out"), "train")
    texts = {tuple(tok(t, truncation=True, max_length=r["max_length"])["input_ids"]): t for t, _ in rows}
    lengths = [len(tok(texts[tuple(ids[m.astype(bool)].tolist())])["input_ids"])
               for ids, m in zip(train["input_ids"], train["attention_mask"])]
    expected = int(np.ceil(np.percentile(lengths, 95) / 8) * 8)
    assert r["max_length"] == expected and r["max_length"] % 8 == 0


def test_split_writer_matches_save_split(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, 100, (5, 4)).astype(np.int32),
              "attention_mask": np.ones((5, 4), np.int8), "labels": np.arange(5, dtype=np.int64)}
    save_split(tmp_path, "train", arrays)
    w = SplitWriter(tmp_path, "val", 5, {"input_ids": (4,), "attention_mask": (4,), "labels": ()})
    order = np.array([3, 0, 4, 1, 2])
    w.write(order[:2], {k: v[:2] for k, v in arrays.items()})
    w.write(order[2:], {k: v[2:] for k, v in arrays.items()})
    w.close()
    a, b = load_file(str(tmp_path / "train.safetensors")), load_file(str(tmp_path / "val.safetensors"))
    for k in arrays:
        assert b[k].dtype == a[k].dtype and (b[k][order] == a[k]).all()
    w = SplitWriter(tmp_path, "test", 0, {"input_ids": (4,), "labels": ()})  # an empty split still loads
    w.close()
    assert load_file(str(tmp_path / "test.safetensors"))["input_ids"].shape == (0, 4)


# ---------------------------------------------------------------- bad input

def one_error_line(r, out: Path, *needles: str):
    """Exit 2, one `error:` line (and perhaps a hint), nothing on stdout, no output left."""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.exit_code == 2, r.stderr
    assert lines and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert all(l.startswith(("error: ", "hint: ")) for l in lines), r.stderr
    for n in needles:
        assert n in lines[0], (n, r.stderr)
    assert r.stdout == ""
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), "output left behind"


def bad(tmp_path, minilm_dir, *args):
    out = tmp_path / "out"
    r = runner.invoke(app, ["-q", "prep", *map(str, args), "--tokenizer", str(minilm_dir), "-o", str(out)])
    return r, out


def test_missing_file(tmp_path, minilm_dir):
    r, out = bad(tmp_path, minilm_dir, tmp_path / "nope.csv")
    one_error_line(r, out, "nope.csv", "no such file")


def test_unknown_format(tmp_path, minilm_dir):
    (tmp_path / "d.xlsx").write_bytes(b"PK")
    r, out = bad(tmp_path, minilm_dir, tmp_path / "d.xlsx")
    one_error_line(r, out, "d.xlsx", "unknown format")


def test_named_column_missing_lists_columns(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows)
    r, out = bad(tmp_path, minilm_dir, src, "--text-col", "body")
    one_error_line(r, out, "--text-col 'body'", "'text', 'label'")


def test_no_rows_left(tmp_path, minilm_dir):
    src = write_table(tmp_path / "d.csv", [("  ", "a"), ("", "b"), (" ", "a")])
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "no rows left after cleaning", "empty text 3")


def test_only_one_class(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", [(t, "same") for t, _ in rows])
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "only one class", "'same'")


def test_class_too_small(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", [(t, l) for t, l in rows if l != "positive"] + rows[2:6:3])
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "class 'positive' has 2 example(s)", "too few")


def test_jsonl_with_a_bom_and_crlf(tmp_path, rows, minilm_dir):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t, "label": l}) + "\r\n" for t, l in rows).encode())
    assert run_prep(src, tmp_path / "out", minilm_dir)["labels"] == LABELS


def test_malformed_jsonl_names_the_line(tmp_path, rows, minilm_dir):
    lines = [json.dumps({"text": t, "label": l}) for t, l in rows]
    lines.insert(11, '{"text": "broken, "label":')
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "d.jsonl: line 12 is not valid JSON")


def test_output_holding_the_source_is_refused_even_with_force(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows)
    r = runner.invoke(app, ["-q", "prep", str(src), "--tokenizer", str(minilm_dir), "-o", str(tmp_path), "--force"])
    assert r.exit_code == 2 and "would overwrite the input" in r.stderr, r.stderr
    assert src.is_file()


def test_split_column_with_a_blank_cell_names_the_row(tmp_path, rows, minilm_dir):
    splits = ["train"] * 40 + ["val"] * 10 + ["test"] * 10
    splits[7] = ""
    splits[9] = "bogus"
    src = write_table(tmp_path / "d.csv", rows, extra={"split": splits})
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "split column 'split'", "(first at row 8): (empty), 'bogus'")


def test_an_empty_or_all_duplicate_val_test_file_is_not_silently_replaced(tmp_path, rows, minilm_dir):
    """A --val/--test file whose rows are all gone is an error, not a split carved from train instead."""
    src = write_table(tmp_path / "d.csv", rows)
    header_only = tmp_path / "v.csv"
    header_only.write_text("text,label\n")
    r, out = bad(tmp_path, minilm_dir, src, "--val", header_only)
    one_error_line(r, out, f"{header_only}: the val split is empty")
    r, out = bad(tmp_path, minilm_dir, src, "--test", src)
    one_error_line(r, out, f"{src}: the test split is empty", "cross split duplicates 60")


def test_output_under_a_file_is_bad_usage(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows)
    (tmp_path / "notes.txt").write_text("a file")
    r = runner.invoke(app, ["-q", "prep", str(src), "--tokenizer", str(minilm_dir),
                            "-o", str(tmp_path / "notes.txt" / "out")])
    assert r.exit_code == 2 and "parent is a file" in r.stderr and "unexpected" not in r.stderr, r.stderr
    r = runner.invoke(app, ["-q", "prep", str(src), "--tokenizer", str(minilm_dir), "-o", str(src / "out")])
    assert r.exit_code == 2 and "inside the input" in r.stderr, r.stderr


def test_negative_seed_is_bad_usage(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows)
    r, out = bad(tmp_path, minilm_dir, src, "--seed", "-1")
    one_error_line(r, out, "invalid value for '--seed'")  # the range is in the option's type


def test_sample_too_small_says_so(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows)
    r, out = bad(tmp_path, minilm_dir, src, "--sample", "4")
    one_error_line(r, out, "after --sample 4, too few")


def test_nested_label_column_is_bad_input_not_stringified(tmp_path, rows, minilm_dir):
    import polars as pl
    src = tmp_path / "d.parquet"
    pl.DataFrame({"text": [t for t, _ in rows], "label": [{"name": l} for _, l in rows],
                  "meta": [[1, 2]] * len(rows)}).write_parquet(src)  # a nested column not used is fine
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "d.parquet: column 'label' holds nested values")


def test_not_utf8_names_the_row(tmp_path, minilm_dir):
    src = tmp_path / "d.csv"
    src.write_bytes(b"text,label\nfine,a\nalso fine,b\nbad \xd1 byte,a\n")
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "d.csv", "row 3", "not valid UTF-8")


def test_not_utf8_hint_names_the_encoding_options(tmp_path, minilm_dir):
    src = tmp_path / "d.csv"
    src.write_bytes(b"text,label\nfine,a\nalso fine,b\nbad \xd1 byte,a\n")
    r, out = bad(tmp_path, minilm_dir, src)
    assert "--encoding" in r.stderr and "--encoding-errors replace" in r.stderr


def test_latin1_text_folder_reads_with_encoding(tmp_path, rows, minilm_dir):
    """A real-world corpus in Latin-1 (news articles with 'café', '£'): read with
    --encoding latin-1, the text arrives intact; strict UTF-8 stops naming the file."""
    root = tmp_path / "news"
    for i, (text, label) in enumerate(rows):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.txt").write_bytes(f"café £{i} {text}".encode("latin-1", "replace"))
    r, out = bad(tmp_path, minilm_dir, root)
    one_error_line(r, out, "not valid utf-8")
    assert "--encoding" in r.stderr
    result = run_prep(root, tmp_path / "out", minilm_dir, encoding="latin-1")
    assert sum(result["splits"].values()) == len(rows)
    ids = load_split(open_dataset(tmp_path / "out"), "train")["input_ids"][0]
    from transformers import AutoTokenizer
    assert "cafe" in AutoTokenizer.from_pretrained(str(minilm_dir)).decode(ids)  # uncased: é folds to e


def test_encoding_errors_replace_counts_the_bytes(tmp_path, rows, minilm_dir):
    src = tmp_path / "d.csv"
    body = "".join(f'"{t.replace(chr(34), "")}",{l}\n' for t, l in rows).encode("utf-8")
    src.write_bytes(b"text,label\n" + body + b"bad \xd1 byte,negative\nmore \xff\xfe,neutral\n")
    result = run_prep(src, tmp_path / "out", minilm_dir, encoding_errors="replace")
    assert result["cleaning"]["bytes_replaced"] == 3
    assert result["cleaning"]["rows_read"] == len(rows) + 2


def test_cp1252_csv_and_an_unknown_codec(tmp_path, rows, minilm_dir):
    src = tmp_path / "d.csv"
    body = "".join(f'"{t.replace(chr(34), "")} \u201cquoted\u201d",{l}\n' for t, l in rows)
    src.write_bytes(("text,label\n" + body).encode("cp1252", "replace"))
    assert sum(run_prep(src, tmp_path / "ok", minilm_dir, encoding="cp1252")["splits"].values()) > 0
    r, out = bad(tmp_path, minilm_dir, src, "--encoding", "klingon")
    one_error_line(r, out, "--encoding 'klingon': not a codec Python knows")


def test_test_label_never_seen_in_training(tmp_path, rows, minilm_dir):
    src = write_table(tmp_path / "d.csv", rows)
    test = write_table(tmp_path / "t.csv", [("brand new text", "sarcastic"), ("another one", "negative")])
    r, out = bad(tmp_path, minilm_dir, src, "--test", test)
    one_error_line(r, out, "test label 'sarcastic'", "never appears in training")
    assert r.stderr.startswith(f"error: {test}:"), r.stderr  # names the file that holds it, not the main one


def test_nan_labels_are_missing_labels(tmp_path, rows, minilm_dir):
    """A label written as NaN (pandas' missing value) is no label, in a text or a float column."""
    src = write_table(tmp_path / "d.csv", [(t, "NaN" if i % 9 == 0 else l) for i, (t, l) in enumerate(rows)])
    assert run_prep(src, tmp_path / "a", minilm_dir)["labels"] == LABELS
    floats = write_table(tmp_path / "f.csv", [(t, float("nan") if i % 9 == 0 else float(LABELS.index(l)))
                                              for i, (t, l) in enumerate(rows)])
    assert "NaN" in floats.read_text()
    result = run_prep(floats, tmp_path / "b", minilm_dir)
    assert result["labels"] == ["0", "1", "2"] and result["cleaning"]["no_label"] == 7


def test_labels_kept_as_written(tmp_path, rows, minilm_dir):
    """Labels are the text written, not what type inference makes of it: 01 and 1 stay
    two classes, 007 stays 007 (numbers still in numeric order), JSON booleans are
    true/false; pandas' 1.0 (integers beside a missing value) is 1."""
    import polars as pl

    texts = [t for t, _ in rows]
    csv = tmp_path / "codes.csv"
    csv.write_text("text,label\n" + "".join(f'"{t.replace(chr(34), chr(39))}",{["01", "1", "10", "007"][i % 4]}\n'
                                           for i, t in enumerate(texts)))
    assert run_prep(csv, tmp_path / "a", minilm_dir)["labels"] == ["01", "1", "007", "10"]
    booleans = tmp_path / "b.jsonl"
    pl.DataFrame({"text": texts, "label": [i % 2 == 0 for i in range(len(texts))]}).write_ndjson(booleans)
    assert run_prep(booleans, tmp_path / "b", minilm_dir)["labels"] == ["false", "true"]
    floats = write_table(tmp_path / "f.parquet", [(t, float(i % 3) * 5) for i, t in enumerate(texts)])
    assert run_prep(floats, tmp_path / "c", minilm_dir)["labels"] == ["0", "5", "10"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_fractional_number_labels_are_refused(tmp_path, rows, minilm_dir, suffix):
    src = write_table(tmp_path / f"d{suffix}", [(t, [0.5, 1.0, 2.0][i % 3]) for i, (t, _) in enumerate(rows)])
    r, out = bad(tmp_path, minilm_dir, src)
    one_error_line(r, out, "label column 'label' holds non-integer numbers")


def test_bad_input_in_a_real_process(tmp_path, minilm_dir):
    r = run_mk("prep", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- pipes

def test_prep_pipes_into_info(tmp_path, rows):
    src = write_table(tmp_path / "d.csv", rows)
    mk = Path(sys.executable).with_name("mk")
    shell = f"{mk} prep {src} -o {tmp_path / 'out'} | {mk} info --json"
    r = subprocess.run(shell, shell=True, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "dataset" and info["labels"] == LABELS
    assert info["splits"] == {"train": 48, "val": 6, "test": 6}


def test_embedded_tweets_sample(tmp_path):
    r = runner.invoke(app, ["prep", "tweets", "--sample", "300", "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["labels"] == LABELS and sum(result["splits"].values()) == 300
    assert result["cleaning"]["rows_read"] == 38158  # read lossily: the file has stray non-UTF-8 bytes
    assert_stratified(result)


def test_a_sample_larger_than_the_data_is_said_and_recorded_as_taken(tmp_path, rows, minilm_dir, caplog):
    import logging

    src = write_table(tmp_path / "d.csv", rows)
    with caplog.at_level(logging.WARNING, logger="mk"):
        run_prep(src, tmp_path / "out", minilm_dir, sample=1000)
    assert "--sample 1000:" in caplog.text and "holds 60 rows after cleaning; keeping them all" in caplog.text
    m = manifest(tmp_path / "out")
    assert m["sample"] == 60 and m["sample_requested"] == 1000


def test_a_huge_text_field_is_cut_before_tokenizing_without_changing_the_tokens(minilm_dir):
    """The tokenizer encodes a whole text before truncating it: a 10 MB field took
    1.5 GB. Texts reach it cut to CHARS_PER_TOKEN × max_length characters."""
    from mk.core.data.prep import CHARS_PER_TOKEN, TextEncoder, load_tokenizer

    tok = load_tokenizer(minilm_dir)
    huge = " ".join(["lorem ipsum dolor sit amet"] * 40_000)  # 1 MB
    encoder = TextEncoder(tok, 64)
    seen = []
    real = encoder.backend.encode_batch_fast
    encoder.backend.encode_batch_fast = lambda inputs, **kw: seen.extend(map(len, inputs)) or real(inputs, **kw)
    out, truncated = encoder.encode([huge, "short text"])
    assert max(seen) == CHARS_PER_TOKEN * 64 < len(huge)
    direct = tok(huge, truncation=True, max_length=64)["input_ids"]
    assert out["input_ids"][0].tolist() == direct and truncated.tolist() == [True, False]
