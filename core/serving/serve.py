"""`mk serve`: load the model, bind, and run the ASGI app under uvicorn in one
process or, with `workers > 1`, in that many (each with its own model and
batcher, sharing the listening socket).

SIGTERM or Ctrl-C stops accepting connections, answers every request already
accepted (uvicorn waits for them), then runs the batcher dry and returns."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mk.core.artifact import Artifact
from mk.core.console import log
from mk.core.device import default_threads
from mk.core.errors import BadInput, MkError, first_line
from mk.core.serving.batcher import CallCost
from mk.core.serving.model import Limits, ServedModel

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_WORKER_ENV = "MK_SERVE_WORKER"  # the settings a worker process starts from (JSON)


@dataclass
class ServeOptions:
    name: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    threads: int | None = None
    workers: int = 1
    limits: Limits = field(default_factory=Limits)


def model_name(given: str | None, ref) -> str:
    """--model-name as given (refused unless it fits in a URL path as is: a client configured with
    it must find it), else the artifact folder's name made to fit."""
    if given is not None:
        if not _NAME.match(given) or set(given) == {"."}:
            raise BadInput(f"--model-name {given!r}: letters, digits, '_', '.' and '-' only "
                           "(it is a part of the routes' paths)")
        return given
    name = Path(str(ref)).name or "model"
    return name if _NAME.match(name) else re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def check_servable(art: Artifact) -> None:
    """Refuse at start what could only fail on the first request."""
    if art.task == "image-classification":
        raise BadInput(f"{art.path}: an image classifier; mk serve takes text only",
                       hint="measure it with `mk bench`; serve it with Triton or KServe from its ONNX export")
    if art.task not in ("text-classification", "text-generation"):
        # loaded for classification, it would answer with the logits of a randomly initialised head
        raise BadInput(f"{art.path}: a {art.task} model has no classification head to serve",
                       hint="fine-tune it first with `mk tune`")


