"""`mk serve` as a real subprocess on a free loopback port, spoken to over HTTP
(KServe v2 with texts and token ids, TEI's /predict), under concurrency, overload,
fuzzing and SIGTERM, and `mk bench --url` load-testing it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import LABELS, make_tiny_model, mk_cli, run_mk
from test_bench import ENV, export_onnx, model_artifact

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_model, tiny_dataset):
    root = tmp_path_factory.mktemp("serve")
    fp32 = model_artifact(tiny_model, root / "fp32", dataset=tiny_dataset)
    return export_onnx(fp32, root / "tiny-onnx", dataset=tiny_dataset)


def start(model: Path, *args: str, env: dict | None = None) -> tuple[str, subprocess.Popen]:
    """`mk serve MODEL --port 0 ARGS`: the URL it prints on stdout once ready, and the process."""
    mk = Path(sys.executable).with_name("mk")
    proc = subprocess.Popen([str(mk), "serve", str(model), "--port", "0", "--threads", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV, **(env or {})})
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=120)
    if not line or not line[0].startswith("http://"):
        proc.kill()
        pytest.fail(f"mk serve did not print its URL: {proc.communicate()[1]}")
    return line[0].strip(), proc


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.fixture(scope="module")
def server(served_model):
    url, proc = start(served_model)
    yield {"url": url, "proc": proc, "name": "tiny-onnx", "model": served_model}
    stop(proc)


def call(url: str, method: str = "GET", body=None, headers: dict | None = None) -> tuple[int, dict | str]:
    content = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    r = httpx.request(method, url, content=content, headers=headers, timeout=30)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def tensor(name: str, rows: list[list[int]], datatype: str = "INT64") -> dict:
    return {"name": name, "shape": [len(rows), len(rows[0])], "datatype": datatype,
            "data": [v for r in rows for v in r]}


def texts_tensor(name: str, texts: list[str]) -> dict:
    return {"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts}


def in_process(model: Path, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
    """The logits of the same artifact through the runtime interface, tokenized in-process."""
    from transformers import AutoTokenizer

    from mk.core.runtime import load_runtime

    tok = AutoTokenizer.from_pretrained(str(model))
    enc = tok(texts, pairs, padding=True, truncation=True, max_length=128, return_tensors="np")
    return load_runtime(model, device="cpu", threads=1)(dict(enc))


def outputs_of(answer: dict) -> dict:
    return {o["name"]: o for o in answer["outputs"]}


def test_health_and_metadata(server):
    url, name = server["url"], server["name"]
    assert call(f"{url}/v2/health/live") == (200, {"live": True})
    assert call(f"{url}/v2/health/ready") == (200, {"ready": True})
    assert call(f"{url}/v2/models/{name}/ready") == (200, {"ready": True})
    for route in ("/v2/health/live", "/v2/health/ready", "/health", f"/v2/models/{name}/ready"):
        head = httpx.head(url + route)  # load balancers and probes check health by HEAD too (was 405)
        assert head.status_code == 200 and head.content == b"", route
    status, meta = call(f"{url}/v2/models/{name}")
    assert status == 200 and meta["name"] == name and meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]][:3] == ["text", "text_pair", "input_ids"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 3], "optional": False} in meta["outputs"]
    params = meta["parameters"]
    assert params["labels"] == LABELS and params["vocab_size"] == 30522 and params["max_sequence_length"] == 128
    status, srv = call(f"{url}/v2")
    assert status == 200 and srv["models"] == [name]
    assert call(f"{url}/v2/models/other")[0] == 404
    status, schema = call(f"{url}/openapi.json")
    assert status == 200 and "/v2/models/{name}/infer" in schema["paths"] and "/predict" in schema["paths"]
    status, error = call(f"{url}/v1/chat/completions", "POST", {"model": name, "messages": []})
    assert status == 404 and "text classifier" in error["error"]["message"]  # the OpenAI routes: causal LMs


def test_texts_are_classified_as_in_process(server, tweets_rows):
    url, name = server["url"], server["name"]
    texts = [t for t, _ in tweets_rows[:7]]
    status, out = call(f"{url}/v2/models/{name}/infer", "POST", {"id": "t1", "inputs": [texts_tensor("text", texts)]})
    assert status == 200, out
    o = outputs_of(out)
    logits = np.array(o["logits"]["data"]).reshape(o["logits"]["shape"])
    expected = in_process(server["model"], texts)
    assert logits.shape == (7, 3) and np.allclose(logits, expected, atol=1e-4)
    assert o["label"]["data"] == [LABELS[i] for i in expected.argmax(-1)] and out["id"] == "t1"
    e = np.exp(expected - expected.max(-1, keepdims=True))
    assert np.allclose(o["score"]["data"], (e / e.sum(-1, keepdims=True)).max(-1), atol=1e-5)

    pairs = [t for t, _ in tweets_rows[10:17]]
    status, out = call(f"{url}/v2/models/{name}/infer", "POST",
                       {"inputs": [texts_tensor("text", texts), texts_tensor("text_pair", pairs)]})
    got = np.array(outputs_of(out)["logits"]["data"]).reshape(7, 3)
    assert status == 200 and np.allclose(got, in_process(server["model"], texts, pairs), atol=1e-4)


def test_with_max_batch_size_1_a_dynamic_int8_answer_is_that_of_the_text_alone(served_model, tweets_rows, tmp_path):
    """The README's way to answers that do not move with their batch (dynamic int8 takes its
    activations' scales over the whole call): every one-text request is its own call."""
    int8 = tmp_path / "int8"
    run_mk("quant", str(served_model), "-o", str(int8), "--no-gate", env=ENV, check=True)
    url, proc = start(int8, "--max-batch-size", "1", "--threads", "2")
    texts = [t for t, _ in tweets_rows[:8]]

    def logits(text: str) -> list[float]:
        status, out = call(f"{url}/v2/models/int8/infer", "POST", {"inputs": [texts_tensor("text", [text])]})
        assert status == 200, out
        return outputs_of(out)["logits"]["data"]
    try:
        alone = [logits(t) for t in texts]
        with ThreadPoolExecutor(16) as pool:  # concurrent requests, which a larger batch size would join
            burst = list(pool.map(logits, texts * 6))
    finally:
        stop(proc)
    assert burst == alone * 6  # equal, not close


