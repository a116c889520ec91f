"""`mk serve` as a real subprocess on a free loopback port, spoken to over HTTP with
the KServe v2 protocol, and `mk bench --url` load-testing it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import LABELS, run_mk
from test_bench import ENV, export_onnx, model_artifact


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_model, tiny_dataset):
    root = tmp_path_factory.mktemp("serve")
    fp32 = model_artifact(tiny_model, root / "fp32", dataset=tiny_dataset)
    return export_onnx(fp32, root / "tiny-onnx", dataset=tiny_dataset)


@pytest.fixture(scope="module")
def server(served_model):
    """`mk serve MODEL --port 0`: the URL it prints on stdout once ready."""
    mk = Path(sys.executable).with_name("mk")
    proc = subprocess.Popen([str(mk), "serve", str(served_model), "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=90)
    if not line or not line[0].startswith("http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"mk serve did not print its URL: {proc.stderr.read() if proc.poll() is not None else ''}")
    url = line[0].strip()
    yield {"url": url, "proc": proc, "name": "tiny-onnx"}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def call(url: str, method: str = "GET", body=None) -> tuple[int, dict | str]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def tensor(name: str, rows: list[list[int]], datatype: str = "INT64") -> dict:
    return {"name": name, "shape": [len(rows), len(rows[0])], "datatype": datatype,
            "data": [v for r in rows for v in r]}


def test_health_and_metadata(server):
    url, name = server["url"], server["name"]
    assert call(f"{url}/v2/health/live") == (200, {"live": True})
    assert call(f"{url}/v2/health/ready") == (200, {"ready": True})
    assert call(f"{url}/v2/models/{name}/ready") == (200, {"ready": True})
    status, meta = call(f"{url}/v2/models/{name}")
    assert status == 200 and meta["name"] == name and meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]][:2] == ["input_ids", "attention_mask"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 3]} in meta["outputs"]
    assert meta["parameters"]["labels"] == LABELS
    status, srv = call(f"{url}/v2")
    assert status == 200 and srv["models"] == [name]
    assert call(f"{url}/v2/models/other")[0] == 404


@pytest.mark.parametrize("datatype", ["INT64", "INT32"])
def test_infer_returns_logits_and_labels(server, datatype):
    url, name = server["url"], server["name"]
    ids = [[101, 7592, 2088, 102, 0], [101, 2054, 1037, 2204, 102]]
    mask = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    body = {"id": "r1", "inputs": [tensor("input_ids", ids, datatype), tensor("attention_mask", mask, datatype)]}
    status, out = call(f"{url}/v2/models/{name}/infer", "POST", body)
    assert status == 200, out
    assert out["model_name"] == name and out["id"] == "r1"
    outputs = {o["name"]: o for o in out["outputs"]}
    logits = outputs["logits"]
    assert logits["datatype"] == "FP32" and logits["shape"] == [2, 3] and len(logits["data"]) == 6
    best = [max(range(3), key=lambda j: logits["data"][3 * i + j]) for i in range(2)]
    assert outputs["label_id"]["data"] == best
    assert outputs["label"]["data"] == [LABELS[b] for b in best]

    # the same answer as the runtime interface gives in-process
    import numpy as np

    from mk.core.runtime import load_runtime

    expected = load_runtime(Path(server["proc"].args[2]), device="cpu", threads=1)(
        {"input_ids": np.array(ids), "attention_mask": np.array(mask)})
    assert np.allclose(np.array(logits["data"]).reshape(2, 3), expected, atol=1e-5)

    body["outputs"] = [{"name": "label"}]
    status, out = call(f"{url}/v2/models/{name}/infer", "POST", body)
    assert status == 200 and [o["name"] for o in out["outputs"]] == ["label"]


def test_bad_requests_get_400_and_the_server_keeps_serving(server):
    url, name = server["url"], server["name"]
    infer = f"{url}/v2/models/{name}/infer"
    cases = [
        (b"{not json", "not JSON"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [tensor("input_ids", [[1, 2]], "FP32")]}, "datatype"),
        ({"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2]}]}, "2 values"),
        ({"inputs": [tensor("pixels", [[1, 2]])]}, "unknown input"),
        ({"inputs": [tensor("input_ids", [[1] * 200])]}, "positions"),
        ({"inputs": [tensor("attention_mask", [[1, 1]])]}, "input_ids"),
        # ids outside the vocabulary: a 500 from deep in the runtime, or (negative) silently wrong logits
        ({"inputs": [tensor("input_ids", [[101, 99999999, 102]])]}, "0..30521"),
        ({"inputs": [tensor("input_ids", [[101, -5, 102]])]}, "0..30521"),
        ({"inputs": [tensor("input_ids", [[101, 102]]), tensor("token_type_ids", [[0, 7]])]}, "token_type_ids"),
        # 1.7 was read as 1 and [true, false] as [1, 0]; a second input_ids silently replaced the first; [true, 3] dropped the
        # connection unanswered
        ({"inputs": [tensor("input_ids", [[101, 1.7, 102]])]}, "not a list of INT64 integers"),
        ({"inputs": [tensor("input_ids", [[True, False]])]}, "not a list of INT64 integers"),
        ({"inputs": [tensor("input_ids", [[101, 102]]), tensor("input_ids", [[101]])]}, "given twice"),
        ({"inputs": [{"name": "input_ids", "shape": [True, 2], "datatype": "INT64", "data": [1, 2]}]}, "shape"),
    ]
    for body, text in cases:
        status, out = call(infer, "POST", body)
        assert status == 400 and text in out["error"], (body, out)
    assert call(f"{url}/v2/models/other/infer", "POST", {"inputs": [tensor("input_ids", [[1]])]})[0] == 404
    assert call(infer, "POST", {"inputs": [tensor("input_ids", [[101, 102]])]})[0] == 200


def test_bad_content_length_and_chunked_bodies_are_answered(server):
    """A Content-Length of -1 or `abc` closed the connection unanswered, with a traceback on the server."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(server["url"])
    path = f"/v2/models/{server['name']}/infer"
    for headers, code, text in (({"Content-Length": "-1"}, 400, "Content-Length"),
                                ({"Content-Length": "abc"}, 400, "Content-Length"),
                                ({"Transfer-Encoding": "chunked"}, 411, "chunked")):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == code and text in json.loads(resp.read())["error"], headers
        conn.close()
    assert call(f"{server['url']}{path}", "POST", {"inputs": [tensor("input_ids", [[101, 102]])]})[0] == 200


