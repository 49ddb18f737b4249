"""Confidence intervals and non-inferiority verdicts for the gate's checks.

Every check estimates one quantity (a mean KL, an agreement rate, an accuracy drop),
gives it a two-sided interval at ``CONFIDENCE`` and decides against its limit:

- ``max`` limits (larger is worse: KL, drops, flip rates): PASS when the interval's
  upper end is within the limit, FAIL when its lower end is beyond it;
- ``min`` limits (larger is better: agreement): PASS when the lower end reaches the
  limit, FAIL when the upper end falls short of it;
- INCONCLUSIVE otherwise: the data cannot tell, which is not a pass.

Held-out positions are not independent (neighbouring tokens share context), so their
intervals come from a paired *block* bootstrap: blocks of consecutive positions are
resampled together, the same blocks for baseline and candidate. Per-item task scores
(0/1) use the Agresti-Min adjusted Wald interval for paired proportions, which stays
honest when no item changed (a plain bootstrap would report a zero-width interval).

``detectable`` is the value of the quantity at which the measurement would return
FAIL with 80 % probability: the smallest degradation it could have caught.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

CONFIDENCE = 0.90  # two-sided: each end is a one-sided 95 % bound
Z = 1.6448536269514722  # standard normal quantile at 0.95
Z_POWER = 0.8416212335729143  # at 0.80
N_BOOT = 2000
MIN_BLOCKS = 8  # fewer independent blocks than this: no interval can be trusted
Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    se: float
    n: int  # positions or items behind the estimate
    units: int  # independent units resampled (blocks or items)


def decide(est: Estimate | None, limit: float, kind: Literal["max", "min"]) -> Verdict:
    if est is None or not all(map(math.isfinite, (est.low, est.high))):
        return "INCONCLUSIVE"
    if kind == "max":
        return "PASS" if est.high <= limit else "FAIL" if est.low > limit else "INCONCLUSIVE"
    return "PASS" if est.low >= limit else "FAIL" if est.high < limit else "INCONCLUSIVE"


def detectable(est: Estimate | None, limit: float, kind: Literal["max", "min"]) -> float | None:
    """The true value beyond ``limit`` that this measurement would flag with 80 % power."""
    if est is None or not math.isfinite(est.se):
        return None
    step = (Z + Z_POWER) * est.se
    return limit + step if kind == "max" else limit - step


def _weights(units: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(units, np.full(units, 1.0 / units), size=N_BOOT).astype(np.float64)


def block_ratio(num: np.ndarray, den: np.ndarray, seed: int = 0, transform=None) -> Estimate | None:
    """Σnum / Σden over blocks (e.g. KL sum / positions per block), with a percentile block
    bootstrap. ``num`` may be 2-D (k, blocks) when ``transform`` combines k ratios (a paired
    difference, say). None when fewer than ``MIN_BLOCKS`` blocks hold any position."""
    num = np.atleast_2d(np.asarray(num, dtype=np.float64))
    den = np.asarray(den, dtype=np.float64)
    keep = den > 0
    units = int(keep.sum())
    if units < MIN_BLOCKS:
        return None
    num, den = num[:, keep], den[keep]
    f = transform or (lambda r: r[0])
    point = float(f(num.sum(1) / den.sum()))
    w = _weights(units, seed)
    dens = w @ den
    boots = np.asarray(f((w @ num.T).T / dens), dtype=np.float64)
    lo, hi = np.quantile(boots, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), float(boots.std(ddof=1)),
                    int(den.sum()), units)


def exact(value: float, n: int) -> Estimate:
    """A quantity counted exactly (no sampling): its interval is the point itself, so it is
    decided against the limit with certainty and detects anything beyond it."""
    return Estimate(float(value), float(value), float(value), 0.0, n, n)


def paired_binary_drop(b: list[float], q: list[float]) -> Estimate | None:
    """Drop in accuracy (baseline − candidate, as a fraction) over the same 0/1 items:
    Agresti-Min (2005) interval, adding ½ to each cell of the paired 2×2 table."""
    if len(b) != len(q):
        raise ValueError(f"task items differ: {len(b)} baseline vs {len(q)} candidate")
    n = len(b)
    if n == 0:
        return None
    lost = sum(1 for x, y in zip(b, q) if x >= 0.5 > y)  # right before, wrong now
    won = sum(1 for x, y in zip(b, q) if y >= 0.5 > x)
    point = (lost - won) / n
    n_adj = n + 2
    p10, p01 = (lost + 0.5) / n_adj, (won + 0.5) / n_adj
    d = p10 - p01
    se = math.sqrt(max((p10 + p01) - d * d, 0.0) / n_adj)
    return Estimate(point, max(-1.0, min(point, d - Z * se)), min(1.0, max(point, d + Z * se)), se, n, n)


def proportion(k: int, n: int) -> Estimate | None:
    """Share k/n with the Wilson score interval (items assumed independent)."""
    if n <= 0:
        return None
    p = k / n
    z2 = Z * Z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Estimate(p, min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)),
                    math.sqrt(max(p * (1 - p), 0.25 / n) / n), n, n)
