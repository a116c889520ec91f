"""`mk serve`: answer KServe v2 and TEI requests for a classifier, the OpenAI-compatible
routes for a causal LM."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import read_input

@command("serve")
def serve(
    model: Annotated[Optional[Path], options.input_argument(
        "Model artifact to serve (folder, `minilm`, `smollm2`).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; any but loopback needs --api-key.")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    device: options.Device = "auto",
    trust_pickle: options.TrustPickle = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help=(
        "Threads for the runtime. ONNX on a CPU: a call alone uses them all; under load as many calls run "
        "at once, one thread each.  [default: the physical cores mk may use, shared out over --workers]"))] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="Name the model is served under.  [default: the folder's name]")] = None,
    api_key: options.ApiKey = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Serve a non-loopback address without a key, on purpose.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes, each with its own model.")] = 1,
    max_batch_size: Annotated[int, typer.Option(
        "--max-batch-size", min=1, help="Inputs per runtime call when requests are batched together.")] = 32,
    max_wait_ms: Annotated[float, typer.Option(
        "--max-wait-ms", min=0, help="How long a batch waits for requests still being read.")] = 2.0,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, help="Inputs that may wait; past it requests get 503 + Retry-After.")] = 256,
    max_inputs: Annotated[int, typer.Option("--max-inputs", min=1, help="Inputs per request (else 413).")] = 256,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=1, help="Inputs × tokens per request (else 413).")] = 16384,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds a request may take before it gets 504.")] = 30.0,
    truncate: Annotated[bool, typer.Option(
        "--truncate/--no-truncate", help="Cut texts over the model's limit (said in the answer), or refuse them.")
    ] = True,
):
    """Serve a text classifier over HTTP (KServe v2, text or token ids, and TEI's /predict),
    or a causal LM (OpenAI-compatible /v1/chat/completions and /v1/completions, streamed or not).

    Requests are batched together (up to --max-batch-size inputs) and run through the
    same runtime `mk bench` measures. Prints the server's URL on stdout once the model
    is loaded and answering; runs until Ctrl-C or SIGTERM, which answers every request
    already accepted and exits 0.

    \b
      mk serve tuned --port 8000 &
      curl -s localhost:8000/predict -d '{"inputs": "what a great day"}'
      mk bench --url http://127.0.0.1:8000 --concurrency 1,8,32 --data data
    \b
      mk serve smollm2 --port 8001 &
      curl -s localhost:8001/v1/chat/completions -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    from mk.core.artifact import open_artifact
    from mk.core.console import console
    from mk.core.cpu import warn_int8_path_mismatch
    from mk.core.device import check_device
    from mk.core.serving import auth
    from mk.core.serving.model import Limits
    from mk.core.serving.serve import ServeOptions, check_servable, model_name as name_of, run

    ref = read_input(model, "model")
    check_device(device)
    host = auth.bare_host(host)
    auth.check_key(api_key)
    auth.check_exposure(host, api_key, insecure)
    art = open_artifact(ref, kind="model", trust_pickle=trust_pickle)
    check_servable(art)
    warn_int8_path_mismatch(art)
    limits = Limits(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                    max_inputs=max_inputs, max_tokens=max_tokens, timeout_s=timeout, truncate=truncate)
    opts = ServeOptions(name=name_of(model_name, ref), host=host, port=port, device=device, threads=threads,
                        workers=workers, limits=limits)
    if not auth.is_loopback(host) and not api_key:
        console.print(f"warning: {host} is reachable from the network and no key is set (--insecure)",
                      style="yellow", highlight=False)

    def ready(url: str) -> None:
        routes = (f"{url}/v1/chat/completions · {url}/v1/completions" if art.task == "text-generation" else
                  f"{url}/v2/models/{opts.name}/infer · {url}/predict")
        console.print(f"serving [bold]{opts.name}[/] ({art.format}, {workers} worker(s)) at {url}  "
                      f"POST {routes} · {url}/metrics · "
                      f"Ctrl-C stops", markup=True, highlight=False, soft_wrap=True)
        sys.stdout.write(url + "\n")
        sys.stdout.flush()

    run(art, opts, api_key, ready,
        on_loading=lambda: console.print(f"loading {art.path} ({art.format})", highlight=False))
