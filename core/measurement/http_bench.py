"""`mk bench --url URL`: load-test a server that speaks the KServe v2 protocol.

Per concurrency level, that many clients (aiohttp, one event loop, keep-alive
connections) send requests back to back for `--duration` seconds (or until
`--iters` requests in all); achieved throughput, latency percentiles and the
error rate are reported. With `--data`, a server that takes text (`mk serve`
declares a BYTES `text` input) gets the test split's texts; otherwise token ids
of the test split, or synthetic ids drawn within the served model's vocabulary.
Only the host in URL is contacted, redirects are not followed, and every wait
is bounded: the readiness wait (`--wait`), each request (`timeout`), and each
level (duration + timeout).
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

import numpy as np

from mk.core.measurement.bench import SCHEMA, environment, percentiles, synthetic_batch
from mk.core.artifact import created_by
from mk.core.console import log, progress
from mk.core.errors import BadInput, MkError

MAX_REQUESTS = 1_000_000  # per level, when only --duration bounds it
FALLBACK_VOCAB = 1000     # ids drawn below this when the server does not state its vocabulary


def base_url(url: str) -> str:
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
    except ValueError as e:  # an unclosed IPv6 bracket, say
        raise BadInput(f"--url {url}: not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise BadInput(f"--url {url}: only http:// and https:// are supported")
    if not parts.hostname:
        raise BadInput(f"--url {url}: no host")
    try:
        parts.port
    except ValueError:
        raise BadInput(f"--url {url}: bad port") from None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def client(url: str, timeout: float, api_key: str | None, connections: int = 1):
    import httpx

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.Client(base_url=url, timeout=timeout, headers=headers, follow_redirects=False,
                        limits=httpx.Limits(max_connections=connections))


def _reason(e: BaseException) -> str:
    """One short reason for a failed request, from httpx (control calls) or aiohttp (the load)."""
    import aiohttp
    import httpx

    if isinstance(e, (httpx.ConnectError, aiohttp.ClientConnectorError)):
        refused = isinstance(getattr(e, "os_error", None), ConnectionRefusedError) or "refused" in str(e).lower()
        return "connection refused" if refused else f"cannot connect ({e})"
    if isinstance(e, (httpx.TimeoutException, TimeoutError)):
        return "timed out"
    return f"{type(e).__name__}: {e}"


def wait_ready(url: str, wait: float, api_key: str | None) -> None:
    """Poll /v2/health/ready until 200, for at most `wait` seconds; exit 1 after, exit 2 at once on a 404."""
    import httpx

    deadline = time.monotonic() + wait
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        with client(url, max(0.2, min(2.0, remaining)), api_key) as c:
            try:
                status = c.get("/v2/health/ready").status_code
                if status == 200:
                    return
                if status == 404:  # an answer, from something that is not a v2 server (or a path too many)
                    parts = urlsplit(url)
                    base = f"{parts.scheme}://{parts.netloc}" if parts.path else "http://host:port"
                    raise BadInput(f"{url}: does not speak the KServe v2 protocol (HTTP 404 on "
                                   f"/v2/health/ready); pass the server's base URL ({base})")
                last = f"not ready (HTTP {status} from /v2/health/ready)"
            except httpx.HTTPError as e:
                last = _reason(e)
        if time.monotonic() + 0.2 >= deadline:
            raise MkError(f"{url}: no answer after {wait:g} s ({last})",
                          hint="is the server running? start one with `mk serve MODEL --port N`; "
                               "--wait S waits longer")
        time.sleep(0.2)


def _get_json(c, path: str) -> tuple[int, dict | None]:
    r = c.get(path)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


def _generates(c, name: str) -> bool:
    """Whether the server lists `name` among its OpenAI-style models (GET /v1/models): a
    text-generation model, which `mk serve` lists in /v2 too but describes on /v1 only.
    Asked of the protocol rather than read from the 404's wording, which servers phrase freely."""
    status, listing = _get_json(c, "/v1/models")
    data = listing.get("data") if status == 200 and isinstance(listing, dict) else None
    return isinstance(data, list) and any(isinstance(m, dict) and m.get("id") == name for m in data)


