"""`mk --help`, `mk <cmd> --help` and `mk info` must not import the heavy
libraries: they cost seconds of start-up each."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "onnxruntime", "tensorrt", "polars"]

PROBE = """
import sys, json
from mk.cli.main import app
try:
    app(args=sys.argv[1:], prog_name="mk")
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def heavy_modules_after(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                       capture_output=True, text=True, timeout=120)
    return json.loads(r.stderr.strip().splitlines()[-1])


def test_help_imports_nothing_heavy():
    assert heavy_modules_after("--help") == []


def test_every_command_help_imports_nothing_heavy():
    from mk.cli.main import app
    import typer.main

    names = list(typer.main.get_command(app).commands)
    assert "info" in names
    for name in names:
        assert heavy_modules_after(name, "--help") == [], name


def test_info_imports_nothing_heavy(tiny_model):
    assert heavy_modules_after("info", str(tiny_model)) == []
