#!/usr/bin/env python
"""`mk serve` against in-process inference, a naive server and the previous server, in one run.

    flock /tmp/mk-bench.lock python scripts/bench_serve.py --model .mkwork/int8 --naive-model .mkwork/tuned \\
        --data .mkwork/data

On the same texts (the test split's, as `mk bench --url --data` sends them):

    in-process      `mk bench MODEL --seq-lens data` at batch 1 and 32 (no HTTP, no tokenization)
    mk serve        `mk serve MODEL`, driven by `mk bench --url` at each --concurrency
    naive           the fp32 model in a transformers pipeline, called once per request,
                    behind the same FastAPI/uvicorn stack (what a user writes first)
    previous        the http.server KServe server mk had before (`--previous FILE`: its
                    core/serving/serve.py; token ids only, so it gets the same rows as ids)
    mk serve@REV    `mk serve` as of a git revision (`--revision REV`, repeatable): an A/B of
                    two versions of the server measured side by side on the same machine state

Servers run side by side (idle when not measured); every round measures all of
them at every level in turn (interleaved, each round starting from the next
server), and the table shows medians over the rounds. Each server row also gives the CPU time per request of the server process
and of the client (this process, where `mk bench --url` runs). Targets at
concurrency 32: >= 85 % of the best in-process throughput and >= 3x the naive
server; p99 at concurrency 1 within 3 ms of in-process batch-1 p99 plus tokenization.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the served model (the demo's int8 ONNX model)")
    p.add_argument("--naive-model", help="the fp32 safetensors model the naive server runs")
    p.add_argument("--data", help="dataset artifact whose test texts are sent")
    p.add_argument("--previous", help="the previous core/serving/serve.py (e.g. from `git show main:...`)")
    p.add_argument("--revision", action="append", default=[],
                   help="also serve `mk serve` as of this git revision (git archive), measured alongside")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per level and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json-out")
    p.add_argument("--serve-naive", help=argparse.SUPPRESS)     # internal: run the naive server
    p.add_argument("--serve-previous", help=argparse.SUPPRESS)  # internal: run the previous server
    return p.parse_args()


# ------------------------------------------------------------------ servers --

def naive_app(model: str):
    """The first server a user writes: a transformers pipeline per request."""
    from fastapi import FastAPI
    from transformers import pipeline

    clf = pipeline("text-classification", model=model, device="cpu")
    labels = [clf.model.config.id2label[i] for i in range(clf.model.config.num_labels)]
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {"ready": True}

    @app.get("/v2")
    def server():
        return {"name": "naive", "models": ["naive"]}

    @app.get("/v2/models/naive")
    def meta():
        return {"name": "naive", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"labels": labels}}

    @app.post("/v2/models/naive/infer")
    def infer(body: dict):
        texts = body["inputs"][0]["data"]
        out = clf(texts, truncation=True)
        ids = [labels.index(o["label"]) for o in out]
        return {"model_name": "naive", "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [len(ids)], "data": [o["label"] for o in out]},
            {"name": "label_id", "datatype": "INT64", "shape": [len(ids)], "data": ids}]}
    return app


def serve_naive(model: str) -> None:
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = naive_app(model)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


def serve_previous(spec: str) -> None:
    import importlib.util

    from mk.core.artifact import open_artifact

    source, model = spec.split("::")
    mod_spec = importlib.util.spec_from_file_location("previous_serve", source)
    old = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(old)
    art = open_artifact(model, kind="model")
    server, state, thread = old.start(art, "previous", "127.0.0.1", 0)
    old.load_into(state, "cpu", None)
    print(old.url_of(server), flush=True)
    thread.join()


def revision_path(rev: str, root: str) -> str:
    """The repository at `rev` (git archive) as an importable `mk`, for PYTHONPATH."""
    tree = Path(root, rev, "mk")
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(HERE.parents[1]), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return str(tree.parent)


def launch(cmd: list[str], env: dict | None = None) -> tuple[str, subprocess.Popen]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=None if env is None else {**os.environ, **env})
    line: list[str] = []
    t = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout=300)
    if not line or not line[0].startswith("http"):
        proc.kill()
        raise SystemExit(f"{' '.join(cmd[:3])}: did not start")
    return line[0].strip(), proc


# ---------------------------------------------------------------- measuring --

def cpu() -> str:
    from mk.core.measurement.bench import environment

    env = environment(None, None)
    flags = [f for f in env.get("cpu_flags", []) if f in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_tile")]
    return f"{env.get('cpu')} ({os.cpu_count()} cores; {' '.join(flags) or 'no AVX2'})"


def in_process(model: str, data: str) -> dict:
    """`mk bench MODEL --seq-lens data --batch-sizes 1,32`: samples/s and p99 per batch size."""
    from mk.core.measurement import bench as core_bench

    r = core_bench.run([model], core_bench.Settings(batch_sizes=[1, 32], seq_lens=["data"], data=Path(data),
                                                    duration=4.0, rounds=4, eval_limit=0))
    return {row["batch_size"]: {"samples_s": row["throughput"]["median"], "p50_ms": row["latency_ms"]["p50"],
                                "p99_ms": row["latency_ms"]["p99"]} for row in r["results"]}


def tokenization_ms(model: str, data: str) -> float:
    """Median time to tokenize one test text the way the server does."""
    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split, open_dataset
    from mk.core.measurement.http_bench import test_texts
    from mk.core.serving.tokenization import TextEncoder

    ds = open_dataset(data)
    texts, _ = test_texts(ds, load_split(ds, "test"))
    enc = TextEncoder(open_artifact(model, kind="model"), 512)
    times = []
    for t in texts:
        t0 = time.perf_counter()
        enc.encode([t], None, truncate=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def over_http(url: str, server: subprocess.Popen, data: str, c: int, duration: float) -> dict:
    """`mk bench --url` (in this process) at one concurrency, with the CPU time each
    side spent per request: the server's from its process, the client's from ours."""
    import psutil

    from mk.core.measurement import http_bench

    def cpu_s(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    server_p, client_p = psutil.Process(server.pid), psutil.Process()
    s0, c0 = cpu_s(server_p), cpu_s(client_p)
    r = http_bench.run(url, [c], duration, None, [1], 128, data=data, wait=60)["results"][0]
    n = max(r["requests"], 1)
    return {"rps": r["throughput_rps"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
            "errors": r["errors"], "server_cpu_ms": 1000 * (cpu_s(server_p) - s0) / n,
            "client_cpu_ms": 1000 * (cpu_s(client_p) - c0) / n}


def med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def main() -> None:
    args = parse()
    if args.serve_naive:
        return serve_naive(args.serve_naive)
    if args.serve_previous:
        return serve_previous(args.serve_previous)
    levels = [int(x) for x in args.concurrency.split(",")]
    mk = str(Path(sys.executable).with_name("mk"))
    servers = {"mk serve": launch([mk, "serve", args.model, "--port", "0"])}
    if args.naive_model:
        servers["naive"] = launch([sys.executable, str(HERE), "--serve-naive", args.naive_model])
    if args.previous:
        servers["previous"] = launch([sys.executable, str(HERE), "--serve-previous", f"{args.previous}::{args.model}"])
    trees = tempfile.TemporaryDirectory(prefix="mk-revisions-")
    cli = "import sys; from mk.cli.main import main; sys.argv[0] = 'mk'; sys.exit(main())"
    for rev in args.revision:  # that revision's code first on the path, before this checkout's
        servers[f"mk serve@{rev}"] = launch([sys.executable, "-c", cli, "serve", args.model, "--port", "0"],
                                            env={"PYTHONPATH": revision_path(rev, trees.name)})
    print(f"CPU: {cpu()}; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    runs: dict = {}
    try:
        order = list(servers.items())
        for r in range(args.rounds):
            runs.setdefault("in-process", []).append(in_process(args.model, args.data))
            # each round starts from the next server: none is always the one measured right after in-process
            for name, (url, proc) in order[r % len(order):] + order[:r % len(order)]:
                for c in levels:
                    runs.setdefault((name, c), []).append(over_http(url, proc, args.data, c, args.duration))
            print(f"round {r + 1}/{args.rounds} done; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
        trees.cleanup()
    report(args, runs, levels, servers, tokenization_ms(args.model, args.data))


def report(args, runs: dict, levels: list[int], servers: dict, tok_ms: float) -> None:
    inproc = {b: {k: med([x[b][k] for x in runs["in-process"]]) for k in ("samples_s", "p50_ms", "p99_ms")}
              for b in (1, 32)}
    best = max(inproc[1]["samples_s"], inproc[32]["samples_s"])
    rows = [{"what": f"in-process batch {b}", **v} for b, v in inproc.items()]
    table = {}
    for name in servers:
        for c in levels:
            xs = runs[(name, c)]
            table[(name, c)] = {**{k: med([x[k] for x in xs]) for k in ("rps", "p50_ms", "p99_ms", "server_cpu_ms",
                                                                        "client_cpu_ms")},
                                "errors": sum(x["errors"] for x in xs)}
            rows.append({"what": f"{name} c={c}", "samples_s": table[(name, c)]["rps"], **table[(name, c)]})
    print(f"CPU: {cpu()}; medians of {args.rounds} interleaved rounds; tokenization {tok_ms:.2f} ms/text")
    print(f"{'':24} {'samples/s':>10} {'vs best in-proc':>16} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'server CPU ms/req':>18} {'client CPU ms/req':>18}")
    for row in rows:
        print(f"{row['what']:24} {row['samples_s']:>10} {row['samples_s'] / best:>15.2f}x "
              f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row.get('server_cpu_ms', '–'):>18} "
              f"{row.get('client_cpu_ms', '–'):>18}")
    checks = {}
    if ("mk serve", 32) in table:
        c32 = table[("mk serve", 32)]["rps"]
        checks["c32_vs_best_in_process"] = round(c32 / best, 3)
        if ("naive", 32) in table:
            checks["c32_vs_naive"] = round(c32 / table[("naive", 32)]["rps"], 2)
        if ("previous", 32) in table:
            checks["c32_vs_previous"] = round(c32 / table[("previous", 32)]["rps"], 2)
    if ("mk serve", 1) in table:
        checks["c1_p99_over_in_process_b1_p99_plus_tokenization_ms"] = round(
            table[("mk serve", 1)]["p99_ms"] - inproc[1]["p99_ms"] - tok_ms, 2)
    print(json.dumps(checks, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"cpu": cpu(), "rows": rows, "checks": checks,
                                                   "tokenization_ms": tok_ms, "rounds": args.rounds,
                                                   "duration_s": args.duration}, indent=1))


if __name__ == "__main__":
    main()
