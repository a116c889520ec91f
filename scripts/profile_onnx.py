#!/usr/bin/env python
"""Where an ONNX model artifact spends its time, by operator type: ONNX Runtime's
own profiler over a few calls on synthetic ids, at batch × sequence length.

    python scripts/profile_onnx.py distilled-int8 --batch 32 --seq 128

Prints the CPU, then each operator type's share of the kernel time and its
milliseconds per call, largest first.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="ONNX model artifact (mk export-onnx / mk quant)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's)")
    a = p.parse_args()

    import onnxruntime as ort

    from mk.core.artifact import open_artifact
    from mk.core.measurement.bench import environment, synthetic_batch

    art = open_artifact(a.model, kind="model")
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="mk-profile-"), "ort")
    if a.threads:
        opts.intra_op_num_threads = a.threads
    session = ort.InferenceSession(str(art.path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    batch = synthetic_batch(a.batch, a.seq, int(art.config().get("vocab_size", 1000)), 0)
    feed = {i.name: batch[i.name] if i.name in batch else np.zeros((a.batch, a.seq), np.int64)
            for i in session.get_inputs()}
    for _ in range(a.calls):
        session.run(None, feed)
    path = session.end_profiling()
    by_op, total = collections.Counter(), 0
    with open(path) as f:
        for event in json.load(f):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"]
                total += event["dur"]
    env = environment(None, None)
    print(f"CPU: {env.get('cpu')} ({' '.join(env.get('cpu_flags', []))}); {a.model} at {a.batch} x {a.seq}, "
          f"{a.calls} calls profiled (the first, with its setup, included)")
    for op, us in by_op.most_common():
        print(f"{op:28} {100 * us / total:5.1f} %  {us / a.calls / 1000:8.2f} ms a call")


if __name__ == "__main__":
    main()
