#!/usr/bin/env python
"""Speed and accuracy of mk's ONNX variants against torch fp32 eager, in one run.

    flock /tmp/mk-bench.lock python scripts/bench_quant.py --model .mkwork/tuned --data .mkwork/data

Builds, from one fine-tuned safetensors model, with mk's own core functions:

    ORT fp32            mk export-onnx MODEL
    ORT fp32 optimized  mk export-onnx MODEL --optimize
    ORT int8 dynamic    mk quant ONNX --method dynamic   (the default `mk quant`)
    ORT int8 static     mk quant ONNX --method static

and with --sweep the alternatives the defaults were chosen against (per-tensor
weights, reduce-range, transformer fusions before quantizing, quantizing Gather
and Attention too, the dynamo exporter, static calibration methods, graph
optimisation levels). Every model is measured through mk's runtime interface
(`load_runtime`, as `mk bench` does) at each batch size, sequence 128, with the
same thread count for torch and ONNX Runtime, interleaved (A B C … A B C …) so
drift hits all alike; the table shows medians, their spread, the ratio to torch
fp32 eager from the same run, and accuracy / macro-F1 on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="fine-tuned safetensors model artifact")
    p.add_argument("--data", help="dataset artifact (default: the model's lineage)")
    p.add_argument("--work", help="folder for the built variants (default: a temporary folder)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=9, help="interleaved rounds; medians over them")
    p.add_argument("--min-time", type=float, default=0.25, help="seconds of calls per measurement at least")
    p.add_argument("--sweep", action="store_true", help="also measure the alternatives to the defaults")
    p.add_argument("--profile", action="store_true", help="ONNX Runtime per-operator time of the int8 variants")
    p.add_argument("--json-out", help="write the results as JSON")
    return p.parse_args()


def build(model: Path, data: Path | None, work: Path, sweep: bool) -> list[dict]:
    """The variants as artifacts; each {name, path, what}."""
    from mk.core.compression.export import export_onnx
    from mk.core.compression.quantize import QuantSettings, quantize

    def exp(name, **kw):
        out = work / name
        if not (out / "mk.json").is_file():
            export_onnx(model, out, data=data, force=True, **kw)
        return out

    def quant(name, parent, method="dynamic", **kw):
        out = work / name
        if not (out / "mk.json").is_file():
            try:
                quantize(parent, out, method=method, data=data, max_drop=100.0, force=True,
                         settings=QuantSettings(method=method, **kw))
            except Exception as e:  # a sweep variant that ONNX Runtime cannot build is reported, not fatal
                print(f"  {name}: {e}", file=sys.stderr)
                return None
        return out

    from mk.core.cpu import int8_settings, this_cpu

    other_range = not int8_settings(this_cpu().flags, "dynamic")["reduce_range"]  # the sweep tries the other one
    other_name, other_flag = ("reduce-range", "--reduce-range") if other_range else ("full-range", "--full-range")
    fp32 = exp("onnx-fp32")
    variants = [
        {"name": "torch fp32 eager", "path": model, "what": "transformers, SDPA attention"},
        {"name": "ORT fp32", "path": fp32, "what": "mk export-onnx"},
        {"name": "ORT fp32 optimized", "path": exp("onnx-fp32-opt", optimize=True), "what": "--optimize"},
        {"name": "ORT int8 dynamic", "path": quant("int8-dynamic", fp32), "what": "mk quant (default)"},
        {"name": "ORT int8 static", "path": quant("int8-static", fp32, method="static"),
         "what": "--method static (QDQ, minmax, 256 rows)"},
    ]
    if sweep:
        dyn = fp32
        more = [
            ("int8 dyn per-tensor", quant("sw-dyn-per-tensor", dyn, per_channel=False), "--per-tensor"),
            (f"int8 dyn {other_name}", quant(f"sw-dyn-{other_name}", dyn, reduce_range=other_range), other_flag),
            ("int8 dyn MatMul only", quant("sw-dyn-matmul", dyn, op_types=["MatMul"]),
             "--op-types MatMul (embeddings stay fp32)"),
            ("int8 dyn all ops", quant("sw-dyn-all-ops", dyn, op_types=[], matmul_const_b_only=False),
             "ORT's default op list, activation MatMuls too"),
            ("int8 dyn fused", quant("sw-dyn-fused", dyn, fuse=True),
             "--fuse (Attention stays fp32)"),
            ("int8 dyn fused+Attention", quant("sw-dyn-fused-attn", dyn, fuse=True,
                                               op_types=["MatMul", "Gather", "Attention"]),
             "--fuse --op-types MatMul,Gather,Attention (QAttention)"),
            ("int8 dyn on dynamo export", quant("sw-dyn-dynamo", exp("sw-onnx-dynamo", exporter="dynamo")),
             "export with dynamo=True"),
            ("ORT fp32 dynamo export", work / "sw-onnx-dynamo", "dynamo=True, no attention fusion"),
            ("int8 static per-tensor", quant("sw-st-per-tensor", fp32, method="static", per_channel=False),
             "--method static --per-tensor"),
            (f"int8 static {other_name}", quant(f"sw-st-{other_name}", fp32, method="static",
                                                reduce_range=other_range), f"--method static {other_flag}"),
            ("int8 static entropy", quant("sw-st-entropy", fp32, method="static", calib_method="entropy"),
             "--method static --calib-method entropy"),
            ("int8 static percentile", quant("sw-st-percentile", fp32, method="static", calib_method="percentile"),
             "--method static --calib-method percentile"),
        ]
        variants += [{"name": n, "path": p, "what": w} for n, p, w in more if p is not None]
    return variants


def real_inputs(dataset, batch: int, seq: int) -> dict:
    """`batch` rows of `seq` real tokens: test-split rows laid end to end (each
    row's [CLS] … [SEP] kept), full attention. Speed does not depend on the token
    values, but nothing here is made up."""
    from mk.core.dataset import load_split

    split = load_split(dataset, "test")
    ids, mask = split["input_ids"], split["attention_mask"].astype(bool)
    stream = np.concatenate([ids[i][mask[i]] for i in range(len(ids))])
    need = batch * seq
    stream = np.resize(stream, need) if len(stream) < need else stream[:need]
    input_ids = stream.reshape(batch, seq).astype(np.int64)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
            "token_type_ids": np.zeros_like(input_ids)}


def session_with(path: Path, level: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def timed(runtime, feed, min_time: float) -> float:
    """Seconds per call: enough back-to-back calls to fill `min_time`."""
    n, t0 = 0, time.perf_counter()
    while True:
        runtime(feed)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / n


def profile_ops(path: Path, feed: dict, threads: int) -> list[tuple[str, float]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "mk-bench-quant-prof")
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(3):
        s.run(None, feed)
    trace = s.end_profiling()
    per_op: dict[str, float] = {}
    for e in json.loads(Path(trace).read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0) + e["dur"] / 3e3
    os.unlink(trace)
    return sorted(per_op.items(), key=lambda kv: -kv[1])


def environment(threads: int) -> dict:
    import onnxruntime
    import torch
    import transformers

    from mk.core.cpu import int8_settings, this_cpu

    cpu = this_cpu()
    return {**cpu.record(), "cpu": cpu.model, "int8_settings": int8_settings(cpu.flags, "dynamic"),
            "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__}


def cpu_line(env: dict) -> str:
    """The CPU every figure comes from: model, the flags that decide int8, and mk's choice there."""
    chosen = ", ".join(f"{k} {v}" for k, v in env["int8_settings"].items())
    return (f"CPU: {env['cpu']} ({env['cores']} cores; {' '.join(env['flags']) or 'no SIMD flags read'}; "
            f"int8 path {env['int8_path']}: mk quant chooses {chosen}); torch {env['torch']}, "
            f"transformers {env['transformers']}, onnxruntime {env['onnxruntime']}")


def main() -> None:
    args = parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mk.core.artifact import open_artifact
    from mk.core.console import configure
    from mk.core.dataset import dataset_for
    from mk.core.evaluation import classification_metrics, predict
    from mk.core.runtime import load_runtime

    configure(quiet=True)
    model = open_artifact(args.model, kind="model")
    dataset = dataset_for(model, args.data)
    work = Path(args.work or tempfile.mkdtemp(prefix="mk-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"building variants in {work}", file=sys.stderr)
    variants = build(model.path, dataset.path, work, args.sweep)

    env = environment(args.threads)
    print(cpu_line(env), file=sys.stderr)
    runtimes = {}
    from mk.core.dataset import load_split

    test = load_split(dataset, "test")
    n_labels = len(model.labels)
    if args.sweep:  # the default int8 model under other session settings
        default = next(v for v in variants if v["name"] == "ORT int8 dynamic")
        variants += [{"name": "int8 dyn, graph opt basic", "path": default["path"], "session": ("BASIC", args.threads),
                      "what": "default model, ORT_ENABLE_BASIC (no MatMulInteger fusions)"},
                     {"name": "int8 dyn, graph opt extended", "path": default["path"],
                      "session": ("EXTENDED", args.threads), "what": "default model, ORT_ENABLE_EXTENDED"},
                     {"name": "int8 dyn, 1 thread", "path": default["path"], "session": ("ALL", 1),
                      "what": "default model, intra-op threads 1 (torch keeps --threads)"}]
    reference = None
    for v in variants:
        art = open_artifact(v["path"], kind="model")
        runtimes[v["name"]] = load_runtime(art, "cpu", args.threads)
        if "session" in v:
            runtimes[v["name"]].session = session_with(art.path / "model.onnx", *v.pop("session"))
        preds = predict(runtimes[v["name"]], test, 32, v["name"]).argmax(-1)
        reference = preds if reference is None else reference
        m = classification_metrics(preds, test["labels"], n_labels)
        v.update(accuracy=m["accuracy"], macro_f1=m["macro_f1"], test_rows=m["n"],
                 agreement=float(np.mean(preds == reference)),
                 bytes=sum(p.stat().st_size for p in Path(v["path"]).iterdir()
                           if p.suffix in (".onnx", ".data", ".safetensors")))
        print(f"  {v['name']:28s} accuracy {100 * m['accuracy']:.2f}%", file=sys.stderr)

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = {}
    for b in batch_sizes:
        feed = real_inputs(dataset, b, args.seq_len)
        for v in variants:  # warm-up
            timed(runtimes[v["name"]], feed, 0.2)
        samples = {v["name"]: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                samples[v["name"]].append(timed(runtimes[v["name"]], feed, args.min_time))
        base = statistics.median(samples[variants[0]["name"]])
        for v in variants:
            s = samples[v["name"]]
            med = statistics.median(s)
            results.setdefault(v["name"], {})[b] = {
                "median_ms": 1e3 * med, "min_ms": 1e3 * min(s), "max_ms": 1e3 * max(s),
                "items_per_s": b / med, "speedup_vs_torch": base / med}

    head = f"| variant | {' | '.join(f'batch {b} ms (spread)' for b in batch_sizes)} | " \
           f"{' | '.join(f'× torch @{b}' for b in batch_sizes)} | accuracy | macro-F1 | same answer as torch | size MB | what |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in variants:
        r = results[v["name"]]
        lines.append(
            f"| {v['name']} | "
            + " | ".join(f"{r[b]['median_ms']:.1f} ({r[b]['min_ms']:.0f}–{r[b]['max_ms']:.0f})" for b in batch_sizes)
            + " | " + " | ".join(f"{r[b]['speedup_vs_torch']:.2f}×" for b in batch_sizes)
            + f" | {100 * v['accuracy']:.2f}% | {100 * v['macro_f1']:.2f}% | {100 * v['agreement']:.1f}% "
            f"| {v['bytes'] / 1e6:.1f} | {v['what']} |")
    print(f"\n{cpu_line(env)}\nsequence {args.seq_len}, threads {args.threads} (torch and ORT), {args.repeats} "
          f"interleaved rounds, medians; test split of {dataset.path} ({variants[0]['test_rows']} rows)")
    print("\n".join(lines))

    if args.profile:
        feed = real_inputs(dataset, max(batch_sizes), args.seq_len)
        for v in variants:
            if ("int8" in v["name"] or v["name"].startswith("ORT fp32")) and "," not in v["name"]:
                ops = profile_ops(Path(v["path"]), feed, args.threads)
                total = sum(t for _, t in ops)
                top = ", ".join(f"{k} {t:.0f} ms ({100 * t / total:.0f}%)" for k, t in ops[:6])
                print(f"\nprofile {v['name']} @ batch {max(batch_sizes)}: {total:.0f} ms in kernels: {top}")
                v["profile_ms"] = dict(ops)

    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"environment": env, "seq_len": args.seq_len, "repeats": args.repeats, "dataset": str(dataset.path),
             "variants": [{**{k: (str(x) if isinstance(x, Path) else x) for k, x in v.items()},
                           "speed": results[v["name"]]} for v in variants]}, indent=2))


if __name__ == "__main__":
    main()
