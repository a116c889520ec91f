"""`mk bench`: measure artifacts side by side, or load-test a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mk.cli import options
from mk.cli.app import command
from mk.cli.bench_tables import print_report
from mk.cli.output import read_piped, show, warn
from mk.core.errors import BadInput


@command("bench")
def bench(
    artifacts: Annotated[Optional[list[str]], typer.Argument(
        help="Model artifacts to measure side by side (folders, or `minilm`); the first is the reference "
             "for speed-ups. Read from stdin, one per line, when omitted and stdin is piped.",
        show_default=False)] = None,
    url: Annotated[Optional[str], typer.Option(
        "--url", help="Load-test a running KServe v2 server (e.g. `mk serve`) instead.")] = None,
    batch_sizes: Annotated[Optional[str], typer.Option(
        "--batch-sizes", help="Batch sizes to measure.  [default: 1,8,32; causal LMs 1,8; over HTTP 1]")] = None,
    seq_lens: Annotated[Optional[str], typer.Option(
        "--seq-lens", help="Sequence lengths of synthetic inputs, or `data` for real test rows; prompt lengths "
                           "for causal LMs.  [default: data with --data, else 128; causal LMs 128,512]")] = None,
    new_tokens: Annotated[Optional[int], typer.Option(
        "--new-tokens", min=1, help="Causal LMs: tokens generated per call (greedy, EOS ignored, so runs "
                                    "compare).  [default: 32]")] = None,
    data: options.Data = None,
    device: options.Device = "auto",
    threads: options.Threads = None,
    duration: Annotated[Optional[float], typer.Option(
        "--duration", min=0.01, help="Seconds measured per artifact and shape (per concurrency level over HTTP). "
                                     " [default: 3; over HTTP 10]")] = None,
    iters: Annotated[Optional[int], typer.Option(
        "--iters", min=1, help="Calls per artifact and shape (requests per level over HTTP), instead of --duration.")
    ] = None,
    rounds: Annotated[Optional[int], typer.Option(
        "--rounds", min=1, help="Interleaved rounds (A B A B …) to take medians of.  [default: 5; causal LMs 3]")
    ] = None,
    warmup_calls: Annotated[Optional[int], typer.Option(
        "--warmup-calls", min=1, help="Untimed calls per artifact and shape first.  [default: 3; causal LMs 1]")
    ] = None,
    warmup: Annotated[Optional[int], typer.Option(
        "--warmup", min=1, hidden=True, help="Old spelling of --warmup-calls.")] = None,
    eval_limit: Annotated[Optional[int], typer.Option(
        "--eval-limit", min=0, help="Test rows for accuracy, perplexity and exact match (0 skips them).  "
                                    "[default: all; causal LMs 100]")] = None,
    concurrency: Annotated[Optional[str], typer.Option(
        "--concurrency", help="HTTP: concurrent clients per level.  [default: 1,8,32]", show_default=False)] = None,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="HTTP: the served model's name.  [default: asked of the server]")] = None,
    wait: Annotated[Optional[float], typer.Option(
        "--wait", min=0, help="HTTP: seconds to wait for the server to answer ready before exit 1.  [default: 10]",
        show_default=False)] = None,
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
        "(`5` and `5%` alike; `0.5` is half a percent).  [default: 5%]", show_default=False)] = None,
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

    Causal LMs (text-generation) get prefill tokens/s, time to first token, decode
    tokens/s and inter-token latency at each batch size and prompt length, generating
    --new-tokens tokens a call, and perplexity (exact match when the dataset has
    answers) on the test split. One call measures models of one task.

    \b
      mk bench tuned onnx int8 --batch-sizes 1,32 -o bench.json --plot bench.png
      mk bench int8 --baseline bench.json --max-regress 5%      # exit 3 on a regression
      mk bench smollm2 tuned-llm --seq-lens 128 --new-tokens 32 --data gen-data
      mk bench --url http://127.0.0.1:8000 --concurrency 1,8,32 --duration 20 --data data
    """
    from mk.core.measurement.bench_report import check_paths

    if warmup is not None:  # `mk tune --warmup` is the learning-rate warm-up; this one counts calls
        from mk.core.console import log
        log.warning("--warmup is now --warmup-calls (untimed calls); the old spelling will go in a later release")
        warmup_calls = warmup

    if iters is not None and duration is not None:
        raise BadInput("--duration and --iters both given; measure by time or by count, not both")
    allowance, base, renames = None, None, {}
    # an option of a mode not chosen is refused, not silently ignored
    options.only_with("--url", url, {"--concurrency": concurrency, "--model-name": model_name, "--wait": wait})
    options.only_with("--baseline", baseline, {"--max-regress": max_regress, "--baseline-as": baseline_as})
    if baseline is not None:
        from mk.core.measurement.bench_gate import load_baseline, parse_allowance, parse_renames

        allowance = parse_allowance("5%" if max_regress is None else max_regress)
        base = load_baseline(baseline)
        renames = parse_renames(baseline_as)

    if url is not None:
        if artifacts:
            raise BadInput("give artifacts or --url, not both")
        if new_tokens is not None:
            raise BadInput("--new-tokens: over HTTP mk bench load-tests a KServe v2 server, which does not generate")
        check_paths(output, plot, force, inputs=[data])
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
        levels = parse_ints("1,8,32" if concurrency is None else concurrency, "--concurrency")
        result = http_bench.run(url, levels, duration, iters,
                                parse_ints(batch_sizes if batch_sizes is not None else "1", "--batch-sizes"),
                                seqs[0], data=data, model=model_name, wait=10.0 if wait is None else wait, seed=seed,
                                api_key=api_key)
    else:
        from mk.core.measurement import bench as core_bench

        paths = artifacts or read_piped("artifact paths", hint="pass artifact folders (or `minilm`), pipe their paths "
                                                                "on stdin, or pass --url URL to load-test a server")
        check_paths(output, plot, force, inputs=[*paths, data])
        settings = core_bench.Settings(  # a None takes the default of the models' task
            batch_sizes=core_bench.parse_ints(batch_sizes, "--batch-sizes") if batch_sizes is not None else None,
            seq_lens=core_bench.parse_seq_lens(seq_lens) if seq_lens is not None else None,
            device=device, threads=threads, duration=duration, iters=iters, rounds=rounds, warmup=warmup_calls,
            data=data, eval_limit=eval_limit, seed=seed, trust_pickle=trust_pickle, new_tokens=new_tokens)
        result = core_bench.run(paths, settings)
    _finish(result, output, plot, (base, allowance, baseline, renames), as_json, force)


def _finish(result: dict, output, plot, gating: tuple, as_json: bool, force: bool) -> None:
    from mk.core.measurement import bench_report
    from mk.core.console import console, quiet

    base, allowance, baseline, renames = gating
    if base is not None:
        from mk.core.measurement.bench_gate import compare

        result["gate"] = {"baseline": str(baseline), **compare(result, base, allowance, renames)}
    if output is not None:
        bench_report.write_output(result, output, force)
    if plot is not None:
        bench_report.plot(result, plot, force)
    if quiet():  # the tables are not drawn, their warnings still are
        for w in result.get("warnings", []):
            warn(w)
    show(output, result, as_json, human=print_report)
    gate = result.get("gate")
    if gate is not None:
        from mk.core.measurement.bench_gate import gate as run_gate

        for u in gate["unmatched"]:
            warn(f"baseline: not compared: {u}")
        if gate["passed"] and not quiet():
            console.print(f"gate passed: {gate['checked']} measures within {gate['allowance_pct']:g}% of {baseline}",
                          style="green", highlight=False)
        elif not gate["passed"]:
            run_gate(result, base, allowance, baseline, renames)  # raises GateFailed: exit 3
