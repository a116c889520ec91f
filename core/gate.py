"""The accuracy gate of a compression step (mk quant, mk prune): did the child lose
more than the allowance, judged with the sample size in mind?

Parent and child answer the same test rows, so the evidence is in the rows where
they differ: `worse` (parent right, child wrong) and `better` (the reverse). Given
the d = worse + better discordant rows, the drop in accuracy is (d / n)(2θ - 1)
where θ is the chance that a discordant row went the child's way wrong; `worse`
is Binomial(d, θ). The exact (Clopper-Pearson) interval of θ at `confidence` gives
the drop's interval, and the gate fails only when all of it lies above the
allowance. With no allowance this is McNemar's exact test (two-sided, at
1 - confidence). The interval is conditional on the rows that changed: a child
that changes no answer passes with [0, 0].

`point` keeps the plain rule: fail when the observed drop exceeds the allowance.
scipy's binomtest does the binomial arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TESTS = ("paired", "point")


@dataclass
class Verdict:
    test: str
    confidence: float
    max_drop_points: float
    rows: int
    parent_accuracy: float
    accuracy: float
    worse: int                      # parent right, child wrong
    better: int                     # parent wrong, child right
    drop_points: float              # observed
    interval_points: list[float]    # the drop's exact interval at `confidence` (paired)
    mcnemar_p: float                # exact, two-sided: could the changes be a coin toss?
    min_failing_drop_points: float | None  # the smallest drop this split can fail (paired); None: never
    failed: bool
    warning: str | None

    def record(self) -> dict:
        return asdict(self)


def drop_interval(worse: int, better: int, rows: int, confidence: float) -> tuple[float, float]:
    """The exact interval, in points, of the accuracy drop given the discordant rows."""
    from scipy.stats import binomtest

    d = worse + better
    if d == 0:
        return 0.0, 0.0
    ci = binomtest(worse, d).proportion_ci(confidence_level=confidence, method="exact")
    scale = 100 * d / rows
    return scale * (2 * ci.low - 1), scale * (2 * ci.high - 1)


def mcnemar_exact(worse: int, better: int) -> float:
    """McNemar's exact two-sided p-value: worse ~ Binomial(worse + better, 1/2) under no change."""
    from scipy.stats import binomtest

    return 1.0 if worse + better == 0 else float(binomtest(worse, worse + better).pvalue)


def min_failing_drop(rows: int, parent_correct: int, max_drop: float, confidence: float) -> float | None:
    """The smallest drop (points) the paired gate can fail on this split: k answers worse
    and none better, the clearest evidence k rows can give. None when no k can."""
    def fails(k: int) -> bool:
        return drop_interval(k, 0, rows, confidence)[0] > max_drop

    if parent_correct < 1 or not fails(parent_correct):
        return None
    lo, hi = 0, parent_correct  # the lower bound grows with k: bisect for the first k that fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fails(mid) else (mid, hi)
    return 100 * hi / rows


def judge(parent_correct: np.ndarray, child_correct: np.ndarray, max_drop: float, confidence: float = 0.95,
          test: str = "paired") -> Verdict:
    """The verdict on a child's answers against its parent's, row by row (booleans: right or wrong)."""
    p = np.asarray(parent_correct, dtype=bool)
    c = np.asarray(child_correct, dtype=bool)
    n = len(p)
    worse, better = int(np.sum(p & ~c)), int(np.sum(~p & c))
    drop = 100 * (worse - better) / max(n, 1)
    lo, hi = drop_interval(worse, better, n, confidence) if n else (0.0, 0.0)
    floor = min_failing_drop(n, int(p.sum()), max_drop, confidence)
    failed = (lo > max_drop) if test == "paired" else (drop > max_drop)
    warning = None
    if test == "paired" and max_drop < 100 and (floor is None or floor > 2 * max_drop + 2):  # 100: no gate meant
        warning = (f"{n} test rows are too few for a --max-drop {max_drop:g} gate: "
                   + ("it cannot fail whatever the model does" if floor is None else
                      f"it fails only on a drop of {floor:.2f} points or more")
                   + "; a larger test split (mk prep --sample, --split) makes it meaningful")
    return Verdict(test=test, confidence=confidence, max_drop_points=max_drop, rows=n,
                   parent_accuracy=float(p.mean()) if n else float("nan"),
                   accuracy=float(c.mean()) if n else float("nan"), worse=worse, better=better,
                   drop_points=round(drop, 4), interval_points=[round(lo, 4), round(hi, 4)],
                   mcnemar_p=round(mcnemar_exact(worse, better), 6),
                   min_failing_drop_points=None if floor is None else round(floor, 4), failed=failed,
                   warning=warning)


def describe(v: Verdict) -> str:
    """One line for stderr."""
    interval = f"{v.confidence:.0%} interval [{v.interval_points[0]:.2f}, {v.interval_points[1]:.2f}]"
    return (f"accuracy on {v.rows} test rows: parent {100 * v.parent_accuracy:.2f}%, child {100 * v.accuracy:.2f}% "
            f"(drop {v.drop_points:.2f} points, {interval}; answers {v.worse} worse, {v.better} better; "
            f"McNemar exact p {v.mcnemar_p:.3g}); allowed {v.max_drop_points:g} "
            + ("(judged on the interval)" if v.test == "paired" else "(judged on the observed drop)"))
