"""The tables of a `mk bench` result, drawn with rich on stderr."""

from __future__ import annotations

from mk.cli.output import warn


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
    for row in _by_shape(speed, result["results"]):
        lat, thr, su = row["latency_ms"], row["throughput"], row["speedup"]
        seq = row["seq_len"] if row["seq_len"] != "data" else f"data≈{_fmt(row.get('padded_len'), '.0f')}"
        speed.add_row(row["artifact"], runtimes.get(row["artifact"], ""), str(row["batch_size"]), str(seq),
                      _num(lat["p50"]), _num(lat["p90"]), _num(lat["p99"]),
                      _num(thr["median"], 4), _fmt(thr["spread_pct"], ".0f"),
                      f"{_fmt(su['median'], '.2f')}×", _vs_parent(row["vs_parent"]))

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


def _by_shape(table, rows: list[dict]):
    """The rows, with a section line in `table` wherever the shape (batch × seq) changes."""
    previous = None
    for row in rows:
        shape = (row["batch_size"], row["seq_len"])
        if previous is not None and shape != previous:
            table.add_section()
        previous = shape
        yield row


def _vs_parent(vp) -> str:
    if vp is None:
        return ""
    if vp["faster"]:
        return f"[green]{vp['median']:.2f}× {vp['parent']}[/]"
    if not vp.get("promised", True):  # tuned from it: no speed was promised
        return f"{_fmt(vp['median'], '.2f')}× {vp['parent']}"
    return f"[bold yellow]⚠ no faster ({_fmt(vp['median'], '.2f')}× {vp['parent']})[/]"


def causal_tables(result: dict):
    """(generation table, artifact table) of a text-generation result as rich Tables."""
    from rich.table import Table

    n = result["settings"]["new_tokens"]
    speed = Table(title=f"mk bench: generation ({n} new tokens a call, greedy)", title_justify="left")
    for col in ("artifact", "batch", "prompt", "prefill tok/s", "TTFT p50 ms", "decode tok/s", "±%",
                "ITL p50 ms", "ITL p99 ms", "speed-up", "vs parent"):
        speed.add_column(col, justify="left" if col in ("artifact", "vs parent") else "right",
                         no_wrap=col != "artifact")
    for row in _by_shape(speed, result["results"]):
        itl, thr = row["latency_ms"], row["throughput"]
        speed.add_row(row["artifact"], str(row["batch_size"]), str(row["seq_len"]),
                      _num(row["prefill"]["tokens_per_s"]["median"], 4), _num(row["ttft_ms"]["p50"]),
                      _num(thr["median"], 4), _fmt(thr["spread_pct"], ".0f"), _num(itl["p50"]), _num(itl["p99"]),
                      f"{_fmt(row['speedup']['median'], '.2f')}×", _vs_parent(row["vs_parent"]))

    arts = Table(title="mk bench: artifacts", title_justify="left")
    for col in ("artifact", "runtime", "size", "params", "load s", "peak RSS", "GPU peak", "perplexity",
                "exact match", "parent"):
        arts.add_column(col, justify="left" if col in ("artifact", "runtime", "parent") else "right",
                        no_wrap=col != "artifact")
    for a in result["artifacts"]:
        arts.add_row(a["name"], f"{a['runtime']} {a['device']}", _bytes(a["size_bytes"]), _params(a["parameters"]),
                     _fmt(a["load_s"], ".2f"), _bytes(a["peak_rss_bytes"]), _bytes(a["gpu_peak_bytes"]),
                     _num(a["perplexity"], 4), _fmt(a["accuracy"], ".4f"), a["parent"] or "")
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


def print_report(result: dict, console=None) -> None:
    """The tables, the environment in one line, and each warning, on stderr."""
    if console is None:
        from mk.core.console import console
    env = result["environment"]
    if result["mode"] == "offline":
        causal = result.get("task") == "text-generation"
        for table in (causal_tables if causal else offline_tables)(result):
            console.print(table)
        threads = env["threads"]["used"]
        gpu = f", GPU {env['gpu']['name']}" if env.get("gpu") else ""
        s = result["settings"]
        if causal:
            how = f"{-(-s['iters'] // s['rounds']) if s.get('iters') else 1} generation call(s)"
        else:
            how = f"{s['iters']} calls" if s.get("iters") else f"{s['duration_s'] or 3.0:g} s"
        load = (env.get("load_average") or {}).get("before") if causal else None  # encoders' line as it was
        console.print(f"[dim]{env['cpu']}, {env['cores_physical']} cores, {threads} threads{gpu}"
                      f"{f', load average {load:g}' if load is not None else ''}; "
                      f"{how} per artifact and shape{' a round' if causal else ''} in {s['rounds']} interleaved "
                      f"rounds after {s['warmup']} warm-up calls; medians, ±% = spread of rounds[/]",
                      markup=True, highlight=False)
    else:
        console.print(http_table(result))
    for w in result.get("warnings", []):
        warn(w, console)
