"""`mk bench`: measure artifacts side by side, or load-test a running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.output import emit
from mk.core.errors import BadInput


def read_inputs() -> list[str]:
    """Artifact paths piped on stdin: one per line, or upstream `--json` objects
    (pretty-printed or one per line) with a "path"."""
    if sys.stdin is None or sys.stdin.isatty():
        raise BadInput("no artifacts given", hint="pass artifact folders (or `minilm`), pipe their paths "
                                                  "on stdin, or pass --url URL to load-test a server")
    text = sys.stdin.read().strip()
    if not text:
        raise BadInput("stdin was empty where artifact paths were expected", hint="did the command before the pipe fail?")
    paths: list[str] = []
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        if text[i] == "{":
            try:
                obj, i = decoder.raw_decode(text, i)
                paths.append(str(obj["path"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput("stdin: JSON without a \"path\" where artifact paths were expected") from None
        else:
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            paths.append(text[i:end].strip())
            i = end
    return [p for p in paths if p]


@command("bench")
def bench(
    artifacts: Annotated[Optional[list[str]], typer.Argument(
        help="Model artifacts to measure side by side (folders, or `minilm`); the first is the reference "
             "for speed-ups. Read from stdin, one per line, when omitted and stdin is piped.",
        show_default=False)] = None,
    url: Annotated[Optional[str], typer.Option(
        "--url", help="Load-test a running KServe v2 server (e.g. `mk serve`) instead.")] = None,
    batch_sizes: Annotated[Optional[str], typer.Option(
        "--batch-sizes", help="Batch sizes to measure.  [default: 1,8,32; over HTTP 1]")] = None,
    seq_lens: Annotated[Optional[str], typer.Option(
        "--seq-lens", help="Sequence lengths of synthetic inputs, or `data` for real test rows.  "
                           "[default: data with --data, else 128]")] = None,
    data: options.Data = None,
    device: options.Device = "auto",
    threads: options.Threads = None,
    duration: Annotated[Optional[float], typer.Option(
        "--duration", min=0.01, help="Seconds measured per artifact and shape (per concurrency level over HTTP). "
                                     " [default: 3; over HTTP 10]")] = None,
    iters: Annotated[Optional[int], typer.Option(
        "--iters", min=1, help="Calls per artifact and shape (requests per level over HTTP), instead of --duration.")
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Interleaved rounds (A B A B …) to take medians of.")
                      ] = 5,
    warmup_calls: Annotated[int, typer.Option(
        "--warmup-calls", min=1, help="Untimed calls per artifact and shape first.")] = 3,
    warmup: Annotated[Optional[int], typer.Option(
        "--warmup", min=1, hidden=True, help="Old spelling of --warmup-calls.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option(
        "--eval-limit", min=0, help="Test rows for accuracy (0 skips it).  [default: all]")] = None,
    concurrency: Annotated[str, typer.Option(
        "--concurrency", help="HTTP: concurrent clients per level.")] = "1,8,32",
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="HTTP: the served model's name.  [default: asked of the server]")] = None,
    wait: Annotated[float, typer.Option(
        "--wait", min=0, help="HTTP: seconds to wait for the server to answer ready before exit 1.")] = 10.0,
    api_key: options.ApiKey = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Save results: .csv or .parquet (a row per artifact and shape), .json (all).")
    ] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Save a plot (.png, .svg, .pdf): accuracy vs throughput, latency bars.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        "--baseline", help="A saved result (-o results.json) to compare with; exit 3 on a regression.")] = None,
    max_regress: Annotated[str, typer.Option(
        "--max-regress", help="Allowed worsening of throughput, p99 and accuracy against --baseline, in percent "
        "(`5` and `5%` alike; `0.5` is half a percent).")] = "5%",
    baseline_as: Annotated[Optional[str], typer.Option(
        "--baseline-as", help="Pair artifacts saved under other names: BASELINE_NAME=NAME, comma separated "
                              "(rows are matched by name only).")] = None,
    seed: options.Seed = 0,
    trust_pickle: options.TrustPickle = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing -o or --plot file (a -o .json only if it is a mk bench result).")
    ] = False,
    as_json: options.Json = False,
):
    """Measure model artifacts side by side: latency, throughput, memory, size, accuracy.

    Artifacts of any format (torch, ONNX, TensorRT) run through the same runtime as
    `mk serve`, interleaved in rounds after a warm-up, at fixed threads; medians with
    their spread, speed-ups against the first artifact. A variant no faster than its
    parent in the same run is flagged. The table goes to stderr; stdout gets the -o
    path, or the result as JSON with --json (schema mk.bench/1, see the README).

    \b
      mk bench tuned onnx int8 --batch-sizes 1,32 -o bench.json --plot bench.png
      mk bench int8 --baseline bench.json --max-regress 5%      # exit 3 on a regression
      mk bench --url http://127.0.0.1:8000 --concurrency 1,8,32 --duration 20 --data data
    """
    from mk.core.measurement.bench_report import check_paths

    if warmup is not None:  # `mk tune --warmup` is the learning-rate warm-up; this one counts calls
        from mk.core.console import log
        log.warning("--warmup is now --warmup-calls (untimed calls); the old spelling will go in a later release")
        warmup_calls = warmup

    if iters is not None and duration is not None:
        raise BadInput("--duration and --iters both given; measure by time or by count, not both")
    check_paths(output, plot, force)
    allowance, base, renames = None, None, {}
    if baseline is not None:
        from mk.core.measurement.bench_gate import load_baseline, parse_allowance, parse_renames

        allowance = parse_allowance(max_regress)
        base = load_baseline(baseline)
        renames = parse_renames(baseline_as)

    if url is not None:
        if artifacts:
            raise BadInput("give artifacts or --url, not both")
        from mk.core.measurement import http_bench
        from mk.core.measurement.bench import parse_ints, parse_seq_lens

        lens = parse_seq_lens(seq_lens if seq_lens is not None else "128")
        if "data" in lens and data is None:
            raise BadInput("--seq-lens data: no dataset to take real inputs from",
                           hint="pass --data DATASET (made by `mk prep`)")
        seqs = [s for s in lens if s != "data"] or [128]
        if len(seqs) > 1:  # only the first was measured
            raise BadInput(f"--seq-lens {seq_lens}: over HTTP, one length per run",
                           hint="run `mk bench --url` once per length")
        result = http_bench.run(url, parse_ints(concurrency, "--concurrency"), duration, iters,
                                parse_ints(batch_sizes if batch_sizes is not None else "1", "--batch-sizes"),
                                seqs[0], data=data, model=model_name, wait=wait, seed=seed, api_key=api_key)
    else:
        from mk.core.measurement import bench as core_bench

        paths = artifacts or read_inputs()
        settings = core_bench.Settings(
            batch_sizes=core_bench.parse_ints(batch_sizes if batch_sizes is not None else "1,8,32", "--batch-sizes"),
            seq_lens=core_bench.parse_seq_lens(seq_lens if seq_lens is not None
                                               else ("data" if data is not None else "128")),
            device=device, threads=threads, duration=duration, iters=iters, rounds=rounds, warmup=warmup_calls,
            data=data, eval_limit=eval_limit, seed=seed, trust_pickle=trust_pickle)
        result = core_bench.run(paths, settings)
    _finish(result, output, plot, (base, allowance, baseline, renames), as_json, force)


def _finish(result: dict, output, plot, gating: tuple, as_json: bool, force: bool) -> None:
    from mk.core.measurement import bench_report
    from mk.core.console import console, quiet

    base, allowance, baseline, renames = gating
    if base is not None:
        from mk.core.measurement.bench_gate import compare

        result["gate"] = {"baseline": str(baseline), **compare(result, base, allowance, renames)}
    if not quiet():
        bench_report.print_report(result, console)
    elif result.get("warnings"):
        for w in result["warnings"]:
            console.print(f"[bold yellow]warning:[/] {w}", markup=True, highlight=False, soft_wrap=True)
    if output is not None:
        bench_report.write_output(result, output, force)
    if plot is not None:
        bench_report.plot(result, plot, force)
    emit(output, result, as_json=as_json)
    gate = result.get("gate")
    if gate is not None:
        from mk.core.measurement.bench_gate import gate as run_gate

        for u in gate["unmatched"]:
            console.print(f"[bold yellow]warning:[/] baseline: not compared: {u}", markup=True, highlight=False)
        if gate["passed"] and not quiet():
            console.print(f"gate passed: {gate['checked']} measures within {gate['allowance_pct']:g}% of {baseline}",
                          style="green", highlight=False)
        elif not gate["passed"]:
            run_gate(result, base, allowance, baseline, renames)  # raises GateFailed: exit 3
