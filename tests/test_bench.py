"""`mk bench` offline: real tiny models in torch and ONNX Runtime, measured side by
side; the table, the JSON schema, CSV / Parquet / JSON files, the plot, the
no-faster flag, the regression gate and bad input."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest

from conftest import copy_with_other_tokenizer, LABELS, make_tiny_model, mk_cli, run_mk
from mk.core.errors import BadInput

ENV = {"COLUMNS": "220", "NO_COLOR": "1"}
FAST = ["--threads", "1", "--iters", "6", "--rounds", "3", "--warmup-calls", "2"]


def model_artifact(src: Path, out: Path, dataset: Path | None = None, parent: Path | None = None) -> Path:
    """A copy of a Hugging Face folder as a model artifact with mk.json."""
    from mk.core.artifact import open_artifact, write_manifest

    shutil.copytree(src, out)
    write_manifest(out, kind="model", format="safetensors", task="text-classification", labels=LABELS,
                   dataset=open_artifact(dataset) if dataset else None,
                   parent=open_artifact(parent) if parent else None)
    return out


def export_onnx(model_dir: Path, out: Path, dataset: Path | None = None) -> Path:
    """The model as an ONNX artifact with dynamic batch and sequence axes, tokenizer
    files and a manifest naming its parent (what `mk export-onnx` makes)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mk.core.artifact import open_artifact, write_manifest

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    out.mkdir()
    ids = torch.full((2, 16), 1000, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(out / "model.onnx"),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    shutil.copy(model_dir / "config.json", out / "config.json")
    write_manifest(out, kind="model", format="onnx", task="text-classification", labels=LABELS,
                   parent=open_artifact(model_dir), dataset=open_artifact(dataset) if dataset else None)
    return out


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny_model, tiny_dataset, minilm_dir):
    """fp32 (torch) → onnx (its export) and → slow (a deeper and wider torch model
    claiming fp32 as its parent: a variant that is certainly no faster, by ~100x the
    work per call; 8 layers of the same width came out faster in one loaded CI run)."""
    root = tmp_path_factory.mktemp("bench")
    fp32 = model_artifact(tiny_model, root / "fp32", dataset=tiny_dataset)
    onnx = export_onnx(fp32, root / "onnx", dataset=tiny_dataset)
    deep = make_tiny_model(root / "deep-src", minilm_dir, layers=8, hidden=256, seed=1)
    slow = model_artifact(deep, root / "slow", dataset=tiny_dataset, parent=fp32)
    return {"root": root, "fp32": fp32, "onnx": onnx, "slow": slow, "data": tiny_dataset}


