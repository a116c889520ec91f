"""mk's library: everything a command does, callable with plain arguments.

The layers, bottom up (a module imports only from its own layer or below):

- the ground, in this folder: `errors` (the error type, exit codes and the
  table of library errors), `console` (stderr logging), `artifact` (folders
  with `mk.json`), `outputs` (putting an output in place without destroying
  what mk did not make), `dataset` (a dataset artifact's splits), `device`,
  `cpu` (the CPU and its int8 path), `embedded` (the models and data that ship
  with mk), `gguf_import` (a GGUF file converted once into a model artifact),
  `tokenizer_match`, `info`;
- `runtime/`: one interface to run a model artifact (torch, ONNX Runtime,
  TensorRT), chosen by its format; unmerged LoRA adapters load there too;
  `causal_runtime` is a causal LM's (prompts, generation, prefill, perplexity);
- the shared measures over a runtime: `evaluation` (accuracy and macro-F1 of a
  runtime on a split) and `gate` (the paired accuracy gate of every
  compression step);
- a package per family of steps, each over the layers above and never importing
  a sibling family: `data/` (mk prep), `training/` (mk tune), `compression/`
  (mk export-onnx, mk quant, mk prune; `onnx_io` is the ONNX file layer they
  share), `measurement/` (mk bench, offline and over HTTP), `serving/`
  (mk serve), `explanation/` (mk explain);
- `demo`: the whole chain, over all of them.

Nothing here imports typer, prints a result or exits; heavy libraries (torch,
transformers, onnxruntime, polars) are imported inside the functions that
need them so that `mk --help` and `mk info` start fast.
"""

__version__ = "0.1.0"
