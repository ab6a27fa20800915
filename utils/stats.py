"""Small-sample statistics for compare.py: percentile bootstrap intervals, exact sign-flip tests of paired
differences, the paired t-test where it is defined, and the minimum detectable effect.

Every function takes the paired differences (arm − reference) and returns None where it is undefined, so
that the report prints n/a instead of a made-up 0 or nan. scipy is imported inside the functions that need
it: it is slow to import (~1.5 s) and --help and input errors do not need it."""
from __future__ import annotations

import math

import numpy as np

CI = tuple[float, float]
ALPHA = 0.05  # two-sided significance level of the minimum detectable effect
POWER = 0.8  # its power
MIN_PAIRS = 2  # exact tests and bootstrap intervals: one pair (or value) carries no information on spread
T_MIN_PAIRS = 3  # t-test and MDE: two pairs leave one degree of freedom, a t-test that says nothing useful
EXACT_MAX_N = 20  # enumerate all 2^n sign patterns up to here (2^20 sums: 8 MB, well under a second)
MONTE_CARLO = 100_000  # random sign patterns beyond EXACT_MAX_N
REL_TOL = 1e-9  # sums equal in theory can differ in the last bits; a null sum this close counts as a tie


def resampled_means(values: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_resamples` resamples of `values` with replacement, each of the original size."""
    return values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)


def percentile_interval(statistics: np.ndarray, level: float) -> CI:
    """The (1 ± level)/2 quantiles, numpy's linear interpolation as scipy.stats.bootstrap(method='percentile')."""
    low, high = np.percentile(statistics, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_ci(values: np.ndarray | list[float], n_resamples: int, seed: int, level: float = 0.95
                 ) -> CI | None:
    """Percentile bootstrap interval of the mean. A fresh generator per call: an interval depends only on
    its own values and the seed, not on which other intervals were computed before. None below 2 values."""
    values = np.asarray(values, dtype=float)
    if values.size < MIN_PAIRS:
        return None
    return percentile_interval(resampled_means(values, n_resamples, np.random.default_rng(seed)), level)


def bootstrap_diff_ci(a: np.ndarray | list[float], b: np.ndarray | list[float], n_resamples: int, seed: int,
                      level: float = 0.95) -> CI | None:
    """Percentile bootstrap interval of mean(a) − mean(b) for unpaired samples, each resampled on its own;
    None unless both have 2 values."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(a.size, b.size) < MIN_PAIRS:
        return None
    rng = np.random.default_rng(seed)
    return percentile_interval(resampled_means(a, n_resamples, rng) - resampled_means(b, n_resamples, rng), level)


def sign_flip_sums(weights: np.ndarray, seed: int) -> tuple[np.ndarray, bool]:
    """Σ s_i·w_i over every sign pattern s ∈ {−1, 1}^n when n ≤ EXACT_MAX_N, else over MONTE_CARLO random
    ones -> (sums, exact). Under the null of a distribution symmetric about 0 every pattern is as likely
    as the observed one."""
    if weights.size <= EXACT_MAX_N:
        sums = np.zeros(1)
        for w in weights:  # doubling: the patterns of the first i weights, then the i+1-th with each sign
            sums = np.concatenate([sums + w, sums - w])
        return sums, True
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(MONTE_CARLO, weights.size))
    return signs @ weights, False


def sign_flip_p(weights: np.ndarray, observed: float, seed: int) -> float:
    """Two-sided p of the statistic Σ sign(d_i)·w_i: the share of sign patterns whose |sum| reaches the
    observed one. Exact by enumeration; the Monte-Carlo estimate counts the observed pattern too
    ((hits + 1) / (draws + 1)), so that it is never 0."""
    sums, exact = sign_flip_sums(weights, seed)
    hits = int(np.count_nonzero(np.abs(sums) >= abs(observed) * (1 - REL_TOL)))
    return hits / sums.size if exact else (hits + 1) / (sums.size + 1)


def permutation_p(d: np.ndarray, seed: int) -> float | None:
    """Exact sign-flip permutation test of the mean difference (the paired `samples` permutation test);
    None below 2 pairs."""
    d = np.asarray(d, dtype=float)
    return None if d.size < MIN_PAIRS else sign_flip_p(np.abs(d), float(d.sum()), seed)


def wilcoxon_p(d: np.ndarray, seed: int) -> float | None:
    """Wilcoxon signed-rank test, exact by the same enumeration of signs over the ranks of |d| (zero
    differences dropped, ties given mid-ranks: exact conditionally on the ranks, where scipy's exact table
    assumes no ties); 1 when every difference is zero, None below 2 pairs."""
    import scipy.stats

    d = np.asarray(d, dtype=float)
    if d.size < MIN_PAIRS:
        return None
    nonzero = d[d != 0]
    if not nonzero.size:
        return 1.0
    ranks = scipy.stats.rankdata(np.abs(nonzero))
    return sign_flip_p(ranks, float(np.sign(nonzero) @ ranks), seed)


def sign_test_p(d: np.ndarray) -> float | None:
    """Exact two-sided sign test: the number of positive differences among the nonzero ones against
    Binomial(n, 1/2) (twice the smaller tail, at most 1); 1 when every difference is zero, None below
    2 pairs."""
    import scipy.stats

    d = np.asarray(d, dtype=float)
    if d.size < MIN_PAIRS:
        return None
    n, positive = int(np.count_nonzero(d)), int(np.count_nonzero(d > 0))
    if not n:
        return 1.0
    return min(1.0, 2 * float(scipy.stats.binom.cdf(min(positive, n - positive), n, 0.5)))


def t_test_p(d: np.ndarray) -> float | None:
    """Two-sided paired t-test of mean(d) = 0. None below 3 pairs, and None when the differences are all
    equal but not zero: t would be infinite and p = 0, though no spread was observed to judge the mean by
    (the exact tests still answer). All zero: no difference at all, p = 1."""
    import scipy.stats

    d = np.asarray(d, dtype=float)
    if d.size < T_MIN_PAIRS:
        return None
    sd = float(np.std(d, ddof=1))
    if sd <= REL_TOL * float(np.abs(d).max()):  # zero spread, up to rounding of the differences
        return 1.0 if not d.any() else None
    t = float(np.mean(d)) / (sd / math.sqrt(d.size))
    return float(2 * scipy.stats.t.sf(abs(t), d.size - 1))


def min_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The true mean difference a two-sided paired t-test at `alpha` detects with probability `power`,
    given n pairs whose differences have standard deviation `sd`: the noncentrality δ√n/sd at which the
    noncentral t (n − 1 degrees of freedom) falls beyond ±t_crit with that probability. Exact, not the
    normal approximation (z_{1−α/2} + z_power)·sd/√n, which for 3 seeds is half the exact value.
    None below 3 pairs or without spread."""
    import scipy.optimize
    import scipy.stats

    if n < T_MIN_PAIRS or not sd > 0:
        return None
    df = n - 1
    critical = float(scipy.stats.t.ppf(1 - alpha / 2, df))

    def shortfall(noncentrality: float) -> float:
        reject = scipy.stats.nct.sf(critical, df, noncentrality) + scipy.stats.nct.cdf(-critical, df,
                                                                                        noncentrality)
        return float(reject) - power

    high = critical + 1.0
    while shortfall(high) < 0:  # power rises with the noncentrality: widen until the root is bracketed
        high *= 2
    noncentrality = scipy.optimize.brentq(shortfall, 0.0, high, xtol=1e-10)
    return noncentrality * sd / math.sqrt(n)
