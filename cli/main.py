"""Entry point of the `mk` console script.

Each command module registers itself on import; none of them imports torch,
transformers, onnxruntime, tensorrt or polars at module level, so `mk --help`
stays fast (a test checks it).
"""

from __future__ import annotations

from mk.cli import (bench, demo, doctor, explain, export_onnx, export_trt, info, prep,  # noqa: F401  (registers commands)
                    prune, quant, serve, tune)
from mk.cli.app import app


def main() -> None:
    app(prog_name="mk")


if __name__ == "__main__":
    main()
