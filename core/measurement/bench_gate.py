"""`mk bench --baseline results.json --max-regress 5%`: a gate for Makefiles and CI.

A run is compared with a saved one (`mk bench … -o results.json`, or the
`--json` output) measure by measure; exit 3 (GateFailed) when any got worse by
more than the allowance. Worse means, relative to the baseline:

- offline: throughput lower, p99 latency higher, accuracy lower (for causal LMs:
  decode tokens/s, inter-token p99 and exact match; never against an encoder's result);
- HTTP: achieved requests/s lower, p99 latency higher; the error rate higher by
  more than the allowance in absolute terms (5% allows 0.00 → 0.05).

Rows are matched by artifact name (the folder name; `--baseline-as OLD=NEW` pairs
renamed ones) and batch size × sequence length, or by concurrency and batch size;
rows only one side has are said as warnings, not failed; no row in common is exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from mk.core.errors import BadInput, GateFailed


def parse_allowance(text: str) -> float:
    """`5%` or `5` → 0.05: a number is always a percentage (`0.5` is half a percent),
    so the option reads one way whatever its size."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1] if raw.endswith("%") else raw) / 100
    except ValueError:
        raise BadInput(f"--max-regress {text!r}: expected a percentage like 5%") from None
    if not 0 <= value < 1:  # also refuses nan
        raise BadInput(f"--max-regress {text!r}: expected between 0% and 100%")
    return value


