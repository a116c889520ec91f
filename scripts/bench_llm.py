#!/usr/bin/env python
"""`mk bench` on the embedded SmolLM2-135M next to llama.cpp on the same GGUF file.

    flock /tmp/mk-bench.lock .venv/bin/python scripts/bench_llm.py
    flock /tmp/mk-bench.lock .venv/bin/python scripts/bench_llm.py --prompt-len 512 --rounds 5 -o llm.json

Each round runs, in processes of their own and in alternating order:

- `mk bench smollm2 --batch-sizes 1 --seq-lens P --new-tokens N --threads T` (torch fp32,
  the safetensors model mk converted from the GGUF), its own warm-up and medians;
- llama.cpp (llama-cpp-python, not a dependency of mk: `pip install llama-cpp-python`)
  on the GGUF file itself (its Q4_1 weights): the same prompt ids (mk bench's synthetic
  prompt, drawn from the model's vocabulary with the same seed), the same N new tokens
  (greedy; EOS ignored: the first N tokens are taken whatever they are), the same
  threads; prefill = one `eval` of the prompt from an empty cache, decode tokens/s =
  (N - 1) / the gaps after the first token, as mk bench counts them.

Printed: medians over rounds of each side's medians, the ratio, the CPU and the load
average (the machine is shared: figures mean little without it). Run it under
`flock /tmp/mk-bench.lock` so no other timing run overlaps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MK = Path(sys.executable).with_name("mk")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a process of each side per round)")
    p.add_argument("--calls", type=int, default=3, help="timed calls of each side per round, after one warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, help="save every figure as JSON")
    p.add_argument("--llama-extra-buffers", action="store_true",
                   help="let llama.cpp use its AMX / repacked weight buffers (SIGILL on a VM without AMX state)")
    p.add_argument("--llama-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def prompt_ids(length: int, seed: int) -> list[int]:
    """mk bench's synthetic prompt for batch 1 (same function, same seed)."""
    from mk.core.artifact import open_artifact
    from mk.core.measurement.bench import synthetic_batch, vocab_size

    return synthetic_batch(1, length, vocab_size(open_artifact("smollm2")), seed)["input_ids"][0].tolist()


def no_extra_buffers() -> None:
    """llama.cpp's AMX kernels (an "extra buffer type") die of SIGILL on this machine: its
    CPU flags say amx_tile but the virtual machine gives no tile state (torch's oneDNN
    checks that and does without). The high-level `Llama` has no switch for it, so the
    model parameters it starts from are given use_extra_bufts=False (weights in plain CPU
    buffers, no repacking)."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def llama_worker(a) -> None:
    """In its own process: llama.cpp's figures as JSON on stdout."""
    if not a.llama_extra_buffers:
        no_extra_buffers()
    from llama_cpp import Llama

    from mk.core.embedded import gguf_path

    ids = prompt_ids(a.prompt_len, a.seed)
    llm = Llama(model_path=str(gguf_path("smollm2")), n_ctx=a.prompt_len + a.new_tokens + 8,
                n_batch=max(512, a.prompt_len), n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    prefill, ttft, decode, itl = [], [], [], []
    for call in range(1 + a.calls):  # the first is the warm-up
        llm.reset()  # no prefix reuse: every call starts from an empty cache, as mk's do
        t0 = time.perf_counter()
        llm.eval(ids)
        p = time.perf_counter() - t0
        llm.reset()
        t0 = time.perf_counter()
        stamps = []
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == a.new_tokens:
                break
        gaps = [y - x for x, y in zip(stamps, stamps[1:])]
        if call:
            prefill.append(a.prompt_len / p)
            ttft.append(1000 * (stamps[0] - t0))
            decode.append(len(gaps) / sum(gaps))
            itl += gaps
    print(json.dumps({"prefill_tokens_s": statistics.median(prefill), "ttft_ms": statistics.median(ttft),
                      "decode_tokens_s": statistics.median(decode),
                      "itl_p50_ms": 1000 * statistics.median(itl)}))


def mk_round(a) -> dict:
    out = run([str(MK), "-q", "bench", "smollm2", "--batch-sizes", "1", "--seq-lens", str(a.prompt_len),
                          "--new-tokens", str(a.new_tokens), "--threads", str(a.threads), "--rounds", str(a.calls),
                          "--warmup-calls", "1", "--eval-limit", "0", "--seed", str(a.seed), "--json"])
    r = json.loads(out)["results"][0]
    return {"prefill_tokens_s": r["prefill"]["tokens_per_s"]["median"], "ttft_ms": r["ttft_ms"]["p50"],
            "decode_tokens_s": r["throughput"]["median"], "itl_p50_ms": r["latency_ms"]["p50"]}


def llama_round(a) -> dict:
    args = [sys.executable, __file__, "--llama-worker", "--prompt-len", str(a.prompt_len), "--new-tokens",
            str(a.new_tokens), "--threads", str(a.threads), "--calls", str(a.calls), "--seed", str(a.seed),
            *(["--llama-extra-buffers"] if a.llama_extra_buffers else [])]
    return json.loads(run(args).splitlines()[-1])


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} … exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    a = parse()
    if a.llama_worker:
        return llama_worker(a)
    from mk.core.cpu import this_cpu

    run([str(MK), "info", "smollm2"])  # converted once, untimed
    load = [os.getloadavg()[0]]
    rounds = {"mk": [], "llama.cpp": []}
    for i in range(a.rounds):
        order = (("mk", mk_round), ("llama.cpp", llama_round))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            rounds[name].append(fn(a))
            print(f"round {i + 1} {name}: {rounds[name][-1]}", file=sys.stderr)
    load.append(os.getloadavg()[0])
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in rounds.items()}
    cpu = this_cpu().model
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"SmolLM2-135M-Instruct, batch 1, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens (greedy), "
          f"{a.threads} threads, {a.rounds} interleaved rounds × {a.calls} calls; medians")
    print(f"CPU: {cpu}; load average before/after: {load[0]:.2f} / {load[1]:.2f}  ({uptime})")
    print("| runtime | weights | prefill tok/s | TTFT ms | decode tok/s | ITL p50 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for side, weights in (("mk", "fp32 (torch)"), ("llama.cpp", "Q4_1 (GGUF)")):
        m = med[side]
        print(f"| {side} | {weights} | {m['prefill_tokens_s']:.0f} | {m['ttft_ms']:.0f} | "
              f"{m['decode_tokens_s']:.1f} | {m['itl_p50_ms']:.1f} |")
    # rounds measured moments apart share the machine's state: the median of their ratios
    ratio = statistics.median(m["decode_tokens_s"] / ll["decode_tokens_s"]
                              for m, ll in zip(rounds["mk"], rounds["llama.cpp"]))
    print(f"mk decode / llama.cpp decode: {ratio:.2f}× (median of per-round ratios)")
    if a.output:
        a.output.write_text(json.dumps({"settings": vars(a) | {"output": str(a.output)}, "cpu": cpu,
                                        "load_average": load, "uptime": uptime, "rounds": rounds,
                                        "medians": med, "decode_ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