def test_metrics_in_prometheus_format(server):
    url, name = server["url"], server["name"]
    call(f"{url}/v2/models/{name}/infer", "POST", {"inputs": [tensor("input_ids", [[101, 102]])]})
    status, text = call(f"{url}/metrics")
    assert status == 200
    lines = text.splitlines()
    assert "# TYPE mk_requests_total counter" in lines
    assert "# TYPE mk_inference_request_duration_seconds histogram" in lines
    ok = [l for l in lines if l.startswith('mk_requests_total{endpoint="infer",code="200"}')]
    assert ok and int(ok[0].split()[-1]) >= 1
    count = next(l for l in lines if l.startswith("mk_inference_request_duration_seconds_count"))
    inf = next(l for l in lines if 'le="+Inf"' in l)
    assert count.split()[-1] == inf.split()[-1] and int(count.split()[-1]) >= 1
    assert f'mk_model_ready{{model="{name}"}} 1' in lines


def test_http_bench_against_the_server(server, tiny_dataset, tmp_path):
    proc = run_mk("bench", "--url", server["url"], "--concurrency", "1,4", "--duration", "1",
                  "--data", str(tiny_dataset), "--json", "--plot", str(tmp_path / "http.png"), env=ENV)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["schema"] == "mk.bench/1" and r["mode"] == "http" and r["model"] == server["name"]
    assert [x["concurrency"] for x in r["results"]] == [1, 4]
    for x in r["results"]:
        assert x["ok"] > 5 and x["errors"] == 0 and x["error_rate"] == 0
        assert x["throughput_rps"] > 5 and 0 < x["latency_ms"]["p50"] <= x["latency_ms"]["p99"]
        assert x["duration_s"] < 1 + 10  # bounded: no request starts after the duration
        assert 0 <= x["accuracy"] <= 1  # the served predictions against the test labels
    assert "mk bench: " + server["url"] in proc.stderr and "req/s" in proc.stderr
    assert (tmp_path / "http.png").read_bytes()[:4] == b"\x89PNG"


def test_http_bench_past_the_servers_stated_limits_exit_2(server):
    # every request would be a 400: was "no request succeeded", exit 1, after the load test
    for args, text in ((["--seq-lens", "100000"], "--seq-lens 100000: longer than the served model's 128 positions"),
                       (["--batch-sizes", "1,5000"], "--batch-sizes 5000: over the server's limit of 1024")):
        proc = run_mk("bench", "--url", server["url"], "--concurrency", "1", "--iters", "2", *args, env=ENV)
        assert proc.returncode == 2 and f"error: {text}" in proc.stderr, proc.stderr
        assert "concurrency 1" not in proc.stderr and proc.stdout == ""


def test_url_that_does_not_answer_exits_1_quickly():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = run_mk("bench", "--url", f"http://127.0.0.1:{port}", "--wait", "1", env=ENV)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 20
    assert f"error: http://127.0.0.1:{port}: no answer after 1 s (connection refused)" in proc.stderr


def test_serve_bad_model_exit_2(tmp_path):
    proc = run_mk("serve", str(tmp_path / "nothing"), "--port", "0", env=ENV)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr



def test_serve_host_that_is_not_ours_exit_2(served_model):
    # was exit 1 with "choose another --port"
    proc = run_mk("serve", str(served_model), "--port", "0", "--host", "999.1.1.1", env=ENV)
    assert proc.returncode == 2 and "error: --host 999.1.1.1: not an address of this machine" in proc.stderr, \
        proc.stderr
    assert "--port" not in proc.stderr and "reachable from the network" not in proc.stderr


def test_a_model_without_classification_head_is_not_served(tmp_path, minilm_dir):
    # the bare MiniLM answered with the logits of a randomly initialised 2-label head
    proc = run_mk("serve", str(minilm_dir), "--port", "0", env=ENV)
    assert proc.returncode == 2 and "feature-extraction model has no classification head" in proc.stderr, \
        proc.stderr
    assert proc.stdout == "" and "loading" not in proc.stderr


def test_serve_bad_device_exit_2_before_listening(served_model):
    # was "this onnxruntime has no CUDA provider", after the server had started
    proc = run_mk("serve", str(served_model), "--port", "0", "--device", "tpu", env=ENV)
    assert proc.returncode == 2 and "--device 'tpu': expected auto, cpu, cuda or cuda:N" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr and proc.stdout == ""


def test_sigterm_stops_the_server_cleanly(served_model):
    mk = Path(sys.executable).with_name("mk")
    proc = subprocess.Popen([str(mk), "serve", str(served_model), "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert call(f"{url}/v2/health/ready")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/v2/health/live", timeout=2)
