"""TensorRT optimization profiles from data: which shapes an engine is built for.

An engine runs only the shapes inside its profile (min ≤ shape ≤ max, axis by
axis) and is tuned for `opt`. mk derives them from the dataset in the lineage:
batch 1 to `--max-batch-size` (opt at the largest: throughput is what a batch
is for), sequence length from the token lengths of its rows: min the shortest,
opt a high percentile (most requests are at or below it), max the longest
(capped by the model's position embeddings). Each bound may be given instead.
Pure arithmetic on numpy arrays, so every rule here is tested without TensorRT.
"""

from __future__ import annotations

import numpy as np
from mk.core.errors import BadInput

DEFAULT_PERCENTILE = 95.0
DEFAULT_MAX_BATCH = 32


def token_lengths(split: dict[str, np.ndarray]) -> np.ndarray:
    """Real tokens per row (the attention mask's sum)."""
    if "attention_mask" not in split:
        raise BadInput("the dataset has no attention_mask: token lengths cannot be measured",
                       hint="give --min-seq, --opt-seq and --max-seq")
    return np.asarray(split["attention_mask"]).sum(axis=1).astype(np.int64)


def derive(lengths: np.ndarray | None, max_batch_size: int = DEFAULT_MAX_BATCH,
           percentile: float = DEFAULT_PERCENTILE, limit: int | None = None,
           batch: tuple | None = None, seq: tuple | None = None) -> dict:
    """{"batch": [min, opt, max], "sequence": [min, opt, max], "source": …}.

    `batch` and `seq` are (min, opt, max) with None for a bound to derive; `lengths`
    the dataset's token lengths (None: every sequence bound must be given); `limit`
    the model's longest sequence (max_position_embeddings)."""
    if max_batch_size < 1:
        raise BadInput(f"--max-batch-size {max_batch_size}: needs at least 1")
    if not 0 < percentile <= 100:
        raise BadInput(f"--opt-percentile {percentile:g}: expected a percentile in (0, 100]")
    b_min, b_opt, b_max = batch or (None, None, None)
    b_max = b_max or max_batch_size
    b = [b_min or 1, b_opt or b_max, b_max]
    s_given = seq or (None, None, None)
    source = "given"
    if None in s_given:
        if lengths is None or not len(lengths):
            raise BadInput("no dataset to derive sequence lengths from",
                           hint="pass --data DATASET, or give --min-seq, --opt-seq and --max-seq")
        lengths = np.asarray(lengths)
        derived = (int(lengths.min()), int(np.ceil(np.percentile(lengths, percentile))), int(lengths.max()))
        if limit:
            derived = tuple(min(x, limit) for x in derived)
        source = f"token lengths of {len(lengths)} rows, opt at the {percentile:g}th percentile"
        s = [g if g is not None else d for g, d in zip(s_given, derived)]
        s = _fit_derived(s, s_given)
    else:
        s = list(s_given)
    s[0] = max(s[0], 1)
    check({"batch": b, "sequence": s}, limit)
    return {"batch": b, "sequence": s, "source": source}


def _fit_derived(s: list, given: tuple) -> list:
    """Derived bounds moved inside the given ones, so that min ≤ opt ≤ max holds
    unless the given bounds themselves contradict (which `check` reports)."""
    lo_g, opt_g, hi_g = given
    lo, opt, hi = s
    ceiling = opt_g if opt_g is not None else hi
    if lo_g is None:
        lo = min(lo, ceiling, hi)
    floor = opt_g if opt_g is not None else lo
    if hi_g is None:
        hi = max(hi, floor, lo)
    if opt_g is None:
        opt = min(max(opt, lo), hi)
    return [lo, opt, hi]


def check(profile: dict, limit: int | None = None) -> None:
    """Every bound a positive integer, min ≤ opt ≤ max; all problems in one line."""
    problems = []
    for axis, flag in (("batch", "batch"), ("sequence", "seq")):
        lo, opt, hi = profile[axis]
        if min(lo, opt, hi) < 1:
            problems.append(f"{axis} bounds must be at least 1 (got {lo}, {opt}, {hi})")
        elif not lo <= opt <= hi:
            problems.append(f"--min-{flag} {lo} ≤ --opt-{flag} {opt} ≤ --max-{flag} {hi} does not hold")
    if limit and profile["sequence"][2] > limit:
        problems.append(f"--max-seq {profile['sequence'][2]} is longer than the model's {limit} positions")
    if problems:
        raise BadInput("shape profile: " + "; ".join(problems))


def input_shapes(profile: dict, names: list[str]) -> dict[str, list[list[int]]]:
    """(min, opt, max) shapes for each text input of the network: [batch, sequence]."""
    b, s = profile["batch"], profile["sequence"]
    return {n: [[b[i], s[i]] for i in range(3)] for n in names}


def preferred_batch_sizes(profile: dict) -> list[int]:
    """Triton's dynamic batcher's preferred sizes: the profile's opt batch and the powers of
    two from 8 up to it (the sizes an engine built for opt runs best at)."""
    lo, opt, _ = profile["batch"]
    sizes = {opt}
    p = 8
    while p < opt:
        if p >= lo:
            sizes.add(p)
        p *= 2
    return sorted(sizes)


def fit_batch(inputs: dict[str, np.ndarray], sequence: list[int]) -> dict[str, np.ndarray]:
    """A text batch at a width the profile runs: its longest real row, raised to the
    profile's min with padding (masked, so the logits do not change) and cut to its max."""
    if "attention_mask" not in inputs:
        return inputs
    longest = int(inputs["attention_mask"].sum(axis=1).max())
    width = min(max(longest, sequence[0]), sequence[2])
    out = {}
    for k, v in inputs.items():
        if v.ndim == 2 and v.shape[1] != width:
            v = v[:, :width] if v.shape[1] > width else np.pad(v, ((0, 0), (0, width - v.shape[1])))
        out[k] = v
    return out