def discover_model(url: str, name: str | None, timeout: float, api_key: str | None) -> tuple[str, dict]:
    """The model's name (given, else from GET /v2 `models` or Triton's repository
    index) and its v2 metadata."""
    import httpx

    with client(url, timeout, api_key) as c:
        try:
            status, meta = _get_json(c, "/v2")
            if status == 401 and api_key:
                raise BadInput(f"{url}: the server refused the API key given (HTTP 401)",
                               hint="check --api-key or MK_API_KEY (the flag wins)")
            if status == 401:
                raise BadInput(f"{url}: the server wants an API key (HTTP 401)",
                               hint="pass --api-key KEY or set MK_API_KEY")
            if not name:
                models = (meta or {}).get("models") if status == 200 else None
                if not models:
                    try:
                        index = c.post("/v2/repository/index", content=b"{}").json()
                        models = [m["name"] for m in index if m.get("state", "READY") == "READY"]
                    except (ValueError, TypeError, KeyError, AttributeError):
                        models = None
                if not models:
                    raise BadInput(f"{url}: the server does not say which models it serves",
                                   hint="pass --model-name NAME")
                if len(models) > 1:
                    log.info("the server serves %s; measuring %s (--model-name chooses)", ", ".join(models), models[0])
                name = models[0]
            status, meta = _get_json(c, f"/v2/models/{name}")
            if status == 404 and _generates(c, name):
                raise BadInput(f"{url}: {name!r} is a text-generation model (served on the OpenAI-compatible "
                               "/v1 routes); mk bench --url load-tests a classifier's KServe v2 routes",
                               hint="measure it in-process with `mk bench MODEL`")
        except httpx.HTTPError as e:
            raise MkError(f"{url}: {_reason(e)} while reading the model's metadata") from None
    if status != 200 or not isinstance(meta, dict):
        raise BadInput(f"{url}: no model {name!r} there (HTTP {status})", hint="check --model-name")
    return name, meta


def test_texts(dataset, split: dict) -> tuple[list[str], list[str] | None]:
    """The test split's texts, decoded from its token ids with the dataset's own
    tokenizer (a dataset artifact keeps ids, not the raw strings); pairs apart."""
    from mk.core.tokenizer_match import load_tokenizer

    tok = load_tokenizer(dataset.path)
    ids, mask = split["input_ids"], split["attention_mask"].astype(bool)
    types = split.get("token_type_ids")
    if types is None or not types[mask].any():
        return tok.batch_decode([r[m] for r, m in zip(ids, mask)], skip_special_tokens=True), None
    first = tok.batch_decode([r[m & (t == 0)] for r, m, t in zip(ids, mask, types)], skip_special_tokens=True)
    second = tok.batch_decode([r[m & (t == 1)] for r, m, t in zip(ids, mask, types)], skip_special_tokens=True)
    return first, second


def _tensor(name: str, arr) -> dict:
    if isinstance(arr, list):
        return {"name": name, "shape": [len(arr)], "datatype": "BYTES", "data": arr}
    return {"name": name, "shape": list(arr.shape), "datatype": "INT64", "data": arr.astype(np.int64).reshape(-1).tolist()}


