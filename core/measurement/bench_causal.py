"""`mk bench` on causal LMs: prefill, time to first token, decode speed, memory and
quality (perplexity, exact match), side by side like encoders.

Every call goes through `CausalLM` (core/runtime/causal_runtime.py), the one
generation path `mk serve` answers with. What keeps runs comparable:

- synthetic prompts of fixed lengths drawn from the model's own vocabulary, and a
  fixed number of new tokens (greedy, EOS ignored), so every call does equal work;
- warm-up calls untimed; artifacts interleaved in rounds; medians of rounds with
  their spread; speed-ups as medians of per-round ratios (bench.py's machinery);
- quality measured after all timing, so it never disturbs the clocks.

A result row's `throughput` is decode tokens/s and its `latency_ms` the
inter-token latency, so `--baseline` gates a causal LM's result as it gates an
encoder's; the artifact's `accuracy` is the exact match (README: "mk bench").
"""

from __future__ import annotations

import math
import time

from mk.core.artifact import created_by
from mk.core.console import log, progress
from mk.core.device import default_threads
from mk.core.errors import BadInput, MkError
from mk.core.measurement.bench import (
    CAUSAL, DATA, NOISE, SCHEMA, SETTLE_S, Entry, PeakRSS, Settings, _artifact_row, _busy, _cuda_peak,
    _cuda_reset, _dataset, _loadavg, _named, _preimport, _r, environment, load,
    max_positions, percentiles, spread, synthetic_batch, versus, vocab_size,
)


def run_causal(entries: list[Entry], settings: Settings) -> dict:
    """Measure every causal LM (settings already resolved); return the `mk.bench/1` result."""
    arts = [e.art for e in entries]
    _check(arts, settings)
    threads = settings.threads or default_threads()
    dataset = _dataset(arts, settings, CAUSAL)
    vocab = min(v for a in arts if (v := vocab_size(a))) if any(vocab_size(a) for a in arts) else None
    if vocab is None:
        raise BadInput(f"{arts[0].path}: no vocabulary size in its config or tokenizer: "
                       "synthetic prompts cannot be drawn from it")

    _preimport(arts, settings.device)
    mem = PeakRSS()
    warnings = []
    load_before = _loadavg()
    if (busy := _busy(load_before)) is not None:
        warnings.append(busy)
    for e in entries:
        log.info("loading %s (%s)", e.name, e.art.format)
        load(e, settings.device, threads, mem, loader=_load_lm)

    shapes = [(b, s) for s in settings.seq_lens for b in settings.batch_sizes]
    results = []
    with progress("measuring", total=len(shapes) * settings.rounds * len(entries)) as bar:
        for b, s in shapes:
            prompts = synthetic_batch(b, s, vocab, settings.seed)["input_ids"].tolist()
            shape = f"batch {b}, prompt {s}"
            log.info("measuring %s, %d new tokens: %s", shape, settings.new_tokens,
                     ", ".join(e.name for e in entries))
            measured = measure_generation(entries, prompts, shape, settings, mem, bar)
            results += [_row(e, entries, measured, (b, s, shape), settings, warnings) for e in entries]

    split = _test_rows(dataset, settings)
    quality = {e.index: _quality(e, dataset, split, warnings) for e in entries}
    if dataset is None:
        warnings.append("no dataset: perplexity not measured; pass --data DATASET (made by `mk prep --task generate`)")
    return {
        "schema": SCHEMA, "mode": "offline", "task": CAUSAL, "created": created_by(),
        "settings": {
            "batch_sizes": settings.batch_sizes, "prompt_lens": settings.seq_lens,
            "new_tokens": settings.new_tokens, "decoding": "greedy, EOS ignored",
            "device": settings.device, "threads": threads, "iters": settings.iters, "rounds": settings.rounds,
            "warmup": settings.warmup, "order": "interleaved", "noise_ratio": NOISE, "seed": settings.seed,
            "data": str(dataset.path) if dataset is not None else None, "eval_limit": settings.eval_limit,
        },
        "environment": {**environment(threads, settings.threads),
                        "load_average": {"before": load_before, "after": _loadavg()}},
        "artifacts": [_artifact_row(e, entries, quality[e.index], threads) for e in entries],
        "results": results,
        "warnings": warnings,
    }


def _check(arts, settings: Settings) -> None:
    """Refuse what cannot be measured before any model is loaded."""
    if settings.duration is not None:
        raise BadInput("--duration: a causal LM is measured in calls, each generating --new-tokens tokens",
                       hint="use --iters N (generation calls per model and shape) instead")
    if DATA in settings.seq_lens:
        raise BadInput("--seq-lens data: causal LMs are measured at fixed prompt lengths",
                       hint="give prompt lengths, like --seq-lens 128,512")
    n = settings.new_tokens
    if n < 2:
        raise BadInput(f"--new-tokens {n}: decode speed needs at least 2 new tokens (the first is the prefill's)")
    for a in arts:
        m = max_positions(a)
        for s in settings.seq_lens:
            if m is not None and s + n > m:
                raise BadInput(f"{a.path}: --seq-lens {s} and --new-tokens {n} exceed the model's context of "
                               f"{m} tokens", hint=f"use --seq-lens {m - n} or less, or fewer --new-tokens")