def test_tei_predict(server, tweets_rows):
    url = server["url"]
    text = tweets_rows[0][0]
    expected = in_process(server["model"], [text])[0]
    status, out = call(f"{url}/predict", "POST", {"inputs": text})
    assert status == 200 and [p["label"] for p in out] == [LABELS[i] for i in np.argsort(-expected)]
    assert abs(sum(p["score"] for p in out) - 1) < 1e-5
    status, out = call(f"{url}/predict", "POST", {"inputs": [text, [text, "a pair"]], "raw_scores": True})
    assert status == 200 and len(out) == 2 and abs(out[0][0]["score"] - expected.max()) < 1e-4
    paired = in_process(server["model"], [text], ["a pair"])[0]
    assert abs(out[1][0]["score"] - paired.max()) < 1e-4


def test_long_texts_are_truncated_and_said_so_or_refused(served_model, server):
    url, name = server["url"], server["name"]
    long = "self driving cars " * 100
    body = {"inputs": [texts_tensor("text", ["short", long])]}
    status, out = call(f"{url}/v2/models/{name}/infer", "POST", body)
    assert status == 200 and out["parameters"] == {"truncated": [1]}
    status, out = call(f"{url}/v2/models/{name}/infer", "POST", {**body, "parameters": {"truncate": False}})
    assert status == 413 and "longer than the model's 128 tokens" in out["error"]
    assert call(f"{url}/predict", "POST", {"inputs": long, "truncate": False})[0] == 413


@pytest.mark.parametrize("datatype", ["INT64", "INT32"])
def test_token_ids_are_classified_as_in_process(server, datatype):
    url, name = server["url"], server["name"]
    ids = [[101, 7592, 2088, 102, 0], [101, 2054, 1037, 2204, 102]]
    mask = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    body = {"id": "r1", "inputs": [tensor("input_ids", ids, datatype), tensor("attention_mask", mask, datatype)]}
    status, out = call(f"{url}/v2/models/{name}/infer", "POST", body)
    assert status == 200, out
    logits = outputs_of(out)["logits"]
    from mk.core.runtime import load_runtime

    expected = load_runtime(server["model"], device="cpu", threads=1)(
        {"input_ids": np.array(ids), "attention_mask": np.array(mask)})
    assert np.allclose(np.array(logits["data"]).reshape(2, 3), expected, atol=1e-5)
    body["outputs"] = [{"name": "label"}]
    status, out = call(f"{url}/v2/models/{name}/infer", "POST", body)
    assert status == 200 and [o["name"] for o in out["outputs"]] == ["label"]