def request_bodies(meta: dict, batch: int, data_split: dict | None, texts, seq: int, seed: int,
                   limit: int = 256) -> tuple[list[bytes], list[np.ndarray | None]]:
    """Encoded v2 infer requests of real test rows (texts when the server takes
    them, else token ids; cycled) or synthetic ids within the served vocabulary,
    and the labels each holds (for accuracy)."""
    declared = {i["name"] for i in meta.get("inputs", [])}
    if declared and "input_ids" not in declared and "text" not in declared:
        raise BadInput(f"the model takes inputs {sorted(declared)}; mk bench sends text or input_ids",
                       hint="this server's model is not a text classifier in the form mk serve serves")
    if data_split is None:
        vocab = (meta.get("parameters") or {}).get("vocab_size")
        if not isinstance(vocab, int) or vocab < 2:
            log.warning("the server does not state its vocabulary size: synthetic ids are drawn below %d",
                        FALLBACK_VOCAB)
            vocab = FALLBACK_VOCAB
        b = synthetic_batch(batch, seq, vocab, seed)
        return [json.dumps({"inputs": [_tensor(k, b[k]) for k in ("input_ids", "attention_mask")]}).encode()], [None]
    n = len(data_split["labels"])
    count = min(limit, max(1, -(-n // batch)))
    rows = [np.arange(i * batch, (i + 1) * batch) % n for i in range(count)]
    labels = [data_split["labels"][r] for r in rows]
    if texts is not None and "text" in declared:
        first, second = texts
        bodies = [{"inputs": [_tensor("text", [first[j] for j in r])]
                   + ([_tensor("text_pair", [second[j] for j in r])] if second is not None else [])} for r in rows]
    else:
        from mk.core.measurement.bench import data_batches

        bodies = [{"inputs": [_tensor(k, v) for k, v in b.items() if k in ("input_ids", "attention_mask",
                                                                            "token_type_ids")]}
                  for b in data_batches(data_split, batch, limit=count)]
    return [json.dumps(b).encode() for b in bodies], labels


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


def _error_text(status: int, data: bytes) -> str:
    try:
        msg = json.loads(data).get("error", "")
    except (ValueError, AttributeError):
        msg = data[:200].decode(errors="replace")
    return f"HTTP {status}: {msg}"


async def _level(url: str, path: str, bodies: list[bytes], labels: list, concurrency: int, duration: float,
                 max_requests: int, timeout: float, api_key: str | None) -> dict:
    # aiohttp sends the load rather than httpx: httpx's AsyncClient spends CPU per request that grows
    # with its connections (2.0 ms at 1, 6.5 ms at 32, 12.8 ms at 64 on a 2-core Xeon; encode/httpx#3215),
    # taken from the server it measures on the same machine; aiohttp's stays at 0.6 ms.
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    sent = [0]
    ok_lat: list[float] = []
    errors: list[str] = []
    correct = [0, 0]
    stop_at = time.perf_counter() + duration
    target = url + path

    async def worker(session):
        while time.perf_counter() < stop_at and sent[0] < max_requests:
            i = sent[0]
            sent[0] += 1
            t0 = time.perf_counter()
            try:
                async with session.post(target, data=bodies[i % len(bodies)], allow_redirects=False) as r:
                    status, content = r.status, await r.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                errors.append(_reason(e))
                await asyncio.sleep(0.01)  # a refusing server is not hammered in a tight loop
                continue
            t = time.perf_counter() - t0
            if status != 200:
                errors.append(_error_text(status, content))
                continue
            ok_lat.append(t)
            y = labels[i % len(labels)]
            if y is not None and (pred := _predicted(content)) is not None and len(pred) == len(y):
                correct[0] += int((pred == y).sum())
                correct[1] += len(y)

    t_start = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - t_start
    n_ok, n_err = len(ok_lat), len(errors)
    total = n_ok + n_err
    acc = correct[0] / correct[1] if correct[1] else None
    return {"requests": total, "ok": n_ok, "errors": n_err,
            "error_rate": round(n_err / total, 4) if total else 1.0,
            "duration_s": round(elapsed, 3),
            "throughput_rps": round(n_ok / elapsed, 3) if elapsed else None,
            "latency_ms": percentiles(ok_lat), "accuracy": None if acc is None else round(acc, 4),
            "first_error": errors[0] if errors else None}


def run_level(url: str, path: str, bodies: list[bytes], labels: list, concurrency: int, duration: float,
              max_requests: int, timeout: float, api_key: str | None = None) -> dict:
    return asyncio.run(_level(url, path, bodies, labels, concurrency, duration, max_requests, timeout, api_key))


def run(url: str, concurrency: list[int], duration: float | None, iters: int | None,
        batch_sizes: list[int], seq: int, data=None, model: str | None = None, wait: float = 10.0,
        timeout: float = 30.0, seed: int = 0, api_key: str | None = None) -> dict:
    """Drive the server at each concurrency level; return the `mk.bench/1` result (mode http)."""
    url = base_url(url)
    from mk.core.serving.auth import sendable

    if api_key is not None and not sendable(api_key):  # a key of any server's, not only mk serve's rules
        raise BadInput("--api-key: printable ASCII characters only (it is sent in an HTTP header)")
    duration = 10.0 if duration is None and iters is None else duration
    log.info("waiting for %s to be ready (at most %g s)", url, wait)
    wait_ready(url, wait, api_key)
    name, meta = discover_model(url, model, timeout, api_key)
    # limits the server states in its metadata (mk serve does): every request past them would be refused
    params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
    max_seq, max_batch, max_tokens = (params.get(k) for k in ("max_sequence_length", "max_batch_size", "max_tokens"))
    if data is None and isinstance(max_seq, int) and seq > max_seq:
        raise BadInput(f"--seq-lens {seq}: longer than the served model's {max_seq} positions",
                       hint=f"use --seq-lens {max_seq} or less")
    if isinstance(max_batch, int) and max(batch_sizes) > max_batch:
        raise BadInput(f"--batch-sizes {max(batch_sizes)}: over the server's limit of {max_batch} per request")
    if data is None and isinstance(max_tokens, int) and max(batch_sizes) * seq > max_tokens:
        raise BadInput(f"--batch-sizes {max(batch_sizes)} × --seq-lens {seq} = {max(batch_sizes) * seq} tokens "
                       f"per request: over the server's limit of {max_tokens}",
                       hint=f"use at most {max_tokens // seq} per batch at this length")
    split, texts, dataset_path, score = None, None, None, True
    if data is not None:
        from mk.core.dataset import label_mismatch, load_split, open_dataset

        ds = open_dataset(data)
        split, dataset_path = load_split(ds, "test"), str(ds.path)
        if any(i.get("name") == "text" for i in meta.get("inputs", [])) and "input_ids" in split:
            texts = test_texts(ds, split)
        served = params.get("labels")
        if served and (why := label_mismatch(served, ds.labels, "the served model")):
            log.warning("%s: accuracy not measured", why)
            score = False
    path = f"/v2/models/{name}/infer"
    results, warnings = [], []
    levels = [(b, c) for b in batch_sizes for c in concurrency]
    with progress("load test", total=len(levels)) as bar:
        for b, c in levels:
            bodies, labels = request_bodies(meta, b, split, texts, seq, seed)
            if not score:
                labels = [None] * len(labels)
            log.info("concurrency %d, batch %d: %s", c, b,
                     f"{duration:g} s" if duration is not None else f"{iters} requests")
            run_level(url, path, bodies[:2], [None], 1, float("inf"), 2, timeout, api_key)  # warm-up, unclocked
            r = run_level(url, path, bodies, labels, c, duration if duration is not None else float("inf"),
                          iters or MAX_REQUESTS, timeout, api_key)
            r = {"concurrency": c, "batch_size": b, **r,
                 "throughput_samples_s": round(r["throughput_rps"] * b, 3) if r["throughput_rps"] else 0.0}
            if r["errors"]:
                warnings.append(f"concurrency {c}, batch {b}: {r['errors']} of {r['requests']} requests failed "
                                f"(first: {r['first_error']})")
            results.append(r)
            bar.advance(1)
    if not any(r["ok"] for r in results):
        raise MkError(f"{url}: no request succeeded; first error: "
                      f"{next((r['first_error'] for r in results if r['first_error']), 'none')}")
    return {
        "schema": SCHEMA, "mode": "http", "created": created_by(), "url": url, "model": name,
        "model_metadata": meta,
        "settings": {"concurrency": concurrency, "batch_sizes": batch_sizes, "duration_s": duration,
                     "iters": iters, "seq_len": "data" if split is not None else seq, "data": dataset_path,
                     "inputs": "text" if texts is not None else "token ids", "wait_s": wait, "timeout_s": timeout},
        "environment": {**environment(None, None), "role": "client"},
        "results": results, "warnings": warnings,
    }
