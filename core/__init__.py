"""mk's library: everything a command does, callable with plain arguments.

Nothing here imports typer, prints a result or exits; heavy libraries (torch,
transformers, onnxruntime, polars) are imported inside the functions that
need them so that `mk --help` and `mk info` start fast.
"""

__version__ = "0.1.0"