def test_nested_data_is_taken_as_the_protocol_allows(server):
    """The Open Inference Protocol allows a tensor's data flat or nested as its shape is;
    nested data was a 422. Nested rows that are not the shape are refused, never guessed."""
    url, name = server["url"], server["name"]
    infer = f"{url}/v2/models/{name}/infer"
    ids = [[101, 7592, 2088, 102], [101, 2054, 1037, 102]]
    flat = call(infer, "POST", {"inputs": [tensor("input_ids", ids)]})
    nested = call(infer, "POST", {"inputs": [{**tensor("input_ids", ids), "data": ids}]})
    assert flat[0] == nested[0] == 200 and outputs_of(nested[1])["logits"] == outputs_of(flat[1])["logits"]
    texts = {"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["good movie"], ["bad film"]]}
    status, out = call(infer, "POST", {"inputs": [texts]})
    assert status == 200 and outputs_of(out)["label"]["data"] == \
        outputs_of(call(infer, "POST", {"inputs": [texts_tensor("text", ["good movie", "bad film"])]})[1])["label"]["data"]
    for data, shape in (([[101, 102], [101]], [2, 2]),            # ragged rows
                        ([[101], [102], [103]], [1, 3]),          # the right count, not the shape
                        ([[101, 102]], [2])):                     # nested for a shape of one dimension
        status, out = call(infer, "POST", {"inputs": [{"name": "input_ids", "shape": shape, "datatype": "INT64",
                                                       "data": data}]})
        assert status == 422 and "inputs.0: Value error, nested data" in out["error"], (data, out)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    url, name = server["url"], server["name"]
    infer = f"{url}/v2/models/{name}/infer"
    cases = [
        (b"{not json", 400, "not JSON"),
        # 5,000 levels of nesting around valid data was a 500 RecursionError
        (b'{"inputs": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}", 400, "not JSON (recursion limit"),
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": [tensor("input_ids", [[1, 2]], "FP32")]}, 422, "datatype"),
        ({"inputs": [{"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [1, 2]}]}, 400, "2 values"),
        ({"inputs": [tensor("pixels", [[1, 2]])]}, 400, "unknown input"),
        ({"inputs": [tensor("input_ids", [[1] * 200])]}, 400, "positions"),
        ({"inputs": [tensor("attention_mask", [[1, 1]])]}, 400, "input_ids"),
        ({"inputs": [tensor("input_ids", [[101, 99999999, 102]])]}, 400, "0..30521"),
        ({"inputs": [tensor("input_ids", [[101, -5, 102]])]}, 400, "0..30521"),
        ({"inputs": [tensor("input_ids", [[101, 102]]), tensor("token_type_ids", [[0, 7]])]}, 400, "token_type_ids"),
        # the refusal named the union's first branch: "inputs.0.data.list[str].0: Input should be a valid string"
        ({"inputs": [tensor("input_ids", [[101, 1.7, 102]])]}, 422,
         "inputs.0.data: Input should be a list of strings (BYTES) or of whole numbers (INT types)"),
        # a value its datatype cannot hold was taken as an id (300 as UINT8)
        ({"inputs": [tensor("input_ids", [[101, 300, 102]], "UINT8")]}, 400, "out of the UINT8 range 0..255"),
        ({"inputs": [tensor("input_ids", [[101, -1, 102]], "UINT16")]}, 400, "out of the UINT16 range"),
        ({"inputs": [tensor("input_ids", [[True, False]])]}, 422, "data"),
        ({"inputs": [tensor("input_ids", [[101, 102]]), tensor("input_ids", [[101]])]}, 400, "given twice"),
        ({"inputs": [{"name": "input_ids", "shape": [True, 2], "datatype": "INT64", "data": [1, 2]}]}, 422, "shape"),
        ({"inputs": [texts_tensor("text", [])]}, 400, "0 strings"),
        ({"inputs": [texts_tensor("text", ["a", "b"]), texts_tensor("text_pair", ["c"])]}, 400, "text_pair"),
        ({"inputs": [texts_tensor("text", ["a"]), tensor("input_ids", [[101]])]}, 400, "not both"),
        ({"inputs": [texts_tensor("text", ["a"])], "outputs": [{"name": "nope"}]}, 400, "unknown outputs"),
    ]
    for body, code, text in cases:
        status, out = call(infer, "POST", body)
        assert status == code and text in out["error"], (str(body)[:200], status, out)
    assert call(f"{url}/predict", "POST", {"inputs": [["a", "b", "c"]]})[0] == 400
    assert call(f"{url}/predict", "POST", {"inputs": None}) == (
        422, {"error": "inputs: Input should be a text, a list of texts, or a list of [text, pair] lists"})
    assert call(f"{url}/v2/models/other/infer", "POST", {"inputs": [tensor("input_ids", [[1]])]})[0] == 404
    assert call(infer, "POST", {"inputs": [tensor("input_ids", [[101, 102]])]})[0] == 200
    # a UTF-8 byte order mark before the JSON (PowerShell's Invoke-RestMethod sends one) is not an error
    bom = b"\xef\xbb\xbf" + json.dumps({"inputs": [tensor("input_ids", [[101, 102]])]}).encode()
    assert call(infer, "POST", bom)[0] == 200


def test_requests_over_the_limits_get_413_with_the_limit(server):
    url, name = server["url"], server["name"]
    infer = f"{url}/v2/models/{name}/infer"
    # 1,024 x 512 tokens was accepted (13 GB of attention on the real model)
    big = {"inputs": [{"name": "input_ids", "shape": [64, 512], "datatype": "INT64", "data": [101] * (64 * 512)}]}
    status, out = call(infer, "POST", big)
    assert status == 413 and "at most 16384" in out["error"], out
    status, out = call(infer, "POST", {"inputs": [texts_tensor("text", ["a"] * 300)]})
    assert status == 413 and "at most 256" in out["error"]
    status, out = call(infer, "POST", b'{"inputs": "' + b"x" * (9 << 20) + b'"}')
    assert status == 413 and "body over this server's limit" in out["error"]


def _load(url: str, name: str, texts: list[str], clients: int, per_client: int) -> list[int]:
    def one(i):
        codes = []
        with httpx.Client(timeout=60) as c:
            for j in range(per_client):
                body = {"inputs": [texts_tensor("text", [texts[(i * per_client + j) % len(texts)]])]}
                codes.append(c.post(f"{url}/v2/models/{name}/infer", json=body).status_code)
        return codes
    with ThreadPoolExecutor(clients) as pool:
        return [c for codes in pool.map(one, range(clients)) for c in codes]


def _metric(text: str, name: str) -> float:
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


def test_concurrent_requests_are_batched(server, tweets_rows):
    url, name = server["url"], server["name"]
    _, before = call(f"{url}/metrics")
    codes = _load(url, name, [t for t, _ in tweets_rows[:64]], clients=16, per_client=8)
    assert codes == [200] * 128
    _, text = call(f"{url}/metrics")
    calls = _metric(text, "mk_batch_size_count") - _metric(before, "mk_batch_size_count")
    rows = _metric(text, "mk_batch_size_sum") - _metric(before, "mk_batch_size_sum")
    assert rows == 128 and calls < rows, (calls, rows)  # some batches held more than one request
    assert "# TYPE mk_queue_depth gauge" in text and "# TYPE mk_batch_size histogram" in text
    assert 'mk_requests_total{code="200",route="/v2/models/{name}/infer"}' in text
    assert f'mk_model_ready{{model="{name}"}} 1.0' in text
    assert _metric(text, "mk_tokens_total") > 128


def test_overload_gives_503_and_the_server_recovers(tmp_path, minilm_dir, tweets_rows):
    # a queue of 64 inputs, one request's worth: while one batch runs and one request waits, the
    # others are refused. The model is MiniLM-sized (random weights) so that a batch of 64 takes
    # long enough for requests to pile up; a tiny model is served faster than they arrive.
    model = make_tiny_model(tmp_path / "tiny-onnx", minilm_dir, layers=6, hidden=384)
    url, proc = start(model, "--max-queue", "64", "--max-batch-size", "64", "--max-wait-ms", "0")
    try:
        body = {"inputs": [texts_tensor("text", [" ".join(t for t, _ in tweets_rows[i:i + 6]) for i in range(64)])]}

        async def burst(n: int):
            # all at once from one event loop: threads of a 2-core client take turns with the GIL and
            # may send too slowly to ever fill the queue
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as c:
                return await asyncio.gather(*(c.post(f"{url}/v2/models/tiny-onnx/infer", json=body)
                                              for _ in range(n)))
        answers = []
        for _ in range(3):  # a burst that came slower than the server answers is tried again
            answers += asyncio.run(burst(64))
            if {r.status_code for r in answers} >= {200, 503}:
                break
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
        refused = next(r for r in answers if r.status_code == 503)
        assert refused.headers["Retry-After"] == "1" and "overloaded" in refused.json()["error"]
        assert httpx.post(f"{url}/v2/models/tiny-onnx/infer", json=body, timeout=60).status_code == 200
        assert httpx.post(f"{url}/predict", json={"inputs": "x"}).status_code == 200
    finally:
        assert stop(proc)[0] == 0


def test_fuzzing_from_the_openapi_schema_never_gives_a_500(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json")
    failures, sent = [], []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def fuzz(case):
                r = case.call(base_url=server["url"], timeout=30)
                sent.append(r.status_code)
                if r.status_code >= 500:
                    failures.append((op.label, r.status_code, r.text[:200]))
            try:
                fuzz()
            except Unsatisfiable:  # nothing in GET /v2 (say) can be made invalid
                assert mode == GenerationMode.NEGATIVE
    assert not failures, failures[:5]
    assert len(sent) > 100 and {422, 200} <= set(sent)
    assert call(f"{server['url']}/v2/health/ready")[0] == 200


def test_a_signal_while_the_model_loads_stops_it_before_it_serves(served_model):
    """SIGTERM (a supervisor) during the load exits 130 and never serves: it was swallowed,
    and the server came up after it anyway."""
    mk = Path(sys.executable).with_name("mk")
    proc = subprocess.Popen([str(mk), "serve", str(served_model), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    assert proc.stderr.readline().startswith("loading")  # said once the signal would stop the load
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # the old server never stopped
    # not served: exit 130; (on a machine slow to deliver the signal it may have come up first: then 0)
    assert (proc.returncode, out) == (130, "") or (proc.returncode == 0 and out.startswith("http")), err
    assert "Traceback" not in err


def test_sigterm_during_load_answers_every_accepted_request(served_model, tweets_rows):
    url, proc = start(served_model, "--max-wait-ms", "5")
    texts = [t for t, _ in tweets_rows[:64]]
    codes, failures, stop_at = [], [], [False]

    def client(i):
        with httpx.Client(timeout=60) as c:
            while not stop_at[0]:
                try:
                    r = c.post(f"{url}/v2/models/tiny-onnx/infer",
                               json={"inputs": [texts_tensor("text", texts[i:i + 4])]})
                except httpx.TransportError as e:  # refused or closed before the request was taken
                    failures.append(type(e).__name__)
                    return
                codes.append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    code, err = stop(proc)
    stop_at[0] = True
    for t in threads:
        t.join(timeout=30)
    assert code == 0, err
    assert codes and set(codes) == {200}, set(codes)
    accepted = int(re.search(r"stopped; (\d+) inference requests were accepted and answered", err).group(1))
    assert accepted == len(codes), (accepted, len(codes), failures)
    assert "Traceback" not in err


def test_a_body_that_never_arrives_is_not_waited_for_past_the_deadline(served_model):
    """A client that sends its headers and never its body was held forever (uvicorn has no body timeout)."""
    url, proc = start(served_model, "--timeout", "1")
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v2/models/tiny-onnx/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            t0 = time.monotonic()
            chunks = []  # the answer, headers and body perhaps in two segments, until the server closes
            while chunk := s.recv(4096):
                chunks.append(chunk)
            answer = b"".join(chunks).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer, answer
        assert time.monotonic() - t0 < 5
        body = {"inputs": [texts_tensor("text", ["still serving"])]}
        assert call(f"{url}/v2/models/tiny-onnx/infer", "POST", body)[0] == 200
    finally:
        code, _ = stop(proc)
    assert code == 0


def test_the_key_is_enforced_off_loopback(served_model):
    proc = mk_cli("serve", str(served_model), "--port", "0", "--host", "0.0.0.0", env=ENV)
    assert proc.returncode == 2 and "error: --host 0.0.0.0: reachable from the network, and no API key" \
        in proc.stderr and "--insecure" in proc.stderr, proc.stderr
    # bound to every interface, spoken to on loopback only
    url, p = start(served_model, "--host", "0.0.0.0", env={"MK_API_KEY": KEY})
    try:
        loop = url.replace("0.0.0.0", "127.0.0.1")
        infer = f"{loop}/v2/models/tiny-onnx/infer"
        body = {"inputs": [texts_tensor("text", ["hello"])]}
        assert call(infer, "POST", body)[0] == 401
        assert call(infer, "POST", body, {"Authorization": "Bearer wrong-key-123"})[0] == 401
        assert call(infer, "POST", body, {"Authorization": f"Bearer {KEY}"})[0] == 200
        assert call(f"{loop}/predict", "POST", {"inputs": "x"})[0] == 401
        assert call(f"{loop}/openapi.json")[0] == 401
        for open_route in ("/v2/health/ready", "/v2/health/live", "/metrics"):
            assert call(f"{loop}{open_route}")[0] == 200
            # a probe configured with a trailing slash is redirected, not refused (it was a 401)
            assert httpx.get(f"{loop}{open_route}/", follow_redirects=True, timeout=30).status_code == 200
        bench = run_mk("bench", "--url", loop, "--concurrency", "1", "--iters", "3", "--seq-lens", "16",
                       env={**ENV, "MK_API_KEY": KEY})
        assert bench.returncode == 0, bench.stderr
        for key, text, hint in ((None, "the server wants an API key (HTTP 401)", "pass --api-key KEY"),
                                ("wrong-key-123", "the server refused the API key given (HTTP 401)", "check --api-key")):
            bench = mk_cli("bench", "--url", loop, "--iters", "1", *(["--api-key", key] if key else []),
                           env={**ENV, "MK_API_KEY": None})
            assert bench.returncode == 2 and f"error: {loop}: {text}" in bench.stderr, bench.stderr
            assert f"hint: {hint}" in bench.stderr
    finally:
        code, err = stop(p)
    assert code == 0 and KEY not in err


def test_a_key_no_http_client_can_send_is_refused_at_once(served_model):
    """A key beyond ASCII was served, and `mk bench --url` then crashed sending it (UnicodeEncodeError):
    httpx, aiohttp and the openai library send header values as ASCII."""
    proc = mk_cli("bench", "--url", "http://127.0.0.1:1", "--api-key", "pässwörd-key", "--wait", "0", env=ENV)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --api-key: printable ASCII characters only (it is sent in an HTTP header)"), proc.stderr
    proc = run_mk("serve", str(served_model), "--port", "0", "--api-key", "pässwörd-key", env=ENV, timeout=60)
    assert proc.returncode == 2 and "error: --api-key: use at least 8 printable ASCII characters" in proc.stderr


def test_http_bench_sends_test_texts(server, tiny_dataset, tmp_path):
    proc = run_mk("bench", "--url", server["url"], "--concurrency", "1,4", "--duration", "1",
                  "--data", str(tiny_dataset), "--json", "--plot", str(tmp_path / "http.png"), env=ENV)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["schema"] == "mk.bench/1" and r["mode"] == "http" and r["model"] == server["name"]
    assert r["settings"]["inputs"] == "text"
    assert [x["concurrency"] for x in r["results"]] == [1, 4]
    for x in r["results"]:
        assert x["ok"] > 5 and x["errors"] == 0 and x["error_rate"] == 0
        assert x["throughput_rps"] > 5 and 0 < x["latency_ms"]["p50"] <= x["latency_ms"]["p99"]
        assert x["duration_s"] < 1 + 10
        assert 0 <= x["accuracy"] <= 1
    assert "mk bench: " + server["url"] in proc.stderr and "req/s" in proc.stderr
    assert (tmp_path / "http.png").read_bytes()[:4] == b"\x89PNG"


def test_http_bench_synthetic_ids_stay_in_the_vocabulary():
    from mk.core.measurement.http_bench import request_bodies

    meta = {"inputs": [{"name": "input_ids"}], "parameters": {"vocab_size": 300}}
    bodies, _ = request_bodies(meta, 4, None, None, 16, seed=0)
    ids = json.loads(bodies[0])["inputs"][0]["data"]
    assert len(ids) == 64 and 0 <= min(ids) and max(ids) < 300


def test_http_bench_past_the_servers_stated_limits_exit_2(server):
    for args, text in ((["--seq-lens", "100000"], "--seq-lens 100000: longer than the served model's 128 positions"),
                       (["--batch-sizes", "1,5000"], "--batch-sizes 5000: over the server's limit of 256"),
                       # each within its limit, together over --max-tokens: every request was a 413, then exit 1
                       (["--batch-sizes", "200", "--seq-lens", "100"],
                        "--batch-sizes 200 × --seq-lens 100 = 20000 tokens per request: over the server's limit "
                        "of 16384")):
        proc = mk_cli("bench", "--url", server["url"], "--concurrency", "1", "--iters", "2", *args, env=ENV)
        assert proc.returncode == 2 and f"error: {text}" in proc.stderr, proc.stderr
        assert "concurrency 1" not in proc.stderr and proc.stdout == ""


def test_url_that_does_not_answer_exits_1_quickly():
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = mk_cli("bench", "--url", f"http://127.0.0.1:{port}", "--wait", "1", env=ENV)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 20
    assert f"error: http://127.0.0.1:{port}: no answer after 1 s (connection refused)" in proc.stderr


def test_a_malformed_url_exits_2():
    proc = mk_cli("bench", "--url", "http://[::1", "--duration", "1", env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert "error: --url http://[::1: not a valid URL (" in proc.stderr and "unexpected" not in proc.stderr


@contextlib.contextmanager
def other_http_server(handler, tmp_path):
    """A plain stdlib HTTP server (as `python3 -m http.server`) on a free loopback port: its URL."""
    class Quiet(handler):
        def log_message(self, *args):
            """No access log on the test's stderr."""

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class NotReady(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.send_error(503)


def test_a_server_that_answers_but_not_in_v2_exits_2_at_once(server, tmp_path):
    with other_http_server(http.server.SimpleHTTPRequestHandler, tmp_path) as other:
        t0 = time.monotonic()
        proc = mk_cli("bench", "--url", other, "--wait", "60", "--duration", "1", env=ENV)
        assert proc.returncode == 2 and time.monotonic() - t0 < 20, proc.stderr
        assert (f"error: {other}: does not speak the KServe v2 protocol (HTTP 404 on /v2/health/ready); "
                "pass the server's base URL (http://host:port)") in proc.stderr
    # the model's own path after the server's URL: the base URL is named
    with_path = f"{server['url']}/v2/models/{server['name']}"
    proc = mk_cli("bench", "--url", with_path, "--wait", "60", "--duration", "1", env=ENV)
    assert proc.returncode == 2 and f"pass the server's base URL ({server['url']})" in proc.stderr, proc.stderr
    # a server not ready yet (503) is waited for, as is one not listening
    with other_http_server(NotReady, tmp_path) as other:
        proc = mk_cli("bench", "--url", other, "--wait", "1", "--duration", "1", env=ENV)
    assert proc.returncode == 1, proc.stderr
    assert f"error: {other}: no answer after 1 s (not ready (HTTP 503 from /v2/health/ready))" in proc.stderr


def test_serve_bad_model_exit_2(tmp_path):
    proc = mk_cli("serve", str(tmp_path / "nothing"), "--port", "0", env=ENV)
    assert proc.returncode == 2 and "no such file or directory" in proc.stderr


def test_an_ipv6_host_as_urls_write_it_is_that_address(served_model):
    """`--host [::1]` (the bracketed form URLs use) was refused as reachable from the network."""
    try:  # a machine without an IPv6 loopback (some containers) cannot serve on one at all
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    url, proc = start(served_model, "--host", "[::1]")
    try:
        assert url.startswith("http://[::1]:") and call(f"{url}/v2/health/ready")[0] == 200
    finally:
        code, err = stop(proc)
    assert code == 0 and "reachable from the network" not in err


def test_serve_host_that_is_not_ours_exit_2(served_model):
    proc = mk_cli("serve", str(served_model), "--port", "0", "--host", "999.1.1.1", "--insecure", env=ENV)
    assert proc.returncode == 2 and "error: --host 999.1.1.1: not an address of this machine" in proc.stderr, \
        proc.stderr


def test_a_model_name_that_would_not_be_found_is_refused(served_model):
    """`a/b` was served as `a_b`, and '' as the folder's name: a client configured with it got 404s."""
    for name in ("a/b", "", ".."):
        proc = mk_cli("serve", str(served_model), "--port", "0", "--model-name", name, env=ENV)
        assert proc.returncode == 2 and f"error: --model-name {name!r}" in proc.stderr, proc.stderr


def test_a_model_without_classification_head_is_not_served(minilm_dir):
    proc = mk_cli("serve", str(minilm_dir), "--port", "0", env=ENV)
    assert proc.returncode == 2 and "feature-extraction model has no classification head" in proc.stderr, \
        proc.stderr
    assert proc.stdout == "" and "loading" not in proc.stderr


def test_an_image_model_is_refused_at_start(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    from mk.core.artifact import write_manifest

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=2)
    ViTForImageClassification(config).save_pretrained(str(tmp_path / "vit"))
    write_manifest(tmp_path / "vit", kind="model", format="safetensors", task="image-classification",
                   labels=["cat", "dog"])
    proc = mk_cli("serve", str(tmp_path / "vit"), "--port", "0", env=ENV)
    assert proc.returncode == 2 and "an image classifier; mk serve takes text only" in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_serve_bad_device_exit_2_before_listening(served_model):
    proc = mk_cli("serve", str(served_model), "--port", "0", "--device", "tpu", env=ENV)
    assert proc.returncode == 2 and "--device 'tpu': expected auto, cpu, cuda or cuda:N" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr and proc.stdout == ""


def test_a_worker_takes_the_cost_of_a_call_its_parent_measured(served_model, monkeypatch, tmp_path):
    """The workers of --workers N warm up together on the same cores: they take the cost
    the parent timed alone instead of timing the calls again, contended."""
    from dataclasses import asdict

    from mk.core.serving import app, serve
    from mk.core.serving.batcher import CallCost

    def timed_again(*args, **kwargs):
        raise AssertionError("a worker timed the runtime's calls again")

    served = []
    monkeypatch.setattr(CallCost, "measure", timed_again)
    monkeypatch.setattr(app, "create_app", lambda model, *args: served.append(model))
    monkeypatch.setenv(serve._WORKER_ENV, json.dumps({
        "path": str(served_model), "ready_dir": str(tmp_path), "cost": {"fixed_s": 0.5, "per_token_s": 0.0},
        "options": asdict(serve.ServeOptions(name="tiny-onnx", threads=1)), "parent": os.getppid()}))
    serve.worker_app()
    served[0].batcher.stop()
    assert served[0].batcher.cost == CallCost(0.5, 0.0)


@pytest.mark.parametrize("threads, workers", [(2, 1), (1, 1), (None, 1), (None, 3)])
def test_onnx_on_a_cpu_runs_as_many_calls_at_once_as_it_has_threads(served_model, threads, workers):
    """Calls side by side get one thread each (a second, one-thread copy of the model);
    --workers share the cores out unless --threads says otherwise."""
    from mk.core.artifact import open_artifact
    from mk.core.device import default_threads
    from mk.core.serving import serve
    from mk.core.serving.batcher import CallCost

    parallel = threads or max(1, default_threads() // workers)  # this machine's cores, whatever they are
    opts = serve.ServeOptions(name="tiny-onnx", threads=threads, workers=workers)
    model = serve.load_model(open_artifact(served_model, kind="model"), opts, CallCost(0.001, 0.0))
    try:
        assert len(model.batcher.threads) == parallel and model.runtime.threads == parallel
        assert (model.batcher.narrow is not None) == (parallel > 1)
        assert parallel == 1 or model.batcher.narrow.threads == 1
    finally:
        model.batcher.stop()


def test_workers_each_answer_and_metrics_sum_over_them(served_model):
    url, proc = start(served_model, "--workers", "2")
    try:
        codes = _load(url, "tiny-onnx", ["good", "bad", "fine"], clients=4, per_client=5)
        assert codes == [200] * 20
        _, text = call(f"{url}/metrics")
        assert _metric(text, "mk_inference_samples_total") == 20
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_a_signal_while_the_workers_load_stops_it_before_it_serves(served_model):
    """SIGTERM once the workers were started, before they answered: they loaded on, then the URL was
    printed (after the signal) and mk serve exited 0, as if it had served."""
    import psutil

    mk = Path(sys.executable).with_name("mk")
    proc = subprocess.Popen([str(mk), "serve", str(served_model), "--port", "0", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    deadline = time.monotonic() + 60
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:  # the parent has loaded
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # a worker takes seconds to import its runtime before it loads
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (130, ""), err
    assert "serving" not in err and "Traceback" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers end with their parent through prctl")
def test_workers_end_when_their_parent_is_killed(served_model):
    """kill -9 (or the OOM killer) on the parent: its workers kept serving and held the port."""
    import psutil

    url, proc = start(served_model, "--workers", "2")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in
               " ".join(p.cmdline())]
    assert len(workers) >= 2
    proc.kill()
    proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v2/health/ready", timeout=5)
