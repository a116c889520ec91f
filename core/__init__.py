"""mk's library: everything a command does, callable with plain arguments.

The layers, bottom up (a module imports only from its own layer or below):

- the ground, in this folder: `errors` (the error type and exit codes),
  `console` (stderr logging), `artifact` (folders with `mk.json`), `outputs`
  (atomic writes that never replace what mk did not make), `dataset` (a dataset artifact's splits), `device`, `embedded`
  (the models and data that ship with mk), `tokenizer_match`, `info`;
- `runtime/`: one interface to run a model artifact (torch, ONNX Runtime,
  TensorRT), chosen by its format;
- a package per family of steps, each over the ground and `runtime/`:
  `data/` (mk prep), `training/` (mk tune), `compression/` (mk export-onnx,
  mk quant), `measurement/` (evaluation, mk bench), `serving/` (mk serve);
- `demo`: the whole chain, over all of them.

Nothing here imports typer, prints a result or exits; heavy libraries (torch,
transformers, onnxruntime, polars) are imported inside the functions that
need them so that `mk --help` and `mk info` start fast.
"""

__version__ = "0.1.0"
