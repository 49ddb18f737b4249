"""Intervals and non-inferiority verdicts: each can come out PASS, FAIL or INCONCLUSIVE."""

from __future__ import annotations

import numpy as np
import pytest

from quantpipe.validation.stats import (MIN_BLOCKS, Estimate, block_ratio, decide, detectable, paired_binary_drop,
                                        proportion)


def test_decide_three_ways_for_both_directions():
    est = lambda lo, hi: Estimate((lo + hi) / 2, lo, hi, (hi - lo) / 3.3, 100, 100)  # noqa: E731
    assert decide(est(0.1, 0.2), 0.25, "max") == "PASS"
    assert decide(est(0.3, 0.4), 0.25, "max") == "FAIL"
    assert decide(est(0.2, 0.3), 0.25, "max") == "INCONCLUSIVE"
    assert decide(est(0.85, 0.9), 0.8, "min") == "PASS"
    assert decide(est(0.6, 0.7), 0.8, "min") == "FAIL"
    assert decide(est(0.75, 0.85), 0.8, "min") == "INCONCLUSIVE"
    assert decide(None, 0.8, "min") == "INCONCLUSIVE"  # nothing measured is never a pass


def test_detectable_moves_beyond_the_limit_with_the_noise():
    tight, loose = Estimate(0.1, 0.09, 0.11, 0.01, 1000, 100), Estimate(0.1, 0.0, 0.2, 0.1, 10, 10)
    assert 0.25 < detectable(tight, 0.25, "max") < detectable(loose, 0.25, "max")
    assert detectable(tight, 0.8, "min") < 0.8


def test_block_ratio_covers_the_truth_and_narrows_with_data():
    rng = np.random.default_rng(1)
    small = rng.exponential(0.1, size=(10, 64)).sum(1), np.full(10, 64.0)
    large = rng.exponential(0.1, size=(200, 64)).sum(1), np.full(200, 64.0)
    a, b = block_ratio(*small), block_ratio(*large)
    assert a.low <= 0.1 <= a.high and b.low <= 0.1 <= b.high
    assert (b.high - b.low) < (a.high - a.low)
    assert block_ratio(np.ones(MIN_BLOCKS - 1), np.ones(MIN_BLOCKS - 1)) is None  # too few blocks: no interval


def test_block_ratio_ignores_empty_blocks_and_pairs_by_transform():
    num = np.array([[1.0, 0, 2, 1, 1, 2, 1, 1, 2, 0], [1.0, 0, 1, 1, 1, 1, 1, 1, 1, 0]])
    den = np.array([2.0, 0, 2, 2, 2, 2, 2, 2, 2, 0])
    est = block_ratio(num, den, transform=lambda r: r[0] - r[1])
    assert est.units == 8 and est.value == pytest.approx((10 - 7) / 16)


def test_paired_drop_is_honest_when_nothing_changed():
    same = [1.0] * 12 + [0.0] * 8
    est = paired_binary_drop(same, same)
    assert est.value == 0 and est.high > 0.05  # 20 unchanged items cannot prove a drop below 5 points
    big = paired_binary_drop([1.0] * 200 + [0.0] * 200, [1.0] * 200 + [0.0] * 200)
    assert big.high < 0.02
    worse = paired_binary_drop([1.0] * 100, [0.0] * 40 + [1.0] * 60)
    assert worse.low > 0.25
    with pytest.raises(ValueError):
        paired_binary_drop([1.0], [1.0, 0.0])


def test_proportion_wilson():
    est = proportion(0, 100)
    assert est.low == 0 and 0 < est.high < 0.05
    assert proportion(50, 100).low < 0.5 < proportion(50, 100).high
    assert proportion(0, 0) is None