@pytest.fixture(scope="module")
def offline(arts):
    """One real run of three artifacts, the paths piped on stdin, with every output."""
    root = arts["root"]
    proc = run_mk("bench", "--batch-sizes", "1,4", "--seq-lens", "16,data", *FAST, "--json",
                  "-o", str(root / "out.csv"), "--plot", str(root / "bench.png"),
                  input=f"{arts['fp32']}\n{arts['onnx']}\n{arts['slow']}\n", env=ENV, cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {"result": json.loads(proc.stdout), "stderr": proc.stderr, **arts}


def test_json_schema(offline):
    r = offline["result"]
    assert r["schema"] == "mk.bench/1" and r["mode"] == "offline"
    assert r["path"] == str(offline["root"] / "out.csv")
    assert set(r) >= {"created", "settings", "environment", "artifacts", "results", "warnings"}
    s = r["settings"]
    assert s["batch_sizes"] == [1, 4] and s["seq_lens"] == [16, "data"] and s["threads"] == 1
    assert s["order"] == "interleaved" and s["rounds"] == 3 and s["iters"] == 6
    env = r["environment"]
    assert env["cpu"] and env["cores_logical"] >= 1 and env["threads"]["used"] == 1
    assert env["threads"]["torch_intra_op"] == 1
    assert {"torch", "onnxruntime", "transformers", "mk"} <= set(env["libraries"])

    arts = {a["name"]: a for a in r["artifacts"]}
    assert list(arts) == ["fp32", "onnx", "slow"]
    assert (arts["fp32"]["runtime"], arts["onnx"]["runtime"]) == ("torch", "onnxruntime")
    assert arts["onnx"]["parent"] == "fp32" and arts["slow"]["parent"] == "fp32" and arts["fp32"]["parent"] is None
    for a in arts.values():
        assert a["size_bytes"] > 100_000 and a["parameters"] > 100_000
        assert a["load_s"] > 0 and a["peak_rss_bytes"] > 50_000_000
        assert 0 <= a["accuracy"] <= 1 and 0 <= a["macro_f1"] <= 1 and a["eval_rows"] == 30
        assert a["dataset"] == str(offline["data"])  # from the lineage, no --data given
    assert arts["fp32"]["accuracy"] == arts["onnx"]["accuracy"]  # same weights, two runtimes

    assert len(r["results"]) == 3 * 2 * 2
    for row in r["results"]:
        lat = row["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert row["calls"] == 6 and row["throughput"]["median"] > 0
        assert row["throughput"]["min"] <= row["throughput"]["median"] <= row["throughput"]["max"]
        assert row["speedup"]["vs"] == "fp32"
        if row["artifact"] == "fp32":
            assert row["speedup"]["median"] == 1.0 and row["vs_parent"] is None
        else:
            assert row["vs_parent"]["parent"] == "fp32"
        if row["seq_len"] == "data":
            assert 1 <= row["tokens_per_sample"] <= row["padded_len"] <= 32
        else:
            assert row["tokens_per_sample"] == 16


def test_no_faster_variant_is_flagged(offline):
    slow = [row for row in offline["result"]["results"] if row["artifact"] == "slow"]
    assert all(row["vs_parent"]["faster"] is False for row in slow)
    assert any("slow is no faster than its parent fp32" in w for w in offline["result"]["warnings"])
    assert "slow is no faster than its parent fp32" in offline["stderr"]
    assert "no faster" in offline["stderr"]  # the table's flag


def test_table_on_stderr(offline):
    err = offline["stderr"]
    for text in ("mk bench: latency and throughput", "mk bench: artifacts", "p50 ms", "p99 ms",
                 "samples/s", "speed-up", "accuracy", "fp32", "onnx", "slow", "torch cpu", "onnxruntime cpu",
                 "1 threads"):
        assert text in err, text


def test_csv_parquet_json_outputs(offline, tmp_path):
    import polars as pl

    from mk.core.measurement.bench_report import write_output

    csv = pl.read_csv(offline["root"] / "out.csv")
    assert csv.height == 12
    assert {"artifact", "batch_size", "seq_len", "latency_p99_ms", "throughput_median", "speedup",
            "accuracy", "size_bytes", "peak_rss_bytes"} <= set(csv.columns)
    assert sorted(set(csv["artifact"])) == ["fp32", "onnx", "slow"]

    result = offline["result"]
    pq = pl.read_parquet(write_output(result, tmp_path / "r.parquet"))
    assert pq.height == 12 and pq["throughput_median"].min() > 0
    assert json.loads(write_output(result, tmp_path / "r.json").read_text()) == result


def test_plot_is_a_png(offline):
    png = (offline["root"] / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_tables_render_in_process(offline):
    from rich.console import Console

    from mk.cli.bench_tables import print_report

    console = Console(record=True, width=220, no_color=True)
    print_report(offline["result"], console)
    text = console.export_text()
    assert "⚠ no faster" in text and "1.00×" in text


# ----------------------------------------------------------------- the gate --

def _edited(result: dict, path: Path, throughput: float = 1.0, p99: float = 1.0, accuracy: float = 1.0) -> Path:
    base = json.loads(json.dumps(result))
    for row in base["results"]:
        row["throughput"]["median"] *= throughput
        row["latency_ms"]["p99"] *= p99
    for a in base["artifacts"]:
        a["accuracy"] = min(1.0, a["accuracy"] * accuracy)
    path.write_text(json.dumps(base))
    return path


def test_gate_compare_in_process(offline):
    from mk.core.measurement.bench_gate import compare, gate, parse_allowance
    from mk.core.errors import BadInput, GateFailed

    r = offline["result"]
    assert parse_allowance("5%") == parse_allowance("5") == 0.05
    assert parse_allowance("0.5") == parse_allowance("0.5%") == 0.005  # a number is a percentage, whatever its size
    for bad in ("nan", "100", "-1", "fast"):
        with pytest.raises(BadInput):
            parse_allowance(bad)
    assert compare(r, r, 0.0)["passed"]
    claims = json.loads(json.dumps(r))
    for row in claims["results"]:
        row["throughput"]["median"] *= 1.2  # the baseline claims 20% more: a 17% drop
    verdict = compare(r, claims, 0.05)
    assert not verdict["passed"] and {x["measure"] for x in verdict["regressions"]} == {"throughput"}
    assert compare(r, claims, 0.25)["passed"]
    with pytest.raises(GateFailed) as e:
        gate(dict(r), claims, 0.05, "claims.json")
    assert e.value.code == 3 and "throughput" in e.value.message


def test_gate_fails_on_p99_alone_and_on_accuracy_alone(offline):
    from mk.core.measurement.bench_gate import compare

    r = offline["result"]
    assert r["artifacts"][0]["accuracy"] is not None  # the fixture measures accuracy: the gate can check it
    faster_p99 = json.loads(json.dumps(r))
    for row in faster_p99["results"]:
        row["latency_ms"]["p99"] /= 1.5  # the baseline's tail was a third shorter
    verdict = compare(r, faster_p99, 0.05)
    assert {x["measure"] for x in verdict["regressions"]} == {"p99 latency"}
    more_accurate = json.loads(json.dumps(r))
    for art in more_accurate["artifacts"]:
        art["accuracy"] = min(1.0, art["accuracy"] * 1.2 + 0.01)
    verdict = compare(r, more_accurate, 0.05)
    assert {x["measure"] for x in verdict["regressions"]} == {"accuracy"}


def test_gate_exits_3_on_a_regression_and_0_within_allowance(offline, tmp_path):
    r, fp32 = offline["result"], str(offline["fp32"])
    faster = _edited(r, tmp_path / "faster.json", throughput=100.0)
    proc = run_mk("bench", fp32, "--batch-sizes", "1", "--seq-lens", "16", *FAST,
                  "--baseline", str(faster), "--max-regress", "5%", "--json", env=ENV)
    assert proc.returncode == 3, proc.stderr
    assert "error: benchmark regressed beyond 5%" in proc.stderr and "fp32 at batch 1, seq 16: throughput" in proc.stderr
    assert json.loads(proc.stdout)["gate"]["passed"] is False  # the result still reaches stdout

    slower = _edited(r, tmp_path / "slower.json", throughput=0.01, p99=100.0, accuracy=0.5)
    proc = run_mk("bench", fp32, "--batch-sizes", "1", "--seq-lens", "16", *FAST,
                  "--baseline", str(slower), "--max-regress", "5%", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "gate passed" in proc.stderr


# ---------------------------------------------------------------- bad input --

def test_bad_artifact_exit_2_names_it(arts, tmp_path):
    proc = mk_cli("bench", str(arts["onnx"]), str(tmp_path / "missing"), *FAST, env=ENV)
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'missing'}: no such file or directory" in proc.stderr

    broken = tmp_path / "broken"
    shutil.copytree(arts["onnx"], broken)
    (broken / "model.onnx").write_bytes(b"not an onnx file")
    proc = mk_cli("bench", str(arts["onnx"]), str(broken), *FAST, env=ENV)
    assert proc.returncode == 2
    assert f"{broken / 'model.onnx'}" in proc.stderr and "cannot load" in proc.stderr


def test_bad_options_exit_2_before_measuring(arts, tmp_path):
    onnx = str(arts["onnx"])
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "r.txt").write_text("a file")
    for args, text in ((["--duration", "1", "--iters", "2"], "--duration and --iters"),
                       (["-o", str(tmp_path / "r.txt")], "unknown file type"),
                       # was "unexpected IsADirectoryError", exit 1, after measuring
                       (["-o", str(tmp_path / "folder.json")], "already exists (a folder)"),
                       (["--plot", str(tmp_path / "r.txt" / "x.png")], "is a file, not a folder"),
                       (["--plot", str(arts["onnx"] / "x.png")], "inside the input"),
                       (["--batch-sizes", "0,8"], "--batch-sizes"),
                       (["--seq-lens", "abc"], "--seq-lens"),
                       (["--baseline", str(tmp_path / "none.json")], "--baseline"),
                       (["--seq-lens", "999"], "longer than the model's 128 positions"),
                       # was reported as a missing CUDA provider
                       (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N")):
        proc = mk_cli("bench", onnx, *args, env=ENV)
        assert proc.returncode == 2, (args, proc.stderr)
        assert text in proc.stderr, (args, proc.stderr)


def test_option_values_that_were_silently_replaced_exit_2():
    # an empty --batch-sizes ran the defaults; over HTTP only the first --seq-lens was measured and
    # `--seq-lens data` without --data ran synthetic 128-token rows (checked before connecting: nothing listens)
    for args, text in ((["tq", "--batch-sizes", ""], "--batch-sizes '': expected a comma-separated list"),
                       (["--url", "http://127.0.0.1:1", "--seq-lens", "16,128"], "over HTTP, one length per run"),
                       (["--url", "http://127.0.0.1:1", "--seq-lens", "data"], "--seq-lens data: no dataset"),
                       (["--url", "http://127.0.0.1:1", "--concurrency", ""], "--concurrency '': expected"),
                       # an option of the mode not chosen was ignored
                       (["tq", "--concurrency", "4", "--wait", "1"], "--concurrency and --wait only apply with --url"),
                       (["tq", "--max-regress", "abc"], "--max-regress only applies with --baseline")):
        proc = mk_cli("bench", *args, env=ENV)
        assert proc.returncode == 2 and "error: " in proc.stderr and text in proc.stderr, (args, proc.stderr)


def test_pickled_folder_needs_trust_pickle_which_bench_has(tiny_model, tmp_path):
    """A pytorch_model.bin folder: bench refuses it, naming --trust-pickle, an option it has;
    `mk info` only reads headers, so it describes the folder instead of refusing it."""
    import torch
    from safetensors.torch import load_file

    pkl = tmp_path / "pkl"
    shutil.copytree(tiny_model, pkl)
    torch.save(load_file(str(pkl / "model.safetensors")), pkl / "pytorch_model.bin")
    (pkl / "model.safetensors").unlink()
    proc = mk_cli("bench", str(pkl), *FAST, "--seq-lens", "8", env=ENV)
    assert proc.returncode == 2 and "--trust-pickle" in proc.stderr, proc.stderr
    proc = run_mk("bench", str(pkl), *FAST, "--seq-lens", "8", "--trust-pickle", "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["artifacts"][0]["format"] == "safetensors"
    proc = run_mk("info", str(pkl), env=ENV)
    assert proc.returncode == 0 and "pytorch_model.bin, pickled" in proc.stdout, proc.stderr


def test_data_from_another_tokenizer_is_refused(arts, tiny_dataset, tmp_path):
    # accuracy was measured (meaningless) on rows of another vocabulary
    other = copy_with_other_tokenizer(tiny_dataset, tmp_path / "other-data")
    proc = mk_cli("bench", str(arts["onnx"]), "--data", str(other), *FAST, env=ENV)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr and proc.stdout == "", proc.stderr


def test_stdin_paths_lines_and_json(monkeypatch):
    from mk.cli.output import read_piped

    class Pipe(io.StringIO):
        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdin", Pipe("a/b\n\nc\n"))
    assert read_piped("artifact paths") == ["a/b", "c"]
    monkeypatch.setattr(sys, "stdin", Pipe('{\n  "path": "x"\n}\n{"path": "y"}\nz\n'))
    assert read_piped("artifact paths") == ["x", "y", "z"]


def test_parent_comparison_and_stats():
    from mk.core.measurement.bench import parse_seq_lens, percentiles, ratio, spread

    assert parse_seq_lens("128,data,128") == [128, "data"]
    assert ratio([10, 12, 11], [10, 10, 10])["median"] == 1.1
    s = spread([9.0, 10.0, 11.0])
    assert s["median"] == 10.0 and s["spread_pct"] == 20.0
    p = percentiles([0.001] * 99 + [0.1])
    assert p["p50"] == 1.0 and p["max"] == 100.0 and p["p99"] > p["p90"]


def test_old_warmup_spelling_still_works_and_says_so(arts):
    """`--warmup` meant untimed calls here and the learning-rate warm-up in `mk tune`:
    bench's is now --warmup-calls; the old spelling keeps working with a deprecation line."""
    proc = run_mk("bench", str(arts["onnx"]), "--threads", "1", "--iters", "2", "--rounds", "1", "--warmup", "2",
                  "--batch-sizes", "1", "--eval-limit", "0", "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "--warmup is now --warmup-calls" in proc.stderr
    assert json.loads(proc.stdout)["settings"]["warmup"] == 2


def _synthetic(names=("tuned", "int8"), throughput=100.0) -> dict:
    return {"schema": "mk.bench/1", "mode": "offline",
            "artifacts": [{"name": n, "accuracy": 0.9} for n in names],
            "results": [{"artifact": n, "batch_size": 1, "seq_len": 128, "throughput": {"median": throughput},
                         "latency_ms": {"p99": 10.0}} for n in names]}


@pytest.mark.parametrize("edit, field", [
    (lambda b: b["results"][0]["throughput"].update(median="fast"), "results[0].throughput.median is 'fast'"),
    (lambda b: b["results"][0].pop("artifact"), "results[0] has no 'artifact'"),
    (lambda b: b["results"].__setitem__(1, 5), "results[1] is a int"),
    (lambda b: b["results"][0].update(latency_ms=3), "results[0].latency_ms is 3"),
    (lambda b: b["artifacts"][0].update(accuracy="high"), "artifacts[0] needs a name and a numeric accuracy"),
])
def test_a_malformed_baseline_is_exit_2_naming_the_field(tmp_path, edit, field):
    from mk.core.measurement.bench_gate import load_baseline

    base = _synthetic()
    edit(base)
    (tmp_path / "b.json").write_text(json.dumps(base))
    with pytest.raises(BadInput, match=re.escape(field)):
        load_baseline(tmp_path / "b.json")


def test_a_baseline_of_other_artifacts_is_not_matched_by_position():
    from mk.core.measurement.bench_gate import compare, parse_renames

    other = _synthetic(("their-model", "their-int8"), throughput=10.0)  # ten times slower: would "pass"
    with pytest.raises(BadInput, match="no artifact and shape in common") as e:
        compare(_synthetic(), other, 0.05)
    assert "their-model" in e.value.message and "--baseline-as" in e.value.hint
    verdict = compare(_synthetic(), other, 0.05, parse_renames("their-model=tuned"))
    assert verdict["passed"] and verdict["checked"] == 3
    assert verdict["unmatched"] == ["their-int8 at batch 1, seq 128", "int8 at batch 1, seq 128"]
    with pytest.raises(BadInput, match="the baseline has no artifact nope"):
        compare(_synthetic(), other, 0.05, parse_renames("nope=tuned"))
    with pytest.raises(BadInput, match="BASELINE_NAME=NAME"):
        parse_renames("tuned")


def test_an_image_classifier_is_measured_on_the_datasets_images(tmp_path):
    """An image has no length to vary: the images of --data by default, --seq-lens N refused,
    and no dataset at all said in one line (was a raw AttributeError on synthetic token ids)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from mk.core.data.prep import PrepOptions, prep
    from test_prep import make_image_folder

    config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, id2label=dict(enumerate(["cat", "dog", "fox"])),
                       label2id={"cat": 0, "dog": 1, "fox": 2})
    vit = tmp_path / "vit"
    ViTForImageClassification(config).eval().save_pretrained(str(vit))
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(str(vit))
    prep(make_image_folder(tmp_path / "imgs"), tmp_path / "data", PrepOptions(tokenizer=str(vit)))
    fast = ["--batch-sizes", "1,2", "--iters", "2", "--rounds", "1", "--json"]

    r = run_mk("bench", str(vit), *fast)
    assert r.returncode == 2 and "measured on real images" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_mk("bench", str(vit), "--data", str(tmp_path / "data"), "--seq-lens", "16", *fast)
    assert r.returncode == 2 and "image classifier" in r.stderr and "--seq-lens" in r.stderr, r.stderr
    r = run_mk("bench", str(vit), "--data", str(tmp_path / "data"), *fast)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"]
    assert {row["batch_size"] for row in rows} == {1, 2} and all(row["seq_len"] == "data" for row in rows)