def load_baseline(path: Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"--baseline {path}: no such file",
                       hint="save a run first: mk bench … -o results.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--baseline {path}: unreadable ({e})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"--baseline {path}: not JSON ({e.msg} at line {e.lineno})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not (isinstance(schema, str) and schema.startswith("mk.bench/")):
        raise BadInput(f"--baseline {path}: not a `mk bench` result (schema {schema!r}, expected mk.bench/1)")
    if schema != "mk.bench/1":
        raise BadInput(f"--baseline {path}: schema {schema} is not one this mk reads (mk.bench/1)")
    if not isinstance(data.get("results"), list):
        raise BadInput(f"--baseline {path}: no results list")
    if problems := _shape_problems(data):
        raise BadInput(f"--baseline {path}: malformed: {'; '.join(problems[:3])}")
    return data


_NUMBER = (int, float, type(None))
# field → (type, required): what the gate reads of each row, checked up front so that a
# hand-edited baseline is exit 2 naming the field, not a KeyError in the middle
_ROW_FIELDS = {
    "offline": {"artifact": (str, True), "batch_size": (int, True), "seq_len": ((int, str), True),
                "throughput": (dict, False), "throughput.median": (_NUMBER, False),
                "latency_ms": (dict, False), "latency_ms.p99": (_NUMBER, False)},
    "http": {"concurrency": (int, True), "batch_size": (int, True), "throughput_rps": (_NUMBER, False),
             "latency_ms": (dict, False), "latency_ms.p99": (_NUMBER, False), "error_rate": (_NUMBER, False)},
}


def _shape_problems(result: dict) -> list[str]:
    mode = result.get("mode", "offline")
    if mode not in _ROW_FIELDS:
        return [f"mode {mode!r} (expected offline or http)"]
    problems = []
    for i, row in enumerate(result["results"]):
        if not isinstance(row, dict):
            problems.append(f"results[{i}] is a {type(row).__name__}, expected an object")
            continue
        for field, (types, required) in _ROW_FIELDS[mode].items():
            outer, _, inner = field.partition(".")
            holder = row.get(outer) if inner else row
            key = inner or outer
            if not isinstance(holder, dict) or key not in holder:
                if required:
                    problems.append(f"results[{i}] has no {field!r}")
                continue
            value = holder[key]
            if not isinstance(value, types) or isinstance(value, bool) or value != value:  # NaN ≠ NaN
                problems.append(f"results[{i}].{field} is {value!r}")
    for i, art in enumerate(result.get("artifacts") or []):
        if not (isinstance(art, dict) and isinstance(art.get("name"), str)
                and isinstance(art.get("accuracy"), _NUMBER) and not isinstance(art.get("accuracy"), bool)):
            problems.append(f"artifacts[{i}] needs a name and a numeric accuracy (or null)")
    return problems


def parse_renames(text: str | None) -> dict[str, str]:
    """`--baseline-as old=new,…`: read the baseline's artifact `old` as this run's `new`."""
    renames = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise BadInput(f"--baseline-as {text!r}: expected BASELINE_NAME=NAME pairs, comma separated")
        renames[old.strip()] = new.strip()
    return renames


def _offline_rows(result: dict) -> dict:
    acc = {a["name"]: a.get("accuracy") for a in result.get("artifacts", [])}
    return {(r["artifact"], r["batch_size"], str(r["seq_len"])): {
        "throughput": (r.get("throughput") or {}).get("median"),
        "p99": (r.get("latency_ms") or {}).get("p99"),
        "accuracy": acc.get(r["artifact"]),
    } for r in result["results"]}


def _http_rows(result: dict) -> dict:
    return {(r["concurrency"], r["batch_size"]): {
        "throughput": r.get("throughput_rps"),
        "p99": (r.get("latency_ms") or {}).get("p99"),
        "error_rate": r.get("error_rate"),
    } for r in result["results"]}


def _label(key: tuple, mode: str) -> str:
    if mode == "offline":
        return f"{key[0]} at batch {key[1]}, seq {key[2]}"
    return f"concurrency {key[0]}, batch {key[1]}"


def _task(result: dict) -> str:
    return f"{result['task']} models" if result.get("task") else "encoders"


def compare(current: dict, baseline: dict, allowance: float, renames: dict[str, str] | None = None) -> dict:
    """What got worse by more than the allowance: {"checked", "regressions", "unmatched"}.
    Offline rows match by artifact name only (`renames` maps a baseline name to one of
    this run's, for artifacts saved under another folder name): a baseline of another
    model must not pass the gate by lining rows up by position."""
    mode = current.get("mode", "offline")
    if baseline.get("mode", "offline") != mode:
        raise BadInput(f"--baseline: a {baseline.get('mode')} result cannot gate a {mode} run")
    if baseline.get("task") != current.get("task"):  # encoder results carry no task: samples/s, not tokens/s
        raise BadInput(f"--baseline: a result of {_task(baseline)} cannot gate a run of {_task(current)}")
    rows = _offline_rows if mode == "offline" else _http_rows
    cur, base = rows(current), rows(baseline)
    if mode == "offline" and renames:
        unknown = sorted(set(renames) - {k[0] for k in base})
        if unknown:
            raise BadInput(f"--baseline-as: the baseline has no artifact {', '.join(unknown)}",
                           hint=f"its artifacts: {', '.join(sorted({k[0] for k in base}))}")
        base = {(renames.get(k[0], k[0]), *k[1:]): v for k, v in base.items()}
    common = [k for k in cur if k in base]
    if not common:
        names = (f" (baseline: {', '.join(sorted({k[0] for k in base}))}; this run: "
                 f"{', '.join(sorted({k[0] for k in cur}))})" if mode == "offline" else "")
        raise BadInput(f"--baseline: no artifact and shape in common with this run{names}",
                       hint="run the baseline with the same artifacts, --batch-sizes and --seq-lens, or pair "
                            "renamed artifacts with --baseline-as BASELINE_NAME=NAME")
    regressions, checked, seen_acc = [], 0, set()
    for key in common:
        c, b = cur[key], base[key]
        where = _label(key, mode)
        if c["throughput"] is not None and b["throughput"]:
            checked += 1
            change = c["throughput"] / b["throughput"] - 1
            if change < -allowance:
                regressions.append({"where": where, "measure": "throughput", "baseline": b["throughput"],
                                    "current": c["throughput"], "change_pct": round(100 * change, 2)})
        if c["p99"] is not None and b["p99"]:
            checked += 1
            change = c["p99"] / b["p99"] - 1
            if change > allowance:
                regressions.append({"where": where, "measure": "p99 latency", "baseline": b["p99"],
                                    "current": c["p99"], "change_pct": round(100 * change, 2)})
        if mode == "offline" and key[0] not in seen_acc and c["accuracy"] is not None and b["accuracy"]:
            seen_acc.add(key[0])
            checked += 1
            change = c["accuracy"] / b["accuracy"] - 1
            if change < -allowance:
                regressions.append({"where": key[0], "measure": "accuracy", "baseline": b["accuracy"],
                                    "current": c["accuracy"], "change_pct": round(100 * change, 2)})
        if mode == "http" and c["error_rate"] is not None and b["error_rate"] is not None:
            checked += 1
            if c["error_rate"] - b["error_rate"] > allowance:
                regressions.append({"where": where, "measure": "error rate", "baseline": b["error_rate"],
                                    "current": c["error_rate"],
                                    "change_pct": round(100 * (c["error_rate"] - b["error_rate"]), 2)})
    unmatched = [_label(k, mode) for k in base if k not in cur] + [_label(k, mode) for k in cur if k not in base]
    return {"allowance_pct": round(100 * allowance, 3), "checked": checked, "regressions": regressions,
            "unmatched": unmatched, "passed": not regressions}


def gate(current: dict, baseline: dict, allowance: float, baseline_path: Path | str = "baseline",
         renames: dict[str, str] | None = None) -> dict:
    """Compare and record the verdict in `current["gate"]`; raise GateFailed on a regression."""
    verdict = compare(current, baseline, allowance, renames)
    current["gate"] = {"baseline": str(baseline_path), **verdict}
    if verdict["regressions"]:
        lines = [f"{r['where']}: {r['measure']} {r['baseline']:.4g} → {r['current']:.4g} ({r['change_pct']:+.1f}%)"
                 for r in verdict["regressions"]]
        raise GateFailed(f"benchmark regressed beyond {100 * allowance:g}% against {baseline_path}: "
                         + "; ".join(lines),
                         hint="if the change is intended, save this run as the new baseline (-o results.json)",
                         result=current)
    return verdict
