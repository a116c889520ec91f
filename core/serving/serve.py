"""`mk serve`: a small, real KServe v2 (Open Inference Protocol) server over the
same runtime interface `mk bench` measures.

Endpoints (JSON over HTTP/1.1 with keep-alive, one thread per connection):

    GET  /v2                          server metadata (with the served model's name)
    GET  /v2/health/live              200 while the process runs
    GET  /v2/health/ready             200 once the model is loaded, 503 before
    GET  /v2/models/{name}            model metadata: inputs, outputs, platform
    GET  /v2/models/{name}/ready      200 once loaded
    POST /v2/models/{name}/infer      INT64/INT32 `input_ids` [+ `attention_mask`,
                                      `token_type_ids`] of shape [batch, seq] →
                                      `logits` FP32 [batch, labels], `label_id`
                                      INT64 [batch], `label` BYTES [batch]
    GET  /metrics                     Prometheus text: request counts, latency histogram

Inference is serialised by a lock: the runtime already uses every thread it was
given, and a second concurrent forward pass would only fight it for cores.
There is no dynamic batching.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from mk.core import __version__
from mk.core.artifact import Artifact
from mk.core.console import log
from mk.core.errors import BadInput, MkError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INT_TYPES = {"INT64": np.int64, "INT32": np.int32, "INT16": np.int16, "INT8": np.int8,
             "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32}
PLATFORMS = {"safetensors": "pytorch_torch", "onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_BODY = 64 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Metrics:
    """Counters and a latency histogram, rendered in Prometheus text format."""

    def __init__(self, model: str):
        self.model = model
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets = [0] * len(BUCKETS)
        self.count = 0
        self.sum = 0.0
        self.samples = 0

    def record(self, endpoint: str, status: int, seconds: float | None = None, samples: int = 0) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is not None:
                self.count += 1
                self.sum += seconds
                self.samples += samples
                for i, le in enumerate(BUCKETS):
                    if seconds <= le:
                        self.buckets[i] += 1

    def render(self, ready: bool) -> str:
        m = f'model="{self.model}"'
        with self.lock:
            lines = ["# HELP mk_requests_total HTTP requests handled, by endpoint and status code.",
                     "# TYPE mk_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'mk_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            lines += ["# HELP mk_inference_request_duration_seconds Time to answer a successful infer request.",
                      "# TYPE mk_inference_request_duration_seconds histogram"]
            for le, n in zip(BUCKETS, self.buckets):  # buckets are cumulative as counted
                lines.append(f'mk_inference_request_duration_seconds_bucket{{{m},le="{le}"}} {n}')
            lines += [f'mk_inference_request_duration_seconds_bucket{{{m},le="+Inf"}} {self.count}',
                      f"mk_inference_request_duration_seconds_sum{{{m}}} {self.sum:.6f}",
                      f"mk_inference_request_duration_seconds_count{{{m}}} {self.count}",
                      "# HELP mk_inference_samples_total Examples classified.",
                      "# TYPE mk_inference_samples_total counter",
                      f"mk_inference_samples_total{{{m}}} {self.samples}",
                      "# HELP mk_model_ready Whether the model is loaded and answering.",
                      "# TYPE mk_model_ready gauge",
                      f"mk_model_ready{{{m}}} {int(ready)}"]
        return "\n".join(lines) + "\n"


class ModelState:
    """The served model: its runtime (None while loading) and what it answers with."""

    def __init__(self, art: Artifact, name: str):
        self.art = art
        self.name = name
        self.labels = [str(l) for l in art.labels]
        self.runtime = None
        self.lock = threading.Lock()
        self.metrics = Metrics(name)
        self.max_batch = 1024
        self.max_seq = None
        self.vocab: dict[str, int] = {}  # input name -> number of ids its embedding table has
        cfg = art.config()
        if isinstance(cfg.get("max_position_embeddings"), int):
            self.max_seq = cfg["max_position_embeddings"]
        for name, key in (("input_ids", "vocab_size"), ("token_type_ids", "type_vocab_size")):
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                self.vocab[name] = cfg[key]

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    def metadata(self) -> dict:
        inputs = [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                  {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "optional": True},
                  {"name": "token_type_ids", "datatype": "INT64", "shape": [-1, -1], "optional": True}]
        k = len(self.labels) or -1
        outputs = [{"name": "logits", "datatype": "FP32", "shape": [-1, k]},
                   {"name": "label_id", "datatype": "INT64", "shape": [-1]}]
        if self.labels:
            outputs.append({"name": "label", "datatype": "BYTES", "shape": [-1]})
        return {"name": self.name, "versions": ["1"], "platform": PLATFORMS.get(self.art.format, self.art.format),
                "inputs": inputs, "outputs": outputs,
                "parameters": {"labels": self.labels, "format": self.art.format,
                               "runtime": getattr(self.runtime, "name", None),
                               "device": str(getattr(self.runtime, "device", None)),
                               "max_batch_size": self.max_batch, "max_sequence_length": self.max_seq}}

    def parse(self, body: dict) -> dict[str, np.ndarray]:
        """Validate a v2 infer request body and return the numpy batch."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
            raise HTTPError(400, "request needs an `inputs` list")
        batch: dict[str, np.ndarray] = {}
        for t in body["inputs"]:
            if not isinstance(t, dict):
                raise HTTPError(400, "each input must be an object with name, shape, datatype, data")
            name, dtype, shape, data = t.get("name"), t.get("datatype"), t.get("shape"), t.get("data")
            if name not in TEXT_INPUTS:
                raise HTTPError(400, f"unknown input {name!r}; this model takes {', '.join(TEXT_INPUTS)}")
            if dtype not in INT_TYPES:
                raise HTTPError(400, f"input {name}: datatype {dtype!r} not accepted; send INT64 or INT32")
            if name in batch:
                raise HTTPError(400, f"input {name} is given twice")
            if (not isinstance(shape, list) or len(shape) != 2
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
                raise HTTPError(400, f"input {name}: shape must be [batch, sequence], got {shape!r}")
            if data is None:
                raise HTTPError(400, f"input {name}: no `data` (binary tensors are not supported)")
            try:
                # 1.7 would become 1 and true 1: only whole JSON numbers are token ids
                whole = np.asarray(data).dtype.kind in "iu"
                arr = np.asarray(data, dtype=INT_TYPES[dtype])
            except (ValueError, TypeError, OverflowError):
                whole = False
            if not whole:
                raise HTTPError(400, f"input {name}: data is not a list of {dtype} integers")
            if arr.size != math.prod(shape):
                raise HTTPError(400, f"input {name}: {arr.size} values for shape {shape}")
            batch[name] = arr.reshape(shape).astype(np.int64, copy=False)
        if "input_ids" not in batch:
            raise HTTPError(400, "input `input_ids` is required")
        shape = batch["input_ids"].shape
        for k, v in batch.items():
            if v.shape != shape:
                raise HTTPError(400, f"input {k}: shape {list(v.shape)} differs from input_ids {list(shape)}")
        if shape[0] > self.max_batch:
            raise HTTPError(400, f"batch of {shape[0]} is over this server's limit of {self.max_batch}")
        if self.max_seq and shape[1] > self.max_seq:
            raise HTTPError(400, f"sequence of {shape[1]} tokens is over the model's {self.max_seq} positions")
        for k, n in self.vocab.items():
            # out-of-range ids fail deep in the runtime (a 500), and negative ones silently index from the end
            if k in batch and (batch[k].min() < 0 or batch[k].max() >= n):
                raise HTTPError(400, f"input {k}: ids must be in 0..{n - 1}, got {int(batch[k].min())}"
                                     f"..{int(batch[k].max())}")
        batch.setdefault("attention_mask", np.ones(shape, dtype=np.int64))
        return batch

    def infer(self, body: dict) -> dict:
        batch = self.parse(body)
        try:
            with self.lock:
                logits = self.runtime(batch)
        except BadInput as e:
            raise HTTPError(400, e.message) from None
        except Exception as e:  # noqa: BLE001 — the server keeps serving; the client gets a 500
            log.warning("inference failed: %s: %s", type(e).__name__, e)
            raise HTTPError(500, f"inference failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        logits = np.asarray(logits, dtype=np.float32)
        ids = logits.argmax(axis=-1).astype(np.int64)
        outputs = [{"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
                    "data": logits.reshape(-1).tolist()},
                   {"name": "label_id", "datatype": "INT64", "shape": [len(ids)], "data": ids.tolist()}]
        if self.labels:
            outputs.append({"name": "label", "datatype": "BYTES", "shape": [len(ids)],
                            "data": [self.labels[i] if i < len(self.labels) else str(i) for i in ids]})
        wanted = body.get("outputs")
        if isinstance(wanted, list) and wanted:
            names = {o.get("name") for o in wanted if isinstance(o, dict)}
            unknown = names - {o["name"] for o in outputs}
            if unknown:
                raise HTTPError(400, f"unknown outputs {sorted(unknown)}")
            outputs = [o for o in outputs if o["name"] in names]
        answer = {"model_name": self.name, "model_version": "1", "outputs": outputs}
        if "id" in body:
            answer["id"] = body["id"]
        return answer


def _handler(state: ModelState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"mk-serve/{__version__}"

        def setup(self):
            super().setup()
            # Answers go out in one write with Nagle off: a header packet held back
            # for a delayed ACK would add ~40 ms to every request.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, fmt, *args):  # access log only with -v
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, payload, content_type: str = "application/json") -> None:
            body = payload if isinstance(payload, bytes) else (
                payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            head = b"".join(self._headers_buffer) + b"\r\n"
            self._headers_buffer = []
            self.wfile.write(head if self.command == "HEAD" else head + body)

        def _route(self) -> tuple[str, str | None, str | None]:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/metrics":
                return "metrics", None, None
            if path in ("/v2", "/v2/health/live", "/v2/health/ready"):
                return {"/v2": "server", "/v2/health/live": "live", "/v2/health/ready": "ready"}[path], None, None
            m = re.fullmatch(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?", path)
            if m:
                return {None: "model", "/ready": "model_ready", "/infer": "infer"}[m.group(3)], m.group(1), m.group(2)
            return "unknown", None, None

        def _model(self, name: str | None, version: str | None) -> None:
            if name != state.name or version not in (None, "1"):
                raise HTTPError(404, f"no model {name!r}" + (f" version {version}" if version else "")
                                + f"; this server serves {state.name!r}")

        def do_GET(self):
            endpoint, name, version = self._route()
            status = 200
            try:
                if endpoint == "metrics":
                    self._send(200, state.metrics.render(state.ready), "text/plain; version=0.0.4; charset=utf-8")
                elif endpoint == "server":
                    self._send(200, {"name": "mk", "version": __version__, "extensions": [],
                                     "models": [state.name]})
                elif endpoint == "live":
                    self._send(200, {"live": True})
                elif endpoint in ("ready", "model_ready"):
                    if endpoint == "model_ready":
                        self._model(name, version)
                    status = 200 if state.ready else 503
                    self._send(status, {"ready": state.ready})
                elif endpoint == "model":
                    self._model(name, version)
                    self._send(200, state.metadata())
                elif endpoint == "infer":
                    raise HTTPError(405, "infer takes POST")
                else:
                    raise HTTPError(404, f"no such endpoint {self.path}")
            except HTTPError as e:
                status = e.status
                self._send(e.status, {"error": e.message})
            state.metrics.record(endpoint, status)

        do_HEAD = do_GET

        def do_POST(self):
            endpoint, name, version = self._route()
            t0 = time.perf_counter()
            status, samples = 200, 0
            try:
                if endpoint != "infer":
                    raise HTTPError(404 if endpoint == "unknown" else 405, f"POST is not accepted at {self.path}")
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    self.close_connection = True
                    raise HTTPError(411, "chunked request bodies are not supported; send a Content-Length")
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0:
                    self.close_connection = True
                    raise HTTPError(400, f"bad Content-Length {self.headers.get('Content-Length')!r}")
                if length > MAX_BODY:
                    self.close_connection = True
                    raise HTTPError(413, f"request of {length} bytes is over the limit of {MAX_BODY}")
                raw = self.rfile.read(length)
                self._model(name, version)
                if not state.ready:
                    raise HTTPError(503, "the model is still loading")
                if self.headers.get("Inference-Header-Content-Length"):
                    raise HTTPError(400, "binary tensor data is not supported; send JSON `data`")
                try:
                    body = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    raise HTTPError(400, f"request body is not JSON ({e})") from None
                answer = state.infer(body)
                samples = answer["outputs"][0]["shape"][0] if answer["outputs"] else 0
                self._send(200, answer)
            except HTTPError as e:
                status = e.status
                self._send(e.status, {"error": e.message})
            except Exception as e:  # noqa: BLE001 — a request never takes the connection down unanswered
                log.warning("request failed: %s: %s", type(e).__name__, e)
                status = 500
                self._send(500, {"error": f"internal error: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                 if str(e) else f"internal error: {type(e).__name__}"})
            elapsed = time.perf_counter() - t0
            state.metrics.record(endpoint, status, elapsed if status == 200 else None, samples)

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def model_name(given: str | None, ref) -> str:
    name = given or Path(str(ref)).name or "model"
    if not _NAME.match(name):
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    return name


def start(art: Artifact, name: str, host: str, port: int) -> tuple[Server, ModelState, threading.Thread]:
    """Bind and answer at once (ready = 503 until the model is loaded)."""
    if art.task not in ("text-classification", "image-classification"):
        # loaded for classification, it would answer with the logits of a randomly initialised head
        raise BadInput(f"{art.path}: a {art.task} model has no classification head to serve",
                       hint="fine-tune it first with `mk tune`")
    state = ModelState(art, name)
    try:
        server = Server((host, port), _handler(state))
    except OSError as e:
        import errno

        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:  # the host, not the port
            raise BadInput(f"--host {host}: not an address of this machine ({e.strerror or e})",
                           hint="use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
        raise MkError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                      hint="choose another --port (0 picks a free one)") from None
    thread = threading.Thread(target=server.serve_forever, name="mk-serve", daemon=True)
    thread.start()
    return server, state, thread


def load_into(state: ModelState, device: str, threads: int | None) -> None:
    """Load the model through the runtime interface and warm it up with one call."""
    from mk.core.runtime import load_runtime

    if state.art.format == "safetensors":
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        runtime = load_runtime(state.art, device=device, threads=threads)
        runtime({"input_ids": np.full((1, 8), 1000, dtype=np.int64),
                 "attention_mask": np.ones((1, 8), dtype=np.int64)})
    except MkError as e:
        if str(state.art.path) not in e.message:
            e.message = f"{state.art.path}: {e.message}"
        raise
    except Exception as e:  # noqa: BLE001
        raise BadInput(f"{state.art.path}: cannot be served ({type(e).__name__}: {str(e).splitlines()[0][:300]})") \
            from None
    state.runtime = runtime


def url_of(server: Server) -> str:
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
