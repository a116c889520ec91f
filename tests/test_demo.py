"""`mk demo` end to end on the real embedded model and dataset: the chain a new
user runs first, through the real `mk` executable at every step."""

from __future__ import annotations

import json

import pytest

from conftest import run_mk

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_chain_and_ends_with_the_bench_table(tmp_path):
    out = tmp_path / "demo"
    # the whole chain trains twice (tune, then distil): minutes on a 2-core CPU, more on a busy one
    r = run_mk("demo", "-o", str(out), "--epochs", "1", "--threads", "2", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(out)
    for step in ("$ mk prep tweets", "$ mk tune data --model minilm", "$ mk prune tuned",
                 "$ mk tune data --model pruned --teacher tuned", "$ mk quant distilled", "$ mk bench"):
        assert step in r.stderr
    assert "mk bench: latency and throughput" in r.stderr

    report = json.loads((out / "bench.json").read_text())
    assert [a["name"] for a in report["artifacts"]] == ["tuned", "distilled", "int8"]
    assert all(a["accuracy"] > 0.5 for a in report["artifacts"])  # three classes: chance is 1/3
    tuned, distilled = report["artifacts"][:2]
    assert distilled["parameters"] < tuned["parameters"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lineage = json.loads(run_mk("info", str(out / "int8"), "--lineage", "--json", check=True).stdout)
    assert ([step["path"].rsplit("/", 1)[-1] for step in lineage["lineage"]][:5]
            == ["int8", "int8-onnx", "distilled", "pruned", "tuned"])
    assert not list(tmp_path.glob(".demo.tmp-*"))


def test_demo_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "demo").mkdir()
    r = run_mk("demo", "-o", str(tmp_path / "demo"))
    assert r.returncode == 2 and "--force" in r.stderr


def test_generate_demo_tunes_benches_and_serves_the_causal_lm(tmp_path):
    out = tmp_path / "gen"
    # SmolLM2 (135 M) is converted, LoRA-tuned, benched and served: minutes on a 2-core CPU
    r = run_mk("demo", "--task", "generate", "-o", str(out), "--sample", "200", "--threads", "2", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(out)
    for step in ("$ mk prep tweets --task generate", "$ mk tune data --model smollm2", "$ mk bench smollm2 tuned",
                 "$ mk serve tuned --port 0"):
        assert step in r.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["task"] == "text-generation" and [a["name"] for a in report["artifacts"]] == ["smollm2", "tuned"]
    assert all(x["throughput"]["median"] > 0 for x in report["results"])  # decode tokens/s
    served = json.loads((out / "completion.json").read_text())
    assert served["expected"] in ("negative", "neutral", "positive") and served["answer"].strip()
    tuned = json.loads((out / "tuned" / "mk.json").read_text())
    assert tuned["task"] == "text-generation" and tuned["metrics"]["exact_match_n"] > 0
    assert not list(tmp_path.glob(".gen.tmp-*"))
