"""The statistics of the accuracy gate, against values worked out by hand and in
textbooks, and the verdicts a user relies on."""

from __future__ import annotations

import numpy as np
import pytest

from mk.core.gate import drop_interval, judge, mcnemar_exact, min_failing_drop


def test_mcnemar_exact_against_hand_computed_values():
    # 8 worse, 2 better: 2 · P(X ≤ 2 | 10, ½) = 2 · (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0


def test_drop_interval_is_the_clopper_pearson_interval_scaled():
    # 2 of 10 discordant rows went wrong: Clopper-Pearson 95% (0.0252, 0.5561), a textbook value;
    # 10 discordant rows of 100 scale 2θ - 1 by 10 points
    lo, hi = drop_interval(2, 8, 100, 0.95)
    assert lo == pytest.approx(10 * (2 * 0.025211 - 1), abs=1e-3)
    assert hi == pytest.approx(10 * (2 * 0.556095 - 1), abs=1e-3)
    # all k discordant rows worse: the lower bound of θ is (α/2)^(1/k)
    lo, hi = drop_interval(6, 0, 60, 0.95)
    assert lo == pytest.approx(10 * (2 * 0.025 ** (1 / 6) - 1)) and hi == pytest.approx(10)
    assert drop_interval(0, 0, 60, 0.95) == (0.0, 0.0)


def test_min_failing_drop_is_the_first_k_whose_interval_clears_the_allowance():
    # 60 rows, no allowance: k = 6 is the first with (½^k)·2 < 0.05 (two-sided McNemar at 5 %)
    assert min_failing_drop(60, 40, 0.0, 0.95) == pytest.approx(100 * 6 / 60)
    assert mcnemar_exact(6, 0) < 0.05 < mcnemar_exact(5, 0)
    # a parent with fewer right answers than that can never be shown to drop
    assert min_failing_drop(60, 5, 0.0, 0.95) is None


def _answers(n: int, parent_right: int, worse: int, better: int):
    parent = np.zeros(n, bool)
    parent[:parent_right] = True
    child = parent.copy()
    child[:worse] = False
    child[parent_right:parent_right + better] = True
    return parent, child


def test_one_flip_in_60_passes_a_1_point_gate_with_a_warning_and_fails_the_point_gate():
    parent, child = _answers(60, 40, worse=1, better=0)
    v = judge(parent, child, max_drop=1.0)
    assert v.drop_points == pytest.approx(1.6667, abs=1e-3) and not v.failed
    assert v.interval_points[0] < 1.0 < v.interval_points[1]
    assert v.warning and "60 test rows" in v.warning and "11.67 points" in v.warning
    point = judge(parent, child, max_drop=1.0, test="point")
    assert point.failed and point.warning is None


def test_a_real_drop_fails_and_churn_without_a_drop_passes():
    big = judge(*_answers(1000, 700, worse=60, better=10), max_drop=1.0)
    assert big.drop_points == pytest.approx(5.0) and big.interval_points[0] > 1.0 and big.failed
    assert big.warning is None and big.mcnemar_p < 1e-6
    churn = judge(*_answers(1000, 700, worse=30, better=30), max_drop=1.0)
    assert churn.drop_points == 0 and not churn.failed and churn.interval_points[0] < 0 < churn.interval_points[1]
    # higher confidence asks for more evidence: a wider interval
    strict = judge(*_answers(1000, 700, worse=60, better=10), max_drop=1.0, confidence=0.999)
    assert strict.interval_points[0] < big.interval_points[0]
