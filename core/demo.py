"""`mk demo`: the whole chain on the embedded default, as the commands a user
would type. Each step runs the real `mk` executable, so the demo exercises the
same command lines, pipes and artifacts as a Makefile would; every command is
shown on stderr before it runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from mk.core.errors import MkError
from mk.core.outputs import artifact_blocker, atomic_output, describe


def mk_executable() -> list[str]:
    """The `mk` beside this interpreter (a venv's bin/), else on PATH, else `python -m`."""
    sibling = Path(sys.executable).with_name("mk")
    if sibling.is_file():
        return [str(sibling)]
    found = shutil.which("mk")
    return [found] if found else [sys.executable, "-m", "mk.cli.main"]


def demo_steps(sample: int, epochs: float, seed: int, threads: int | None) -> list[tuple[str, list[str]]]:
    """The chain, as (name, mk arguments) with paths relative to the demo folder."""
    bench_threads = ["--threads", str(threads)] if threads else []
    return [
        ("prep", ["prep", "tweets", "--sample", str(sample), "--seed", str(seed), "-o", "data"]),
        ("tune", ["tune", "data", "--model", "minilm", "--epochs", str(epochs), "--seed", str(seed),
                  "-o", "tuned"]),
        ("prune", ["prune", "tuned", "-o", "pruned"]),
        ("distil", ["tune", "data", "--model", "pruned", "--teacher", "tuned", "--epochs", str(epochs),
                    "--seed", str(seed), "-o", "distilled"]),
        ("quant", ["quant", "distilled", "-o", "int8"]),
        ("bench", ["bench", "tuned", "distilled", "int8", "--batch-sizes", "1,32", *bench_threads,
                   "-o", "bench.json", "--plot", "bench.png"]),
    ]


def _demo_artifacts() -> set[str]:
    """The artifact folders the chain writes: each step's -o (bench's are files), and
    the ONNX export `mk quant` makes beside its output from a safetensors input."""
    from mk.core.compression.quantize import EXPORT_SUFFIX

    outs = {args[args.index("-o") + 1]: name for name, args in demo_steps(100, 1, 0, None) if name != "bench"}
    return set(outs) | {out + EXPORT_SUFFIX for out, name in outs.items() if name == "quant"}


def demo_blocker(path: Path) -> str | None:
    """--force replaces a demo folder: the artifacts and files `mk demo` writes, nothing else."""
    from mk.core.measurement.bench_report import is_bench_result

    if (why := artifact_blocker(path)) is None or describe(path) != "a folder":
        return why
    for entry in sorted(path.iterdir()):
        if entry.name in _demo_artifacts() and artifact_blocker(entry) is None:
            continue
        if entry.name == "bench.json" and is_bench_result(entry) is None:
            continue
        if entry.name == "bench.png" and describe(entry) == "a file":
            continue
        return f"a folder holding {entry.name}, which `mk demo` does not write"
    return None


def run_demo(out: Path, sample: int = 3000, epochs: float = 2, seed: int = 0, threads: int | None = None,
             force: bool = False, on_step=None) -> dict:
    """Run every step into a temporary folder renamed to `out` when all succeed;
    `on_step(args)` is told each command before it runs (the CLI shows it)."""
    mk = mk_executable()
    timings = {}
    with atomic_output(out, force, demo_blocker) as tmp:
        for name, args in demo_steps(sample, epochs, seed, threads):
            if on_step is not None:
                on_step(args)
            t0 = time.perf_counter()
            # stderr passes through: the user sees each step's progress and tables
            proc = subprocess.run([*mk, *args], cwd=tmp, stdout=subprocess.PIPE, stderr=None, text=True)
            timings[name] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0:
                raise MkError(f"demo step `mk {args[0]}` failed with exit code {proc.returncode}",
                              hint="its error is printed above; the demo folder was not written")
    return {"path": str(out), "seconds": timings}