def _load_lm(art, device: str, threads: int):
    from mk.core.runtime.causal_runtime import CausalLM

    return CausalLM.load(art, device, threads)


# ------------------------------------------------------------ measurement ---

def _one_call(e: Entry, prompts: list[list[int]], sampling, shape: str):
    """(prefill seconds, Generated, generate's total seconds) of one timed call."""
    try:
        prefill_s = e.runtime.prefill(prompts)
        t0 = time.perf_counter()
        out = e.runtime.generate(prompts, sampling)
        return prefill_s, out, time.perf_counter() - t0
    except MkError:
        raise
    except Exception as err:  # noqa: BLE001 — every failure names the artifact and the shape
        raise _named(e.art, err, f"fails at {shape}") from None


def measure_generation(entries: list[Entry], prompts: list[list[int]], shape: str, settings: Settings,
                       mem: PeakRSS, bar) -> dict[int, dict]:
    """Warm up, then time every model on the same prompts in interleaved rounds."""
    from mk.core.runtime.causal_runtime import Sampling

    sampling = Sampling(max_new_tokens=settings.new_tokens, ignore_eos=True)
    calls = max(1, math.ceil(settings.iters / settings.rounds)) if settings.iters else 1
    b, s = len(prompts), len(prompts[0])
    for e in entries:
        for _ in range(settings.warmup):
            _one_call(e, prompts, sampling, shape)
    keys = ("prefill", "ttft", "itl", "total", "throughputs", "prefill_tps", "generated")
    m = {e.index: {k: [] for k in keys} for e in entries}
    for _ in range(settings.rounds):
        for e in entries:
            if len(entries) > 1:
                time.sleep(SETTLE_S)  # let the previous model's spinning worker threads go idle
            r, steps, prefills = m[e.index], [], []
            before = mem.start()
            _cuda_reset(e)
            for _ in range(calls):
                prefill_s, out, total_s = _one_call(e, prompts, sampling, shape)
                prefills.append(prefill_s)
                steps += out.step_s
                r["ttft"].append(out.first_token_s)
                r["total"].append(total_s)
                r["generated"] += [len(t) for t in out.tokens]
                mem.sample()
            peak = mem.stop()
            e.peak_rss, e.run_rss = max(e.peak_rss, peak), max(e.run_rss, peak - before)
            _cuda_peak(e)
            r["prefill"] += prefills
            r["itl"] += steps
            r["prefill_tps"].append(b * s * calls / sum(prefills))
            r["throughputs"].append(b * len(steps) / sum(steps))  # each step gives a token to every row
            bar.advance(1, info=f"{e.name} {shape}")
    return m


def _row(e: Entry, entries: list[Entry], measured: dict, where: tuple, settings: Settings,
         warnings: list[str]) -> dict:
    b, s, shape = where
    m = measured[e.index]
    n = settings.new_tokens
    if any(g != n for g in m["generated"]):  # ignore_eos makes every row exactly n long
        warnings.append(f"{e.name} at {shape}: generated {min(m['generated'])}–{max(m['generated'])} new "
                        f"tokens a row, not {n}: its figures do not compare")
    return {
        "artifact": e.name, "batch_size": b, "seq_len": s, "new_tokens": n,
        "calls": len(m["total"]), "rounds": settings.rounds, "generated_tokens": sum(m["generated"]),
        "prefill": {"tokens_per_s": spread(m["prefill_tps"]), "latency_ms": percentiles(m["prefill"])},
        "ttft_ms": percentiles(m["ttft"]),
        "total_ms": percentiles(m["total"]),
        "throughput": spread(m["throughputs"]), "throughput_unit": "decode tokens/s",
        "latency_ms": percentiles(m["itl"]),  # inter-token latency
        **versus(e, entries, measured, shape, warnings),
    }


# ---------------------------------------------------------------- quality ---

def _test_rows(dataset, settings: Settings) -> dict | None:
    from mk.core.dataset import load_split, split_file

    if dataset is None or settings.eval_limit == 0:
        return None
    split = load_split(dataset, "test", limit=settings.eval_limit or None)
    if "prompt_lengths" not in split:
        raise BadInput(f"{split_file(dataset, 'test')}: no prompt_lengths: not a generation dataset split",
                       hint="make one with `mk prep --task generate`")
    return split


def _quality(e: Entry, dataset, split: dict | None, warnings: list[str]) -> dict:
    """Perplexity on the test rows, and exact match when the dataset has answers."""
    out = {"perplexity": None, "perplexity_tokens": None, "accuracy": None, "macro_f1": None,
           "eval_rows": None, "dataset": str(dataset.path) if dataset is not None else None}
    if split is None:
        return out
    log.info("perplexity%s of %s on %d test rows", " and exact match" if dataset.labels else "", e.name,
             len(split["labels"]))
    try:
        ppl = e.runtime.perplexity(split)
        em = e.runtime.exact_match(split) if dataset.labels else None
    except Exception as err:  # noqa: BLE001
        raise _named(e.art, err, "fails on the test split") from None
    if em is None:
        warnings.append(f"{e.name}: exact match not measured: the dataset has no answers (labels)")
    return {**out, "perplexity": _r(ppl["perplexity"]), "perplexity_tokens": ppl["tokens"],
            "accuracy": None if em is None else _r(em["exact_match"]), "eval_rows": len(split["labels"])}
