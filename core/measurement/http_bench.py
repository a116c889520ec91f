"""`mk bench --url URL`: load-test a server that speaks the KServe v2 protocol.

Per concurrency level, that many workers each keep one keep-alive connection
and send requests back to back for `--duration` seconds (or until `--iters`
requests in all); achieved throughput, latency percentiles and the error rate
are reported. Only the host in URL is contacted, redirects are not followed,
and every wait is bounded: the readiness wait (`--wait`), each request
(`timeout`), and each level (duration + timeout).
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from mk.core.measurement.bench import SCHEMA, environment, percentiles, synthetic_batch
from mk.core.artifact import created_by
from mk.core.console import log, progress
from mk.core.errors import BadInput, MkError

MAX_REQUESTS = 1_000_000  # per level, when only --duration bounds it


@dataclass
class Target:
    scheme: str
    host: str
    port: int
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "Target":
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https"):
            raise BadInput(f"--url {url}: only http:// and https:// are supported")
        if not parts.hostname:
            raise BadInput(f"--url {url}: no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise BadInput(f"--url {url}: bad port") from None
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    def connection(self, timeout: float):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.prefix}"


class Client:
    """One keep-alive connection to the target; reconnects after a failure."""

    def __init__(self, target: Target, timeout: float):
        self.target, self.timeout = target, timeout
        self.conn = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            reused = self.conn is not None
            if self.conn is None:
                self.conn = self.target.connection(self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self.conn.request(method, self.target.prefix + path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt or not reused:  # a fresh connection failed: a real error
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _reason(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host ({e.strerror})"
    return f"{type(e).__name__}: {e}"


def wait_ready(target: Target, wait: float) -> None:
    """Poll /v2/health/ready until 200, for at most `wait` seconds; exit 1 after."""
    deadline = time.monotonic() + wait
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        client = Client(target, timeout=max(0.2, min(2.0, remaining)))
        try:
            status, _ = client.request("GET", "/v2/health/ready")
            if status == 200:
                return
            last = f"not ready (HTTP {status} from /v2/health/ready)"
        except (OSError, http.client.HTTPException) as e:
            last = _reason(e)
        finally:
            client.close()
        if time.monotonic() + 0.2 >= deadline:
            raise MkError(f"{target}: no answer after {wait:g} s ({last})",
                          hint="is the server running? start one with `mk serve MODEL --port N`; "
                               "--wait S waits longer")
        time.sleep(0.2)


def _get_json(client: Client, path: str) -> tuple[int, dict | None]:
    status, data = client.request("GET", path)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, None


def discover_model(target: Target, name: str | None, timeout: float) -> tuple[str, dict]:
    """The model's name (given, else from GET /v2 `models` or Triton's repository
    index) and its v2 metadata."""
    client = Client(target, timeout)
    try:
        if not name:
            status, meta = _get_json(client, "/v2")
            models = (meta or {}).get("models") if status == 200 else None
            if not models:
                st, index = client.request("POST", "/v2/repository/index", b"{}")
                try:
                    models = [m["name"] for m in json.loads(index) if m.get("state", "READY") == "READY"]
                except (ValueError, TypeError, KeyError):
                    models = None
            if not models:
                raise BadInput(f"{target}: the server does not say which models it serves",
                               hint="pass --model-name NAME")
            if len(models) > 1:
                log.info("the server serves %s; measuring %s (--model-name chooses)", ", ".join(models), models[0])
            name = models[0]
        status, meta = _get_json(client, f"/v2/models/{name}")
        if status != 200 or not isinstance(meta, dict):
            raise BadInput(f"{target}: no model {name!r} there (HTTP {status})", hint="check --model-name")
        return name, meta
    except (OSError, http.client.HTTPException) as e:
        raise MkError(f"{target}: {_reason(e)} while reading the model's metadata") from None
    finally:
        client.close()


def request_bodies(meta: dict, batch: int, data_split: dict | None, seq: int, seed: int,
                   limit: int = 256) -> tuple[list[bytes], list[np.ndarray | None]]:
    """Encoded v2 infer requests of real test rows (cycled) or synthetic tokens,
    and the labels each holds (for accuracy), in the datatypes the model declares."""
    declared = {i["name"]: i.get("datatype", "INT64") for i in meta.get("inputs", [])}
    if declared and "input_ids" not in declared:
        raise BadInput(f"the model takes inputs {sorted(declared)}; mk bench sends input_ids and attention_mask",
                       hint="this server's model is not a text classifier in the form mk serves")
    optional = {i["name"] for i in meta.get("inputs", []) if i.get("optional")}
    if data_split is not None:
        from mk.core.measurement.bench import data_batches

        n = len(data_split["labels"])
        batches = data_batches(data_split, batch, limit=min(limit, max(1, -(-n // batch))))
        labels = [data_split["labels"][(np.arange(i * batch, (i + 1) * batch) % n)] for i in range(len(batches))]
    else:
        batches, labels = [synthetic_batch(batch, seq, 2000, seed)], [None]
    # input_ids and attention_mask always; token_type_ids when the data has them, or as zeros where required
    tt_required = "token_type_ids" in declared and "token_type_ids" not in optional
    tt_have = "token_type_ids" in batches[0] and (not declared or "token_type_ids" in declared)
    send = ["input_ids", "attention_mask"] + (["token_type_ids"] if tt_required or tt_have else [])
    bodies = []
    for b in batches:
        inputs = []
        for k in send:
            arr = b[k] if k in b else np.zeros_like(b["input_ids"])
            dtype = declared.get(k, "INT64")
            if dtype not in ("INT64", "INT32"):
                dtype = "INT64"
            inputs.append({"name": k, "shape": list(arr.shape), "datatype": dtype,
                           "data": arr.astype(np.int64).reshape(-1).tolist()})
        bodies.append(json.dumps({"inputs": inputs}).encode())
    return bodies, labels


def _predicted(data: bytes) -> np.ndarray | None:
    try:
        outputs = json.loads(data)["outputs"]
    except (ValueError, KeyError, TypeError):
        return None
    for o in outputs:
        if o.get("name") == "label_id":
            return np.asarray(o["data"])
    for o in outputs:
        if o.get("datatype", "").startswith("FP") and len(o.get("shape", [])) == 2:
            return np.asarray(o["data"], dtype=np.float32).reshape(o["shape"]).argmax(axis=-1)
    return None


def run_level(target: Target, path: str, bodies: list[bytes], labels: list, concurrency: int,
              duration: float, max_requests: int, timeout: float) -> dict:
    counter = itertools.count()
    lock = threading.Lock()
    ok_lat: list[float] = []
    errors: list[str] = []
    correct = [0, 0]
    stop_at = time.perf_counter() + duration

    def worker():
        client = Client(target, timeout)
        try:
            while time.perf_counter() < stop_at:
                i = next(counter)
                if i >= max_requests:
                    break
                body = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    status, data = client.request("POST", path, body)
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        errors.append(_reason(e))
                    time.sleep(0.01)  # a refusing server is not hammered in a tight loop
                    continue
                t = time.perf_counter() - t0
                if status != 200:
                    try:
                        msg = json.loads(data).get("error", "")
                    except (ValueError, AttributeError):
                        msg = data[:200].decode(errors="replace")
                    with lock:
                        errors.append(f"HTTP {status}: {msg}")
                    continue
                y = labels[i % len(labels)]
                hit = None
                if y is not None and (pred := _predicted(data)) is not None and len(pred) == len(y):
                    hit = int((pred == y).sum())
                with lock:
                    ok_lat.append(t)
                    if hit is not None:
                        correct[0] += hit
                        correct[1] += len(y)
        finally:
            client.close()

    t_start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:  # bounded: no new request after stop_at, each at most `timeout`
        if stop_at == float("inf"):  # bounded by the request count instead
            t.join()
        else:
            t.join(timeout=max(0.0, stop_at - time.perf_counter()) + timeout + 5)
    elapsed = time.perf_counter() - t_start
    with lock:
        n_ok, n_err = len(ok_lat), len(errors)
        lat = list(ok_lat)
        first_error = errors[0] if errors else None
        acc = correct[0] / correct[1] if correct[1] else None
    total = n_ok + n_err
    return {"requests": total, "ok": n_ok, "errors": n_err,
            "error_rate": round(n_err / total, 4) if total else 1.0,
            "duration_s": round(elapsed, 3),
            "throughput_rps": round(n_ok / elapsed, 3) if elapsed else None,
            "latency_ms": percentiles(lat), "accuracy": None if acc is None else round(acc, 4),
            "first_error": first_error}


def run(url: str, concurrency: list[int], duration: float | None, iters: int | None,
        batch_sizes: list[int], seq: int, data=None, model: str | None = None, wait: float = 10.0,
        timeout: float = 30.0, seed: int = 0) -> dict:
    """Drive the server at each concurrency level; return the `mk.bench/1` result (mode http)."""
    target = Target.parse(url)
    duration = 10.0 if duration is None and iters is None else duration
    log.info("waiting for %s to be ready (at most %g s)", target, wait)
    wait_ready(target, wait)
    name, meta = discover_model(target, model, timeout)
    # limits the server states in its metadata (mk serve does): every request past them would be a 400
    params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
    max_seq, max_batch = params.get("max_sequence_length"), params.get("max_batch_size")
    if data is None and isinstance(max_seq, int) and seq > max_seq:
        raise BadInput(f"--seq-lens {seq}: longer than the served model's {max_seq} positions",
                       hint=f"use --seq-lens {max_seq} or less")
    if isinstance(max_batch, int) and max(batch_sizes) > max_batch:
        raise BadInput(f"--batch-sizes {max(batch_sizes)}: over the server's limit of {max_batch} per request")
    split, dataset_path, score = None, None, True
    if data is not None:
        from mk.core.dataset import load_split, open_dataset

        ds = open_dataset(data)
        split, dataset_path = load_split(ds, "test"), str(ds.path)
        served = (meta.get("parameters") or {}).get("labels")
        if served and list(served) != list(ds.labels):
            log.warning("the served labels %s differ from the dataset's %s: accuracy not measured",
                        served, list(ds.labels))
            score = False
    path = f"/v2/models/{name}/infer"
    results, warnings = [], []
    levels = [(b, c) for b in batch_sizes for c in concurrency]
    with progress("load test", total=len(levels)) as bar:
        for b, c in levels:
            bodies, labels = request_bodies(meta, b, split, seq, seed)
            if not score:
                labels = [None] * len(labels)
            log.info("concurrency %d, batch %d: %s", c, b,
                     f"{duration:g} s" if duration is not None else f"{iters} requests")
            # Warm-up: a few requests outside the clock.
            warm = Client(target, timeout)
            try:
                for body in bodies[:2]:
                    warm.request("POST", path, body)
            except (OSError, http.client.HTTPException):
                pass  # a server that fails here fails in the measured run too, where errors are counted
            finally:
                warm.close()
            r = run_level(target, path, bodies, labels, c, duration if duration is not None else float("inf"),
                          iters or MAX_REQUESTS, timeout)
            r = {"concurrency": c, "batch_size": b, **r,
                 "throughput_samples_s": round(r["throughput_rps"] * b, 3) if r["throughput_rps"] else 0.0}
            if r["errors"]:
                warnings.append(f"concurrency {c}, batch {b}: {r['errors']} of {r['requests']} requests failed "
                                f"(first: {r['first_error']})")
            results.append(r)
            bar.advance(1)
    if not any(r["ok"] for r in results):
        raise MkError(f"{target}: no request succeeded; first error: "
                      f"{next((r['first_error'] for r in results if r['first_error']), 'none')}")
    return {
        "schema": SCHEMA, "mode": "http", "created": created_by(), "url": str(target), "model": name,
        "model_metadata": meta,
        "settings": {"concurrency": concurrency, "batch_sizes": batch_sizes, "duration_s": duration,
                     "iters": iters, "seq_len": "data" if split is not None else seq, "data": dataset_path,
                     "wait_s": wait, "timeout_s": timeout},
        "environment": {**environment(None, None), "role": "client"},
        "results": results, "warnings": warnings,
    }