def load_model(art: Artifact, opts: ServeOptions, cost: CallCost | None = None) -> ServedModel:
    """The runtime (through the interface `mk bench` measures), the tokenizer and the
    batcher, warmed up on real-looking text at the batch sizes traffic will bring.
    A causal LM is served through CausalLM (the OpenAI-compatible routes). An ONNX model on
    a CPU also gets a one-thread copy of itself, and as many batcher threads as it has
    threads (Batcher). `cost`: the cost of a runtime call measured already (by the parent of
    `--workers`)."""
    from mk.core.runtime import load_runtime
    from mk.core.serving.metrics import Metrics

    # ONNX Runtime's threads sleep between calls: the event loop needs the cores then
    load, served = functools.partial(load_runtime, spin=False), ServedModel
    warm = functools.partial(warm_up, cost=cost)
    if art.task == "text-generation":
        from mk.core.runtime.causal_runtime import CausalLM
        from mk.core.serving import generation

        load, served, warm = CausalLM.load, generation.GenerationModel, generation.warm_up
    # as `mk bench` does; each `--workers` process gets its share of the cores unless --threads says otherwise
    threads = opts.threads or max(1, default_threads() // opts.workers)
    try:
        runtime = load(art, device=opts.device, threads=threads)
        side = {}
        if served is ServedModel and runtime.name == "onnxruntime" and runtime.device == "cpu" and threads > 1:
            # the same model on one thread, for calls that run beside others (Batcher)
            side = {"parallel": threads, "narrow": load(art, device="cpu", threads=1)}
    except MkError as e:
        if str(art.path) not in e.message:
            e.message = f"{art.path}: {e.message}"
        raise
    metrics = Metrics(opts.name, {"format": art.format, "runtime": runtime.name, "device": str(runtime.device)})
    model = served(art, opts.name, runtime, opts.limits, metrics, **side)
    try:
        warm(model)
    except Exception as e:  # noqa: BLE001 — a model that cannot answer is refused before listening
        model.batcher.stop()
        raise BadInput(f"{art.path}: cannot be served ({type(e).__name__}: {first_line(e)})") from None
    return model


def warm_up(model: ServedModel, cost: CallCost | None = None) -> None:
    """One call per batch size a first burst brings, so that no client pays for the
    runtime's first-call setup; then, unless `cost` is given, a short and a long call
    timed, for the batcher's cost of a call (ids from the tokenizer: always in the vocabulary)."""
    text = "The quick brown fox jumps over the lazy dog, twice."
    small, _ = model.encoder.encode([text], None, truncate=True)
    full, _ = model.encoder.encode([text] * model.limits.max_batch_size, None, truncate=True)
    large, _ = model.encoder.encode([" ".join([text] * 4)] * min(model.limits.max_batch_size, 32), None, truncate=True)
    narrow = model.batcher.narrow  # under load calls run there: the cost that decides their cuts
    for runtime in filter(None, (model.runtime, narrow)):
        for inputs in (small, full, large):
            runtime(inputs)
    model.batcher.cost = cost = cost or CallCost.measure(narrow or model.runtime, small, large)
    log.debug("a runtime call costs %.2f ms + %.4f ms per padded token", cost.fixed_s * 1e3, cost.per_token_s * 1e3)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said outright: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say it, and
    # with Nagle on, an answer written in two parts waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        import errno

        sock.close()
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:  # the host, not the port
            raise BadInput(f"--host {host}: not an address of this machine ({e.strerror or e})",
                           hint="use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
        raise MkError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                      hint="choose another --port (0 picks a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals(handler):
    """SIGINT and SIGTERM handled by `handler` within the block, as before it after."""
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _uvicorn_config(app, opts: ServeOptions, factory: bool = False):
    import uvicorn

    # access lines only with -v; uvicorn's own logger otherwise says only what went wrong
    return uvicorn.Config(app, factory=factory, workers=opts.workers, log_level="warning", access_log=False,
                          lifespan="on", timeout_graceful_shutdown=int(opts.limits.timeout_s) + 5,
                          timeout_keep_alive=30, server_header=False)


def run(art: Artifact, opts: ServeOptions, api_key: str | None, on_ready, on_loading=lambda: None) -> None:
    """Serve until SIGTERM/SIGINT; `on_loading()` once a signal would stop the load
    (exit 130), `on_ready(url)` once every worker answers."""
    import uvicorn

    from mk.core.serving.app import create_app

    sock = bind(opts.host, opts.port)
    url = url_of(sock)
    serving = threading.Event()

    def on_signal(signum, frame):
        # until every worker answers, a signal stops mk serve (exit 130): none is lost while the model
        # loads; after, uvicorn re-raises the signal it stopped for once it has drained: a plain exit 0
        if not serving.is_set():
            raise KeyboardInterrupt

    def ready():
        serving.set()
        on_ready(url)

    with stop_signals(on_signal), contextlib.closing(sock):
        on_loading()
        model = load_model(art, opts)
        if opts.workers == 1:
            server = uvicorn.Server(_uvicorn_config(create_app(model, api_key, ready), opts))
            server.run(sockets=[sock])
            log.info("stopped; %d inference requests were accepted and answered", model.accepted)
            return
        # the model loaded here failed once, with a clear line, rather than in every worker, and
        # timed the runtime's calls alone, where the workers, warming up together, would time them
        # contended; its sessions are not needed while the workers serve
        model.batcher.stop()
        cost = model.batcher.cost
        del model
        _run_workers(art, opts, api_key, sock, cost, ready)


def _run_workers(art: Artifact, opts: ServeOptions, api_key: str | None, sock, cost: CallCost | None,
                 on_ready) -> None:
    from uvicorn.supervisors import Multiprocess

    with tempfile.TemporaryDirectory(prefix="mk-serve-") as tmp:
        ready_dir, metrics_dir = Path(tmp, "ready"), Path(tmp, "metrics")
        ready_dir.mkdir()
        metrics_dir.mkdir()
        env = {_WORKER_ENV: json.dumps({"path": str(art.path), "ready_dir": str(ready_dir), "options": asdict(opts),
                                        "cost": asdict(cost) if cost else None, "parent": os.getpid()}),
               "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        if api_key:
            env["MK_API_KEY"] = api_key
        os.environ.update(env)  # the spawned workers inherit it

        config = _uvicorn_config("mk.core.serving.serve:worker_app", opts, factory=True)
        supervisor = Multiprocess(config, sockets=[sock])  # its signal handlers replace run()'s
        lock, state = threading.Lock(), {"serving": False, "stopped": False}

        def on_signal(signum, frame):
            with lock:  # a signal before every worker answers stops mk serve (exit 130), as during the load
                state["stopped"] = state["stopped"] or not state["serving"]
            supervisor.signal_queue.append(signum)  # the supervisor stops its workers

        def announce():
            while len(list(ready_dir.iterdir())) < opts.workers:
                if state["stopped"]:
                    return
                time.sleep(0.1)
            with lock:
                if state["stopped"]:
                    return
                state["serving"] = True
            on_ready()

        for s in STOP_SIGNALS:
            signal.signal(s, on_signal)
        threading.Thread(target=announce, daemon=True).start()
        supervisor.run()
    if state["stopped"]:
        raise KeyboardInterrupt


def _end_with_parent(parent: int) -> None:
    """A worker is sent SIGTERM (it drains, then exits) when the process that started it
    dies, killed with -9 or by the OOM killer, rather than serving on and holding the port.
    Linux's prctl(PR_SET_PDEATHSIG); elsewhere the supervisor's own shutdown is all there is."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def worker_app():
    """The app of one `--workers` process: its own model and batcher."""
    from mk.core.artifact import open_artifact
    from mk.core.serving.app import create_app

    spec = json.loads(os.environ[_WORKER_ENV])
    _end_with_parent(spec["parent"])
    options = spec["options"]
    opts = ServeOptions(**{**options, "limits": Limits(**options["limits"])})

    def stop_loading(signum, frame):  # uvicorn would hold the signal until the model had loaded and served
        raise SystemExit(130)
    with stop_signals(stop_loading):
        model = load_model(open_artifact(spec["path"], kind="model"), opts,
                           CallCost(**spec["cost"]) if spec["cost"] else None)
    ready = Path(spec["ready_dir"], str(os.getpid()))
    return create_app(model, os.environ.get("MK_API_KEY"), ready.touch)
