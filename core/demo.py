"""`mk demo`: the whole chain on the embedded default, as the commands a user
would type. Each step runs the real `mk` executable, so the demo exercises the
same command lines, pipes and artifacts as a Makefile would; every command is
shown on stderr before it runs.

Two chains: `classify` (MiniLM on the tweets: prep → tune → prune → distil →
quant → bench) and `generate` (SmolLM2 on the tweets as instructions: prep →
LoRA tune → bench → one completion from `mk serve`)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mk.core.errors import BadInput, MkError
from mk.core.outputs import artifact_blocker, atomic_output, describe


def mk_executable() -> list[str]:
    """The `mk` beside this interpreter (a venv's bin/), else on PATH, else `python -m`."""
    sibling = Path(sys.executable).with_name("mk")
    if sibling.is_file():
        return [str(sibling)]
    found = shutil.which("mk")
    return [found] if found else [sys.executable, "-m", "mk.cli.main"]


TASKS = ("classify", "generate")
SERVED_ANSWER = "completion.json"  # the generate chain's last step: what `mk serve` answered
# small enough for minutes on a 2-core CPU: one prompt length, batch 1 and 8, 16 new tokens
GENERATE_BENCH = ["--seq-lens", "128", "--batch-sizes", "1,8", "--new-tokens", "16", "--rounds", "2"]


def demo_steps(sample: int, epochs: float, seed: int, threads: int | None,
               task: str = "classify") -> list[tuple[str, list[str]]]:
    """The chain, as (name, mk arguments) with paths relative to the demo folder."""
    bench_threads = ["--threads", str(threads)] if threads else []
    if task == "generate":
        return [
            ("prep", ["prep", "tweets", "--task", "generate", "--sample", str(sample), "--seed", str(seed),
                      "-o", "data"]),
            # LoRA (the default for a causal LM); batches of 8 keep memory near 3 GB
            ("tune", ["tune", "data", "--model", "smollm2", "--epochs", str(epochs), "--batch-size", "8",
                      "--seed", str(seed), "-o", "tuned"]),
            ("bench", ["bench", "smollm2", "tuned", *GENERATE_BENCH, *bench_threads, "-o", "bench.json"]),
            ("serve", ["serve", "tuned", "--port", "0", *bench_threads]),
        ]
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
    """The artifact folders the chains write: each step's -o (bench's are files), and
    the ONNX export `mk quant` makes beside its output from a safetensors input."""
    from mk.core.compression.quantize import EXPORT_SUFFIX

    outs = {args[args.index("-o") + 1]: name for task in TASKS for name, args in demo_steps(100, 1, 0, None, task)
            if "-o" in args and name != "bench"}
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
        if entry.name in ("bench.png", SERVED_ANSWER) and describe(entry) == "a file":
            continue
        return f"a folder holding {entry.name}, which `mk demo` does not write"
    return None


def run_demo(out: Path, sample: int = 3000, epochs: float = 2, seed: int = 0, threads: int | None = None,
             force: bool = False, on_step=None, task: str = "classify") -> dict:
    """Run every step into a temporary folder renamed to `out` when all succeed;
    `on_step(args)` is told each command before it runs (the CLI shows it)."""
    if task not in TASKS:
        raise BadInput(f"--task {task!r}: the demo's chains are {' and '.join(TASKS)}")
    mk = mk_executable()
    timings, result = {}, {"path": str(out), "task": task}
    with atomic_output(out, force, demo_blocker) as tmp:
        for name, args in demo_steps(sample, epochs, seed, threads, task):
            if on_step is not None:
                on_step(args)
            t0 = time.perf_counter()
            if name == "serve":
                result["served"] = served_completion([*mk, *args], tmp)
            else:
                # stderr passes through: the user sees each step's progress and tables
                proc = subprocess.run([*mk, *args], cwd=tmp, stdout=subprocess.PIPE, stderr=None, text=True)
                _check(args, proc.returncode)
            timings[name] = round(time.perf_counter() - t0, 1)
    return result | {"seconds": timings}


def _check(args: list[str], code: int | None) -> None:
    if code != 0:
        raise MkError(f"demo step `mk {args[0]}` failed with exit code {code}",
                      hint="its error is printed above; the demo folder was not written")


def served_completion(command: list[str], folder: Path, timeout: float = 600) -> dict:
    """Start `mk serve` on a free loopback port, ask it (through the OpenAI-compatible
    route) the first test prompt of the demo's dataset, write the answer to
    SERVED_ANSWER, then stop the server with SIGTERM as a supervisor would."""
    import httpx

    proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=None, text=True)
    try:
        url = proc.stdout.readline().strip()  # printed once the model is loaded and warm
        if not url:
            _check(command, proc.wait(timeout))
        prompt, reference = _first_test_prompt(folder / "data")
        body = {"model": httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"],
                "prompt": prompt, "max_tokens": 8, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout).raise_for_status().json()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout)
    _check(command, code)
    served = {"url": f"{url}/v1/completions", "request": body, "expected": reference,
              "answer": answer["choices"][0]["text"]}
    (folder / SERVED_ANSWER).write_text(json.dumps(served, indent=2) + "\n")
    return served


def _first_test_prompt(data: Path) -> tuple[str, str]:
    """The first test row's prompt as the model reads it (chat template included) and
    its reference answer."""
    from transformers import AutoTokenizer

    from mk.core.dataset import load_split, open_dataset

    split = load_split(open_dataset(data), "test", limit=1)
    tok = AutoTokenizer.from_pretrained(str(data))
    ids, n = split["input_ids"][0], int(split["prompt_lengths"][0])
    answer = [t for t in split["labels"][0].tolist() if t >= 0]
    return tok.decode(ids[:n]), tok.decode(answer, skip_special_tokens=True).strip()
