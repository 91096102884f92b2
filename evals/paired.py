"""Paired before/after comparisons of one metric, item by item, with scipy.

Both models answered the same items, so each item is its own control: the question
is whether the per-item differences are more than noise. One function, `compare`,
gives the change of a metric with a 95 % interval, a p-value and a standard error:

- the metric is a weighted mean of item scores (weights say how the suite averages:
  1 per item, 1/n per cell for a mean of cell means, tokens for a loss), so its change
  is sum(w * (after - before)) / sum(w);
- items that share a context (one document, one haystack) are resampled together:
  each cluster contributes the weighted sum of its differences;
- p-value: pass/fail items of equal weight without shared contexts get exact
  McNemar, which is the sign test on the discordant items (`scipy.stats.binomtest`);
  everything else a paired permutation test that swaps before and after within each
  cluster (`scipy.stats.permutation_test`: exact while every sign pattern fits in the
  resamples, up to 9 clusters at the default 1,000; randomised beyond);
- interval and standard error: a paired percentile bootstrap over clusters
  (`scipy.stats.bootstrap`). Percentile, not BCa: BCa is undefined when every
  difference is equal, which is common here (identical greedy answers).

`detectable_drop` turns a standard error into the smallest drop a check would block
with the asked power, and `adjust` makes the p-values of one family of checks
Benjamini-Hochberg-adjusted (`scipy.stats.false_discovery_control`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats

from evals.standard_error import of_ratio

RESAMPLES = 1000


@dataclasses.dataclass
class Comparison:
    before: float
    after: float
    delta: float  # after - before, in the metric's unit
    low: float  # 95 % interval of delta
    high: float
    p: float  # two-sided
    se: float  # standard error of delta (bootstrap)
    # Standard error of each score alone (evals/standard_error.py: lm-eval's closed form,
    # the ratio estimator's for weighted means).
    se_before: float
    se_after: float
    items: int
    clusters: int
    better: int  # items whose score rose
    worse: int  # items whose score fell
    test: str  # "mcnemar" or "permutation"

    def as_dict(self, digits: int = 4) -> dict:
        out = {}
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and math.isfinite(value):
                # p-values keep their significant digits: 1.5e-05 is not 0
                value = float(f"{value:.3g}") if key == "p" else round(value, digits)
            out[key] = value
        return out


def compare(before: Sequence[float], after: Sequence[float], *, weights: Sequence[float] | None = None,
            clusters: Sequence[str] | None = None, binary: bool = False, seed: int = 0,
            resamples: int = RESAMPLES, confidence: float = 0.95,
            strata: Sequence[str] | None = None) -> Comparison:
    """The paired change of a weighted mean, after vs before, on the same items.
    `strata` name fixed cells (tasks in a mean of task means): each side's own
    standard error then comes from the spread within cells."""
    b = np.asarray(before, dtype=float)
    a = np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1 or not len(b):
        raise ValueError(f"paired comparison needs two equal, non-empty item lists (got {b.shape}, {a.shape})")
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=float)
    if clusters is None:
        cluster_b, cluster_a, cluster_w = w * b, w * a, w
    else:
        keys, index = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
        cluster_b = np.bincount(index, weights=w * b, minlength=len(keys))
        cluster_a = np.bincount(index, weights=w * a, minlength=len(keys))
        cluster_w = np.bincount(index, weights=w, minlength=len(keys))
    total = w.sum()
    mean_b, mean_a = float((w * b).sum() / total), float((w * a).sum() / total)
    delta = mean_a - mean_b
    diff = cluster_a - cluster_b
    better, worse = int((a > b).sum()), int((a < b).sum())
    n = len(cluster_w)
    same_weights = clusters is None and np.allclose(w, w[0])
    test = "mcnemar" if binary and same_weights else "permutation"
    rng = np.random.default_rng(seed)

    if not np.any(diff):
        p, low, high, se = 1.0, delta, delta, 0.0
    elif n < 2:
        p, low, high, se = 1.0, -math.inf, math.inf, math.inf
    else:
        if test == "mcnemar":
            p = stats.binomtest(worse, better + worse, 0.5).pvalue
        else:
            def mean_change(x, y, axis=-1):
                return (x.sum(axis=axis) - y.sum(axis=axis)) / total

            p = stats.permutation_test((cluster_a, cluster_b), mean_change, permutation_type="samples",
                                       vectorized=True, n_resamples=resamples, rng=rng).pvalue

        def ratio(x, y, weight, axis=-1):
            return (x.sum(axis=axis) - y.sum(axis=axis)) / weight.sum(axis=axis)

        with warnings.catch_warnings():  # a degenerate resample distribution warns; the interval stands
            warnings.simplefilter("ignore")
            boot = stats.bootstrap((cluster_a, cluster_b, cluster_w), ratio, paired=True, vectorized=True,
                                   n_resamples=resamples, method="percentile", confidence_level=confidence,
                                   rng=rng)
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
        se = float(boot.standard_error)
    return Comparison(before=mean_b, after=mean_a, delta=delta, low=low, high=high, p=float(min(1.0, p)),
                      se=se, se_before=of_ratio(w * _centred(b, w, strata), w) or 0.0,
                      se_after=of_ratio(w * _centred(a, w, strata), w) or 0.0, items=len(b), clusters=n,
                      better=better, worse=worse, test=test)


def _centred(values: np.ndarray, weights: np.ndarray, strata: Sequence[str] | None) -> np.ndarray:
    """Values with each stratum's weighted mean replaced by the overall one."""
    if strata is None:
        return values
    _keys, index = np.unique(np.asarray(strata, dtype=str), return_inverse=True)
    means = np.bincount(index, weights=weights * values) / np.bincount(index, weights=weights)
    overall = (weights * values).sum() / weights.sum()
    return values - means[index] + overall


def detectable_drop(se: float, margin: float, alpha: float, power: float, family: int,
                    units: int = 0, scale: float = 0.0) -> float:
    """The smallest true drop blocked with probability `power` by the rule "significant
    (two-sided, level alpha shared by `family` checks) and beyond the margin": the
    estimate must clear both the margin and the significance bound, plus z_power
    standard errors. Bonferroni's level alpha/family bounds Benjamini-Hochberg's
    threshold for a single real drop, so the figure errs on the safe side.

    A drop also widens the spread it is measured with: items that fall to 0 from
    scores up to `scale` add at most d * (scale - d) to the variance of a unit's
    difference (`units` independent units: items or clusters). The bound is solved
    for d by fixed-point iteration, so the stated figure holds for the spread a real
    drop has, not the spread of a harmless rerun. Losses shift without spreading:
    scale 0."""
    # The standard error is itself estimated from `units` units (it matters at tens):
    # both quantiles are Student's t.
    level = 1 - alpha / (2 * max(family, 1))
    if units > 1:
        z_alpha, z_power = stats.t.ppf(level, units - 1), stats.t.ppf(power, units - 1)
    else:
        z_alpha, z_power = stats.norm.ppf(level), stats.norm.ppf(power)
    drop = max(margin, z_alpha * se) + z_power * se
    if units and scale:
        for _ in range(100):
            spread = math.sqrt(se ** 2 + max(0.0, drop * (scale - drop)) / units)
            new = max(margin, z_alpha * spread) + z_power * spread
            if abs(new - drop) < 1e-9:
                break
            drop = new
    return float(drop)


def adjust(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg-adjusted p-values of one family of checks."""
    if not len(pvalues):
        return []
    return [float(p) for p in stats.false_discovery_control(np.asarray(pvalues, dtype=float), method="bh")]
