"""`mk serve`: answer KServe v2 inference requests for one model artifact."""

from __future__ import annotations

import ipaddress
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import read_input


@command("serve")
def serve(
    model: Annotated[Optional[Path], options.input_argument("Model artifact to serve (folder, or `minilm`).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; loopback unless you mean otherwise.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    device: options.Device = "auto",
    trust_pickle: options.TrustPickle = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="Threads for the runtime.")] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="Name the model is served under.  [default: the folder's name]")] = None,
):
    """Serve a model over HTTP with the KServe v2 protocol, through the same runtime `mk bench` measures.

    Prints the server's URL on stdout once the model is loaded and ready; runs until
    Ctrl-C or SIGTERM (exit 0). Endpoints: /v2/health/live, /v2/health/ready,
    /v2/models/NAME, POST /v2/models/NAME/infer (INT64/INT32 input_ids and
    attention_mask → logits and labels), and /metrics for Prometheus.

    \b
      mk serve tuned --port 8000 &
      mk bench --url http://127.0.0.1:8000 --concurrency 1,8 --data data
    """
    from mk.core.artifact import open_artifact
    from mk.core.cpu import warn_int8_path_mismatch
    from mk.core.console import console, log
    from mk.core.serving.serve import load_into, model_name as name_of, start, url_of

    ref = read_input(model, "model")
    from mk.core.device import check_device

    check_device(device)
    art = open_artifact(ref, kind="model", trust_pickle=trust_pickle)
    warn_int8_path_mismatch(art)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"

    stop = threading.Event()

    def _stop(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    server, state, thread = start(art, name_of(model_name, ref), host, port)
    if not loopback:
        log.warning("listening on %s: the server is reachable from the network and has no authentication", host)
    try:
        url = url_of(server)
        log.info("loading %s (%s); %s/v2/health/ready answers 503 until it is ready", art.path, art.format, url)
        load_into(state, device, threads)
        rt = state.runtime
        console.print(f"serving [bold]{state.name}[/] ({art.format}, {rt.name} on {rt.device}) at {url}  "
                      f"POST {url}/v2/models/{state.name}/infer · {url}/metrics · Ctrl-C stops",
                      markup=True, highlight=False, soft_wrap=True)
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        # Wait in short slices: the main thread must come back to Python now and
        # then for the SIGINT/SIGTERM handlers above to run.
        while not stop.wait(0.5):
            continue
        console.print("stopping: finishing requests in flight", highlight=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
