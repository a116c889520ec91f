#!/usr/bin/env python
"""Start-up time of the `mk` command line: `mk --help` and `mk info ARTIFACT`,
each run --repeats times as a fresh process; prints median, min and max.

Both must stay fast because neither imports torch, transformers, onnxruntime or
polars (tests/test_lazy_imports.py checks the imports; this prints the time).

    .venv/bin/python scripts/bench_startup.py [ARTIFACT]     # ARTIFACT defaults to `minilm`
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    mk = str(Path(sys.executable).with_name("mk"))
    artifact = sys.argv[1] if len(sys.argv) > 1 else "minilm"
    for name, cmd in (("mk --help", [mk, "--help"]), (f"mk info {artifact}", [mk, "info", artifact])):
        ts = timed(cmd, 10)
        print(f"{name:<24} median {statistics.median(ts):.3f} s   min {min(ts):.3f}   max {max(ts):.3f}   (10 runs)")


if __name__ == "__main__":
    main()
