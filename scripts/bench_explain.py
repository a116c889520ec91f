"""Time `mk explain` with occlusion on N test rows: the int8 model against its torch
parent in the same run, interleaved, medians of --rounds.

    flock /tmp/mk-bench.lock python scripts/bench_explain.py --int8 int8 --torch tuned --rows 100

Each round explains the first N rows of the test split of the model's dataset (one
forward per word plus the full text, batched through the runtime), model loading
included; wall and CPU seconds of the process are both kept (on a busy machine the
wall time says more about the neighbours than about mk). Each run is printed on stderr
as it ends; the machine (CPU, its flags, cores, load) is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--int8", required=True, help="the quantized model (mk quant)")
    p.add_argument("--torch", required=True, help="its torch parent, the baseline")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    from mk.core.explanation.explain import Rows, Settings, explain
    from mk.core.measurement.bench import environment

    runs: dict[str, list[dict]] = {"int8": [], "torch": []}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, model in (("int8", args.int8), ("torch", args.torch)):
            start, cpu = time.perf_counter(), time.process_time()
            result = explain(model, Rows(split="test", limit=args.rows),
                             Settings(method="occlusion", threads=args.threads))
            words = sum(len(r["words"]) for r in result["records"])
            runs[name].append({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                               "texts": len(result["records"]), "words": words, "calls": result["runtime_calls"],
                               "load_average": os.getloadavg()})
            print(name, json.dumps(runs[name][-1]), file=sys.stderr, flush=True)
    env = environment(args.threads or os.cpu_count(), args.threads)
    out = {"cpu": env["cpu"], "cpu_flags": env["cpu_flags"], "cores_logical": env["cores_logical"],
           "load_average": {"before": load_before, "after": os.getloadavg()}, "rows": args.rows,
           "rounds": args.rounds}
    for name, rounds in runs.items():
        out[name] = {**rounds[0], **{k: statistics.median(r[k] for r in rounds) for k in ("seconds", "cpu_seconds")},
                     "all_seconds": [r["seconds"] for r in rounds]}
    out["speedup_int8_vs_torch"] = {k: out["torch"][k] / out["int8"][k] for k in ("seconds", "cpu_seconds")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
