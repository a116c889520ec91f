"""How a `mk bench` result is saved: CSV, Parquet or JSON via -o, and a plot
(accuracy against throughput, latency bars). The tables on stderr are drawn by
the command line (cli/bench_tables.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mk.core.errors import BadInput

OUTPUT_SUFFIXES = (".csv", ".parquet", ".json")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_paths(output: Path | None, plot: Path | None, force: bool = False, inputs=()) -> None:
    """Refuse an output we cannot or must not write before minutes of measuring (one
    inside an input artifact too: it would add a file its manifest does not list)."""
    from mk.core.outputs import check_output, file_blocker

    for path, suffixes, option in ((output, OUTPUT_SUFFIXES, "-o"), (plot, PLOT_SUFFIXES, "--plot")):
        if path is None:
            continue
        if path.suffix.lower() not in suffixes:
            raise BadInput(f"{option} {path}: unknown file type {path.suffix or '(none)'!r}; "
                           f"use {', '.join(suffixes)}")
        check_output(path, force, inputs=inputs, blocker=file_blocker(_ours(path)), flag=option)


def is_bench_result(path: Path) -> str | None:
    """None when `path` holds a `mk bench` JSON result (which --force may replace)."""
    try:
        schema = json.loads(Path(path).read_text()).get("schema")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        schema = None
    if isinstance(schema, str) and schema.startswith("mk.bench/"):
        return None
    return "a file that is not a `mk bench` result (no mk.bench schema)"


def _ours(path: Path):
    """Which existing file --force may replace: for .json only a bench result; a
    .csv, .parquet or plot cannot say who wrote it, so any regular file."""
    return is_bench_result if path.suffix.lower() == ".json" else None


# ------------------------------------------------------------------- files --

def rows(result: dict) -> list[dict]:
    """One flat row per artifact and shape (or per concurrency level), for CSV and Parquet."""
    out = []
    if result.get("task") == "text-generation":
        return _causal_rows(result)
    if result["mode"] == "offline":
        arts = {a["name"]: a for a in result["artifacts"]}
        for r in result["results"]:
            a = arts[r["artifact"]]
            vp = r["vs_parent"] or {}
            out.append({
                "artifact": r["artifact"], "path": a["path"], "format": a["format"], "runtime": a["runtime"],
                "device": a["device"], "threads": a["threads"],
                "batch_size": r["batch_size"], "seq_len": str(r["seq_len"]),
                "tokens_per_sample": r["tokens_per_sample"], "calls": r["calls"],
                **{f"latency_{k}_ms": v for k, v in r["latency_ms"].items()},
                "throughput_median": r["throughput"]["median"], "throughput_min": r["throughput"]["min"],
                "throughput_max": r["throughput"]["max"], "throughput_spread_pct": r["throughput"]["spread_pct"],
                "speedup": r["speedup"]["median"], "speedup_vs": r["speedup"]["vs"],
                "parent": vp.get("parent"), "vs_parent": vp.get("median"), "faster_than_parent": vp.get("faster"),
                "size_bytes": a["size_bytes"], "parameters": a["parameters"], "load_s": a["load_s"],
                "load_rss_bytes": a["load_rss_bytes"], "peak_rss_bytes": a["peak_rss_bytes"],
                "gpu_peak_bytes": a["gpu_peak_bytes"],
                "accuracy": a["accuracy"], "macro_f1": a["macro_f1"],
            })
    else:
        for r in result["results"]:
            out.append({"url": result["url"], "model": result["model"],
                        **{k: v for k, v in r.items() if k != "latency_ms"},
                        **{f"latency_{k}_ms": v for k, v in r["latency_ms"].items()}})
    return out


def _causal_rows(result: dict) -> list[dict]:
    """One flat row per causal LM, batch size and prompt length."""
    arts = {a["name"]: a for a in result["artifacts"]}
    out = []
    for r in result["results"]:
        a, vp = arts[r["artifact"]], r["vs_parent"] or {}
        out.append({
            "artifact": r["artifact"], "path": a["path"], "format": a["format"], "runtime": a["runtime"],
            "device": a["device"], "threads": a["threads"], "batch_size": r["batch_size"],
            "prompt_len": r["seq_len"], "new_tokens": r["new_tokens"], "calls": r["calls"],
            "generated_tokens": r["generated_tokens"],
            "prefill_tokens_s": r["prefill"]["tokens_per_s"]["median"],
            **{f"prefill_{k}_ms": v for k, v in r["prefill"]["latency_ms"].items()},
            **{f"ttft_{k}_ms": v for k, v in r["ttft_ms"].items()},
            **{f"total_{k}_ms": v for k, v in r["total_ms"].items()},
            "decode_tokens_s": r["throughput"]["median"], "decode_tokens_s_min": r["throughput"]["min"],
            "decode_tokens_s_max": r["throughput"]["max"], "decode_spread_pct": r["throughput"]["spread_pct"],
            **{f"itl_{k}_ms": v for k, v in r["latency_ms"].items()},
            "speedup": r["speedup"]["median"], "speedup_vs": r["speedup"]["vs"],
            "parent": vp.get("parent"), "vs_parent": vp.get("median"), "faster_than_parent": vp.get("faster"),
            "size_bytes": a["size_bytes"], "parameters": a["parameters"], "load_s": a["load_s"],
            "peak_rss_bytes": a["peak_rss_bytes"], "gpu_peak_bytes": a["gpu_peak_bytes"],
            "perplexity": a["perplexity"], "exact_match": a["accuracy"],
        })
    return out


def write_output(result: dict, path: Path, force: bool = False) -> Path:
    """-o results.csv | .parquet (polars) | .json (the whole result)."""
    from mk.core.outputs import atomic_file

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise BadInput(f"-o {path}: unknown file type; use {', '.join(OUTPUT_SUFFIXES)}")
    with atomic_file(path, force, _ours(path)) as tmp:
        if suffix == ".json":
            tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        else:
            import polars as pl

            df = pl.DataFrame(rows(result), infer_schema_length=None)
            df.write_csv(tmp) if suffix == ".csv" else df.write_parquet(tmp)
    return path


# -------------------------------------------------------------------- plot --

def plot(result: dict, path: Path, force: bool = False) -> Path:
    """Offline: accuracy against throughput (marker area ∝ size on disk) and p50
    latency bars with p99 whiskers per artifact and shape. HTTP: throughput and
    latency against concurrency."""
    import matplotlib

    from mk.core.outputs import atomic_file

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    try:
        if result["mode"] == "offline":
            _plot_offline(result, left, right)
        else:
            _plot_http(result, left, right)
        fig.tight_layout()
        with atomic_file(path, force) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix[1:].lower())
    finally:
        plt.close(fig)
    return path


def _plot_offline(result: dict, left, right) -> None:
    import numpy as np

    arts = result["artifacts"]
    names = [a["name"] for a in arts]
    causal = result.get("task") == "text-generation"  # throughput: decode tokens/s; latency: inter-token
    # Scatter at the largest batch of the first sequence length: the throughput view.
    seq0 = result["results"][0]["seq_len"]
    bmax = max(r["batch_size"] for r in result["results"] if r["seq_len"] == seq0)
    thr = {r["artifact"]: r["throughput"]["median"] for r in result["results"]
           if r["seq_len"] == seq0 and r["batch_size"] == bmax}
    sizes = np.array([a["size_bytes"] or 0 for a in arts], dtype=float)
    area = 60 + 900 * sizes / sizes.max() if sizes.max() > 0 else np.full(len(arts), 200.0)
    colors = [f"C{i % 10}" for i in range(len(arts))]
    any_acc = False
    for a, s, c in zip(arts, area, colors):
        if a["accuracy"] is None:
            continue
        any_acc = True
        left.scatter(thr[a["name"]], a["accuracy"], s=s, color=c, alpha=0.6, edgecolors="black")
        left.annotate(f"{a['name']}\n{a['size_bytes'] / 2**20:.1f} MB", (thr[a["name"]], a["accuracy"]),
                      textcoords="offset points", xytext=(8, 6), fontsize=8)
    if not any_acc:  # still show the speeds, on a line of their own
        for i, (a, s, c) in enumerate(zip(arts, area, colors)):
            left.scatter(thr[a["name"]], 0, s=s, color=c, alpha=0.6, edgecolors="black")
            left.annotate(a["name"], (thr[a["name"]], 0), textcoords="offset points", xytext=(8, 6), fontsize=8)
        left.set_yticks([])
        left.text(0.5, 0.9, "no accuracy measured (pass --data)", transform=left.transAxes, ha="center")
    if thr and max(thr.values()) / max(min(thr.values()), 1e-9) > 30:
        left.set_xscale("log")
    left.set_xlabel(f"{'decode, tokens/s' if causal else 'throughput, samples/s'} (batch {bmax}, "
                    f"{'prompt' if causal else 'seq'} {seq0})")
    left.set_ylabel(f"{'exact match' if causal else 'accuracy'} (test split)")
    left.set_title(f"{'exact match vs decode speed' if causal else 'accuracy vs throughput'} "
                   "(marker size = size on disk)")
    left.grid(alpha=0.3)

    shapes = list(dict.fromkeys((r["batch_size"], r["seq_len"]) for r in result["results"]))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(shapes))
    for i, (name, c) in enumerate(zip(names, colors)):
        by = {(r["batch_size"], r["seq_len"]): r["latency_ms"] for r in result["results"] if r["artifact"] == name}
        p50 = np.array([by[s]["p50"] for s in shapes])
        p99 = np.array([by[s]["p99"] for s in shapes])
        right.bar(x + i * width, p50, width, color=c, label=name,
                  yerr=[np.zeros_like(p50), np.maximum(p99 - p50, 0)], capsize=3)
    lats = [r["latency_ms"]["p50"] for r in result["results"] if r["latency_ms"]["p50"]]
    if lats and max(lats) / max(min(lats), 1e-9) > 30:
        right.set_yscale("log")
    right.set_xticks(x + width * (len(names) - 1) / 2, [f"b{b} s{s}" for b, s in shapes])
    right.set_ylabel(f"{'inter-token ' if causal else ''}latency, ms (bar p50, whisker p99)")
    right.set_title("latency per batch and sequence length")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)


def _plot_http(result: dict, left, right) -> None:
    for b in sorted({r["batch_size"] for r in result["results"]}):
        rs = [r for r in result["results"] if r["batch_size"] == b]
        c = [r["concurrency"] for r in rs]
        left.plot(c, [r["throughput_rps"] for r in rs], marker="o", label=f"batch {b}")
        right.plot(c, [r["latency_ms"]["p50"] for r in rs], marker="o", label=f"p50, batch {b}")
        right.plot(c, [r["latency_ms"]["p99"] for r in rs], marker="^", linestyle="--", label=f"p99, batch {b}")
    for ax, title, ylabel in ((left, "achieved throughput", "requests/s"), (right, "latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {result['url']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
