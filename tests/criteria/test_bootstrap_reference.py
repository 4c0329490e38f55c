"""``bootstrap_ci`` (percentile bootstrap of the mean) against SciPy and against exact bootstrap distributions.

SciPy draws its own resamples, so the two intervals differ by Monte Carlo error only. Each bound is
a p-quantile estimated from N resampled means; its standard error is ``sqrt(p (1 - p) / N) * Q'(p)``
with ``Q'`` the derivative of the bootstrap distribution's quantile function, estimated here from
SciPy's own bootstrap distribution by a central difference. The two estimates are independent, so
their difference has standard error ``sqrt(2)`` times that; the test allows 4 of those (a false
failure has probability ~6e-5 per bound; the seeds are fixed, so the outcome does not change between
runs). A wrong level (alpha 0.10 for 0.05) or the median for the mean is many such errors away; the
test checks that too, so the comparison is shown to be able to fail.

The exact checks use small integer data sets, whose bootstrap distribution of the mean is computed
by enumerating all n^n equally likely resamples: each bound is then an atom of that distribution,
and with N = 20000 resamples the percentile bound equals it exactly whenever the atom's cumulative
probabilities are far (>= 5 Monte Carlo SEs) from the level, which the test asserts first.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from saliency_trust.criteria.statistics import bootstrap_ci
from scipy.stats import bootstrap

N_BOOT = 40000
SE_MULT = 4.0


def _data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "normal40":
        return rng.normal(0.6, 0.15, 40)
    if kind == "exponential25":  # skewed: mean and median differ by ~0.3 SD
        return rng.exponential(1.0, 25)
    return rng.uniform(0.0, 1.0, 12)  # few values (6 give a bootstrap distribution too lumpy for a density-based SE)


def _scipy(values: np.ndarray, statistic, alpha: float) -> tuple[tuple[float, float], np.ndarray]:
    res = bootstrap((values,), statistic, n_resamples=N_BOOT, confidence_level=1 - alpha, method="percentile",
                    vectorized=True, rng=np.random.default_rng(12345))
    ci = res.confidence_interval
    return (float(ci.low), float(ci.high)), np.asarray(res.bootstrap_distribution)


def _mc_se_of_difference(dist: np.ndarray, p: float, n: int) -> float:
    """SE of the difference of two independent p-quantile estimates, each from ``n`` resamples."""
    h = 0.005  # the levels tested are 0.025 to 0.975, so p +- h stays inside (0, 1)
    slope = (np.quantile(dist, p + h) - np.quantile(dist, p - h)) / (2 * h)
    return math.sqrt(2.0) * math.sqrt(p * (1 - p) / n) * float(slope)


@pytest.mark.parametrize("alpha", [0.05, 0.10])
@pytest.mark.parametrize("kind", ["normal40", "exponential25", "uniform12"])
def test_bootstrap_ci_equals_scipy_percentile_within_monte_carlo_error(kind, alpha):
    x = _data(kind)
    (s_lo, s_hi), dist = _scipy(x, np.mean, alpha)
    # non-finite values are dropped by bootstrap_ci; SciPy gets only the finite ones
    lo, hi = bootstrap_ci(np.r_[x, np.nan, np.inf], n_boot=N_BOOT, alpha=alpha, seed=3)
    se_lo = _mc_se_of_difference(dist, alpha / 2, N_BOOT)
    se_hi = _mc_se_of_difference(dist, 1 - alpha / 2, N_BOOT)
    assert se_lo > 0 and se_hi > 0
    assert abs(lo - s_lo) < SE_MULT * se_lo, (lo, s_lo, se_lo)
    assert abs(hi - s_hi) < SE_MULT * se_hi, (hi, s_hi, se_hi)

    # The comparison can fail: a wrong level and the median instead of the mean are far outside it.
    w_lo, w_hi = bootstrap_ci(x, n_boot=N_BOOT, alpha=0.10 if alpha == 0.05 else 0.05, seed=3)
    assert abs(w_lo - s_lo) > 2 * SE_MULT * se_lo and abs(w_hi - s_hi) > 2 * SE_MULT * se_hi
    if kind == "exponential25":
        (m_lo, m_hi), _ = _scipy(x, np.median, alpha)
        assert abs(m_lo - s_lo) > 2 * SE_MULT * se_lo and abs(m_hi - s_hi) > 2 * SE_MULT * se_hi


def _exact_bound(values: list[int], p: float) -> tuple[Fraction, Fraction, Fraction]:
    """The p-quantile of the exact bootstrap distribution of the mean of integer ``values``, and the
    cumulative probabilities just below and at that atom."""
    n = len(values)
    counts = {0: 1}  # resample sum -> number of the n^n index tuples giving it
    for _ in range(n):
        nxt: dict[int, int] = {}
        for s, c in counts.items():
            for v in values:
                nxt[s + v] = nxt.get(s + v, 0) + c
        counts = nxt
    total, below = n**n, 0
    for s in sorted(counts):
        if Fraction(below + counts[s], total) >= p:
            return Fraction(s, n), Fraction(below, total), Fraction(below + counts[s], total)
        below += counts[s]
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("values", "alpha", "expected"), [
    ([0, 0, 3], 0.05, (0.0, 3.0)),     # mean = K, K ~ Binomial(3, 1/3): P(K <= 2) = 26/27 < 0.975
    ([0, 0, 3], 0.10, (0.0, 2.0)),     # ... and >= 0.95: the level alone moves the upper bound
    ([0, 1, 1, 5], 0.05, (0.25, 4.0)),
])
def test_bootstrap_ci_equals_the_exact_bootstrap_quantiles(values, alpha, expected):
    n_boot = 20000
    bounds = []
    for p in (alpha / 2, 1 - alpha / 2):
        atom, cdf_below, cdf_at = _exact_bound(values, p)
        se = math.sqrt(p * (1 - p) / n_boot)
        assert float(p - cdf_below) > 5 * se and float(cdf_at - p) > 5 * se  # the bound is one atom, surely
        bounds.append(float(atom))
    assert tuple(bounds) == expected
    assert bootstrap_ci(np.array(values, dtype=float), n_boot=n_boot, alpha=alpha, seed=0) == expected
    assert bootstrap_ci(np.array(values, dtype=float), n_boot=n_boot, alpha=alpha, seed=11) == expected


def test_constant_data_gives_a_point_interval_and_no_data_gives_nans():
    assert bootstrap_ci(np.full(7, 0.25)) == (0.25, 0.25)  # dyadic: every resampled mean is exactly 0.25
    lo, hi = bootstrap_ci(np.full(7, 0.1))
    assert lo == pytest.approx(0.1, abs=1e-15) and hi == pytest.approx(0.1, abs=1e-15)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)
    assert all(math.isnan(b) for b in bootstrap_ci([np.nan, np.inf]))
    assert all(math.isnan(b) for b in bootstrap_ci([]))
