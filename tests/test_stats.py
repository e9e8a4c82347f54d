"""apjax.stats: the t quantile against SciPy, and mean intervals and paired differences by hand."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from apjax import stats


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29, 200])
@pytest.mark.parametrize("p", [0.975, 0.995, 0.9, 0.6, 0.025])
def test_t_quantile_matches_scipy(p, df):
    assert stats.t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-12)
    assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_mean_interval_by_hand_and_against_scipy():
    # 1, 2, 3, 6: mean 3, s^2 = (4 + 1 + 0 + 9) / 3 = 14 / 3; t_{0.975, 3} = 3.182446305284263.
    iv = stats.mean_interval([1.0, 2.0, 3.0, 6.0])
    assert (iv.mean, iv.n) == (3.0, 4)
    assert iv.half == pytest.approx(3.182446305284263 * math.sqrt(14 / 3) / 2, rel=1e-12)
    xs = np.array([0.81, 0.84, 0.79, 0.83, 0.80])
    lo, hi = sps.t.interval(0.95, len(xs) - 1, loc=xs.mean(), scale=sps.sem(xs))
    iv = stats.mean_interval(xs.tolist())
    assert (iv.mean - iv.half, iv.mean + iv.half) == pytest.approx((lo, hi), rel=1e-12)
    # One value: no interval; missing and non-finite values are left out; nothing finite: None.
    one = stats.mean_interval([0.5, None, float("nan")])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.half)
    assert stats.mean_interval([None]) is None
    assert stats.mean_interval([2.0, 2.0]).half == 0.0


def test_paired_difference_uses_the_seeds_both_have():
    a = {0: 0.90, 1: 0.85, 2: 0.88, 3: 0.70}
    b = {0: 0.80, 1: 0.80, 2: 0.82, 4: 0.10}
    d = stats.paired_difference(a, b)  # seeds 0, 1, 2: differences 0.10, 0.05, 0.06
    diffs = np.array([0.10, 0.05, 0.06])
    assert d.n == 3 and d.mean == pytest.approx(diffs.mean())
    assert d.half == pytest.approx(sps.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3))
    # The paired t-test's interval: the same as the one-sample interval of the differences.
    res = sps.ttest_rel([0.90, 0.85, 0.88], [0.80, 0.80, 0.82])
    ci = res.confidence_interval(0.95)
    assert (d.mean - d.half, d.mean + d.half) == pytest.approx((ci.low, ci.high))
