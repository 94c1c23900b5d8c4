"""The report's statistics without SciPy: Student's t from the regularized incomplete beta
function, its quantile, and Welch's interval and test (resnet_scale/tracking/stats.py)."""

import math
import statistics

import pytest

from resnet_scale.tracking.stats import betainc, mean_std, t_cdf, t_ppf, t_sf2, welch


def _t_pdf(x, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
        * (1 + x * x / df) ** (-(df + 1) / 2)


def t_mass(t, df, steps=20000):
    """P(0 <= T <= t) by Simpson's rule on the density: a hand computation, independent of the
    report's continued fraction."""
    h = t / steps
    inner = sum((4 if i % 2 else 2) * _t_pdf(i * h, df) for i in range(1, steps))
    return h / 3 * (_t_pdf(0, df) + inner + _t_pdf(t, df))


@pytest.mark.parametrize("t, df, p", [
    (2.0, 5, 0.101939),     # two-sided p of t=2 at 5 degrees of freedom
    (2.776, 4, 0.0500),     # the 95 % critical value at df=4
    (12.706, 1, 0.0500),    # df=1 (Cauchy): 2/pi * atan(1/12.706)
    (1.96, 1e6, 0.0500),    # large df: the normal distribution
    (0.0, 3, 1.0),
])
def test_t_two_sided_p_known_values(t, df, p):
    assert t_sf2(t, df) == pytest.approx(p, abs=5e-5)
    assert t_sf2(-t, df) == t_sf2(t, df)


def test_t_closed_forms_and_quantile_round_trip():
    for t in (0.1, 1.0, 3.0, 30.0):
        assert t_sf2(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)  # Cauchy
        assert t_sf2(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
    for df in (1, 2.5, 4, 7.3, 30, 400):
        for q in (0.6, 0.9, 0.975, 0.999):
            x = t_ppf(q, df)
            assert t_cdf(x, df) == pytest.approx(q, abs=1e-12)
            assert t_ppf(1 - q, df) == pytest.approx(-x)
    assert t_ppf(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    # I_x(2, 3) = 1 - (1-x)^4 - 4x(1-x)^3 (binomial tail), at x = 0.4: 0.5248
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    assert t_cdf(1.5, 3.5) - 0.5 == pytest.approx(t_mass(1.5, 3.5), abs=1e-9)  # the density, integrated
    with pytest.raises(ValueError, match="x must be in"):
        betainc(1, 1, 1.5)


def test_against_scipy_on_a_grid():
    sps = pytest.importorskip("scipy.stats")
    for df in (1, 1.7, 3, 5.5, 12, 60, 1000):
        for t in (0.05, 0.5, 1.3, 2.2, 4.0, 9.0, 40.0):
            assert t_sf2(t, df) == pytest.approx(2 * sps.t.sf(t, df), rel=1e-9, abs=1e-14), (t, df)
        assert t_ppf(0.975, df) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-9), df
    a, b = [0.81, 0.84, 0.79, 0.83], [0.86, 0.85, 0.88]
    w = welch(*mean_std(a), *mean_std(b))
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic, rel=1e-12) and w["p"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_welch_hand_computation_and_too_few_runs():
    a, b = [0.90, 0.91, 0.89], [0.86, 0.85, 0.84]
    w = welch(*mean_std(a), *mean_std(b))
    # s1^2/n1 = s2^2/n2: equal weights, df = 2 * (n - 1) = 4; t_{0.975, 4} = 2.776445
    se = math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 3)
    assert w["df"] == pytest.approx(4.0)
    assert w["diff"] == pytest.approx(0.05)
    assert (w["low"], w["high"]) == pytest.approx((0.05 - 2.776445 * se, 0.05 + 2.776445 * se), abs=1e-6)
    assert w["p"] < 0.05 and w["note"] is None

    one = welch(*mean_std([0.9]), *mean_std(b))
    assert one["diff"] == pytest.approx(0.05) and one["p"] is None and one["low"] is None
    assert one["note"] == "n too small to tell (n=1 vs 3; needs 2 or more each)"
    flat = welch(*mean_std([0.9, 0.9]), *mean_std([0.8, 0.8]))
    assert flat["p"] is None and "no spread" in flat["note"]
    half = welch(*mean_std([0.9, 0.9]), *mean_std([0.8, 0.82]))  # one group without spread: still a test
    assert half["p"] is not None and half["df"] == pytest.approx(1.0)
    assert welch(*mean_std([None, None]), *mean_std(b))["note"] == "no values"
