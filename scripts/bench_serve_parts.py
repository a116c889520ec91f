#!/usr/bin/env python
"""Three parts of `mk serve`, measured in-process on the real test texts, without HTTP.

    python scripts/bench_serve_parts.py --model tuned-int8 --data data

1. How a batch runs: random batches of 32 test texts (what concurrency 32 brings)
   as one call padded to the longest, as the batcher cuts them by the cost it
   measures at start-up (`CallCost`, the server's own warm-up), and one call per
   text. Texts/s, medians over rounds, interleaved, and the padded tokens each
   way runs against the texts' real tokens.
2. ONNX Runtime's threads between calls, for a short (16-token) call back to back
   and with 2 ms between calls, as a server sees them: spinning throughout (`mk
   bench`), spinning within a call only (`mk serve`: session.force_spinning_stop),
   never spinning, and one thread (no pool to wake: what idle cores cost by
   themselves). Latency p50/p99 and CPU per call.
3. Calls side by side: random batches of 1, 8 and 32 test texts, each padded to
   its longest, run one at a time on every thread (a call alone) and on as many
   threads at once, one thread each (the batcher under load). Texts/s.

Prints the CPU with the figures; ratios are against the first row of each part.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="ONNX model artifact (e.g. the demo's int8)")
    p.add_argument("--data", required=True, help="dataset artifact whose test texts are used")
    p.add_argument("--batches", type=int, default=12, help="random batches of 32 per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, help="runtime threads (default: ONNX Runtime's)")
    return p.parse_args()


def batch_cut(a, model, texts) -> None:
    from mk.core.serving.batcher import Job, pad_batch

    runtime = model.batcher.narrow or model.runtime  # the one the cost was measured on
    loop, rng = asyncio.new_event_loop(), np.random.default_rng(0)
    batches = [[Job(model.encoder.encode([texts[i]], None, truncate=True)[0], 0, loop)
                for i in rng.choice(len(texts), 32, replace=False)] for _ in range(a.batches)]
    ways = {"one padded call": lambda jobs: [jobs], "cut by the measured cost": model.batcher.cost.calls,
            "one call per text": lambda jobs: [[j] for j in jobs]}
    rates = {k: [] for k in ways}
    real = sum(int(j.inputs["attention_mask"].sum()) for jobs in batches for j in jobs)
    padded = {name: sum(sum(j.rows for j in call) * max(j.width for j in call) for jobs in batches
                        for call in cut(jobs)) for name, cut in ways.items()}
    for _ in range(a.rounds):
        for name, cut in ways.items():
            t0 = time.perf_counter()
            for jobs in batches:
                for call in cut(jobs):
                    runtime(pad_batch(call, model.encoder.pad_id))
            rates[name].append(32 * len(batches) / (time.perf_counter() - t0))
    loop.close()
    cost = model.batcher.cost
    print(f"1. batches of 32 test texts; measured cost of a call {cost.fixed_s * 1e3:.2f} ms + "
          f"{cost.per_token_s * 1e3:.4f} ms per padded token ({runtime.threads or 'default'} thread(s) a call)")
    base = statistics.median(rates["one padded call"])
    for name, r in rates.items():
        print(f"   {name:28} {statistics.median(r):8.1f} texts/s  {statistics.median(r) / base:5.2f}x"
              f"  padded tokens {padded[name] / real:4.2f}x the real ones")


def spinning(a) -> None:
    import onnxruntime as ort

    from mk.core.artifact import open_artifact
    from mk.core.runtime.onnx_runtime import open_session

    path = open_artifact(a.model, kind="model").path / "model.onnx"
    never = ort.SessionOptions()
    never.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if a.threads:
        never.intra_op_num_threads = a.threads
    sessions = {"spinning throughout (bench)": open_session(path, "cpu", a.threads, spin=True),
                "within a call (serve)": open_session(path, "cpu", a.threads, spin=False),
                "never": ort.InferenceSession(str(path), never, providers=["CPUExecutionProvider"]),
                "one thread, no pool": open_session(path, "cpu", 1, spin=False)}
    feed = {"input_ids": np.array([[101] + list(range(2000, 2014)) + [102]]), "attention_mask": np.ones((1, 16), np.int64),
            "token_type_ids": np.zeros((1, 16), np.int64)}
    gaps = (0.0, 0.002)  # back to back, and with the cores idle between calls as at concurrency 1
    print(f"2. a 16-token call, back to back and 2 ms between calls; {a.rounds} interleaved rounds of 100 calls")
    inputs = {name: {i.name: feed[i.name] for i in s.get_inputs()} for name, s in sessions.items()}
    lat = {(name, g): [] for name in sessions for g in gaps}
    cpu = {key: [] for key in lat}
    for _ in range(a.rounds):
        for (name, gap) in lat:
            s = sessions[name]
            time.sleep(0.2)  # the previous session's threads stop spinning
            for _ in range(10):
                s.run(None, inputs[name])
            c0 = time.process_time()
            for _ in range(100):
                t0 = time.perf_counter()
                s.run(None, inputs[name])
                lat[name, gap].append(time.perf_counter() - t0)
                if gap:
                    time.sleep(gap)
            cpu[name, gap].append((time.process_time() - c0) / 100)
    for (name, gap), values in lat.items():
        ms = sorted(values)
        print(f"   {name:28} {'2 ms apart' if gap else 'back to back':13} p50 {statistics.median(ms) * 1e3:5.2f} ms  "
              f"p99 {ms[int(len(ms) * 0.99)] * 1e3:5.2f} ms  CPU {statistics.median(cpu[name, gap]) * 1e3:5.2f} ms a call")


def side_by_side(a, model, texts) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mk.core.serving.batcher import Job, pad_batch

    wide, narrow, parallel = model.runtime, model.batcher.narrow, len(model.batcher.threads)
    if narrow is None:
        print("3. calls side by side: not measured, the runtime has one thread")
        return
    print(f"3. calls side by side: {parallel} at once on one thread each, against one at a time on all")
    loop, rng = asyncio.new_event_loop(), np.random.default_rng(1)
    for size in (1, 8, 32):
        n = max(a.batches, 96 // size)
        batches = [pad_batch([Job(model.encoder.encode([texts[i]], None, truncate=True)[0], 0, loop)
                              for i in rng.choice(len(texts), size, replace=False)], model.encoder.pad_id)
                   for _ in range(n)]

        def alone():
            for b in batches:
                wide(b)

        def side():
            with ThreadPoolExecutor(parallel) as pool:
                list(pool.map(narrow, batches))
        rates = {"one at a time": [], "side by side": []}
        for _ in range(a.rounds):
            for name, run in (("one at a time", alone), ("side by side", side)):
                t0 = time.perf_counter()
                run()
                rates[name].append(size * n / (time.perf_counter() - t0))
        one, two = (statistics.median(rates[k]) for k in rates)
        print(f"   batches of {size:2}: one at a time {one:7.1f} texts/s, side by side {two:7.1f}  {two / one:5.2f}x")
    loop.close()


def main() -> None:
    a = parse()
    from mk.core.artifact import open_artifact
    from mk.core.dataset import load_split, open_dataset
    from mk.core.measurement.bench import environment
    from mk.core.measurement.http_bench import test_texts
    from mk.core.serving.serve import ServeOptions, load_model

    env = environment(None, None)
    print(f"CPU: {env.get('cpu')} ({' '.join(env.get('cpu_flags', []))}); threads {a.threads or 'default'}")
    model = load_model(open_artifact(a.model, kind="model"), ServeOptions(name="m", threads=a.threads))
    model.batcher.stop()  # its runtimes and measured cost are used here directly
    ds = open_dataset(a.data)
    texts, _ = test_texts(ds, load_split(ds, "test"))
    batch_cut(a, model, texts)
    spinning(a)
    side_by_side(a, model, texts)


if __name__ == "__main__":
    main()
