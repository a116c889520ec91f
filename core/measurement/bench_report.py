"""How a `mk bench` result is shown and saved: a rich table on stderr, CSV,
Parquet or JSON via -o, and a plot (accuracy against throughput, latency bars)."""

from __future__ import annotations

import json
from pathlib import Path

from mk.core.errors import BadInput

OUTPUT_SUFFIXES = (".csv", ".parquet", ".json")
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def check_paths(output: Path | None, plot: Path | None, force: bool = False) -> None:
    """Refuse an output we cannot or must not write before minutes of measuring."""
    from mk.core.outputs import check_output, file_blocker

    for path, suffixes, option in ((output, OUTPUT_SUFFIXES, "-o"), (plot, PLOT_SUFFIXES, "--plot")):
        if path is None:
            continue
        if path.suffix.lower() not in suffixes:
            raise BadInput(f"{option} {path}: unknown file type {path.suffix or '(none)'!r}; "
                           f"use {', '.join(suffixes)}")
        check_output(path, force, blocker=file_blocker(_ours(path)))


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


# ------------------------------------------------------------------ tables --

def _fmt(x, spec: str = ".3g", none: str = "–") -> str:
    if x is None:
        return none
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _num(x, digits: int = 3) -> str:
    """Significant digits without exponents: 0.325, 78.4, 1005, 36560."""
    if x is None:
        return "–"
    return f"{x:.0f}" if abs(x) >= 10 ** (digits - 1) else f"{x:.{digits}g}"


def _bytes(n) -> str:
    from mk.core.artifact import human_bytes

    return "–" if n is None else human_bytes(n)


def _params(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def offline_tables(result: dict):
    """(speed table, artifact table) as rich Tables."""
    from rich.table import Table

    speed = Table(title="mk bench: latency and throughput", title_justify="left", show_lines=False)
    for col, just in (("artifact", "left"), ("runtime", "left"), ("batch", "right"), ("seq", "right"),
                      ("p50 ms", "right"), ("p90 ms", "right"), ("p99 ms", "right"),
                      ("samples/s", "right"), ("±%", "right"), ("speed-up", "right"), ("vs parent", "left")):
        speed.add_column(col, justify=just, no_wrap=col not in ("artifact",))
    runtimes = {a["name"]: f"{a['runtime']} {a['device']}" for a in result["artifacts"]}
    previous = None
    for row in result["results"]:
        shape = (row["batch_size"], row["seq_len"])
        if previous is not None and shape != previous:
            speed.add_section()
        previous = shape
        lat, thr, su, vp = row["latency_ms"], row["throughput"], row["speedup"], row["vs_parent"]
        if vp is None:
            parent = ""
        elif vp["faster"]:
            parent = f"[green]{vp['median']:.2f}× {vp['parent']}[/]"
        else:
            parent = f"[bold yellow]⚠ no faster ({_fmt(vp['median'], '.2f')}× {vp['parent']})[/]"
        seq = row["seq_len"] if row["seq_len"] != "data" else f"data≈{_fmt(row.get('padded_len'), '.0f')}"
        speed.add_row(row["artifact"], runtimes.get(row["artifact"], ""), str(row["batch_size"]), str(seq),
                      _num(lat["p50"]), _num(lat["p90"]), _num(lat["p99"]),
                      _num(thr["median"], 4), _fmt(thr["spread_pct"], ".0f"),
                      f"{_fmt(su['median'], '.2f')}×", parent)

    arts = Table(title="mk bench: artifacts", title_justify="left")
    for col, just in (("artifact", "left"), ("format", "left"), ("size", "right"), ("params", "right"),
                      ("load s", "right"), ("load RSS", "right"), ("peak RSS", "right"), ("GPU peak", "right"),
                      ("accuracy", "right"), ("macro-F1", "right"), ("parent", "left")):
        arts.add_column(col, justify=just, no_wrap=col != "artifact")
    gpu = any(a.get("gpu_peak_bytes") for a in result["artifacts"])
    for a in result["artifacts"]:
        arts.add_row(a["name"], a["format"], _bytes(a["size_bytes"]), _params(a["parameters"]),
                     _fmt(a["load_s"], ".2f"), _bytes(a["load_rss_bytes"]), _bytes(a["peak_rss_bytes"]),
                     _bytes(a["gpu_peak_bytes"]) if gpu else "–",
                     _fmt(a["accuracy"], ".4f"), _fmt(a["macro_f1"], ".4f"), a["parent"] or "")
    return speed, arts


def http_table(result: dict):
    from rich.table import Table

    t = Table(title=f"mk bench: {result['url']} (model {result['model']})", title_justify="left")
    for col in ("concurrency", "batch", "requests", "errors", "error %", "req/s", "samples/s",
                "p50 ms", "p90 ms", "p99 ms", "accuracy"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in result["results"]:
        lat = r["latency_ms"]
        err = f"[red]{100 * r['error_rate']:.1f}[/]" if r["error_rate"] else "0"
        t.add_row(str(r["concurrency"]), str(r["batch_size"]), str(r["requests"]), str(r["errors"]), err,
                  _num(r["throughput_rps"], 4), _num(r["throughput_samples_s"], 4),
                  _num(lat["p50"]), _num(lat["p90"]), _num(lat["p99"]), _fmt(r.get("accuracy"), ".4f"))
    return t


def print_report(result: dict, console) -> None:
    """The tables, the environment in one line, and each warning, on stderr."""
    env = result["environment"]
    if result["mode"] == "offline":
        for table in offline_tables(result):
            console.print(table)
        threads = env["threads"]["used"]
        gpu = f", GPU {env['gpu']['name']}" if env.get("gpu") else ""
        s = result["settings"]
        how = f"{s['iters']} calls" if s.get("iters") else f"{s['duration_s'] or 3.0:g} s"
        console.print(f"[dim]{env['cpu']}, {env['cores_physical']} cores, {threads} threads{gpu}; "
                      f"{how} per artifact and shape in {s['rounds']} interleaved rounds after "
                      f"{s['warmup']} warm-up calls; medians, ±% = spread of rounds[/]",
                      markup=True, highlight=False)
    else:
        console.print(http_table(result))
    for w in result.get("warnings", []):
        console.print(f"[bold yellow]warning:[/] {w}", markup=True, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------- files --

def rows(result: dict) -> list[dict]:
    """One flat row per artifact and shape (or per concurrency level), for CSV and Parquet."""
    out = []
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
    left.set_xlabel(f"throughput, samples/s (batch {bmax}, seq {seq0})")
    left.set_ylabel("accuracy (test split)")
    left.set_title("accuracy vs throughput (marker size = size on disk)")
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
    right.set_ylabel("latency, ms (bar p50, whisker p99)")
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
