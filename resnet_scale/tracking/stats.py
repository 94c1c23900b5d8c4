"""Statistics of a comparison over seeds, in plain Python (no SciPy): mean and sample standard
deviation per group, and Welch's comparison of two groups — the difference of means, its 95 %
confidence interval and the two-sided p-value of Welch's t-test.

The Student t distribution is computed from the regularized incomplete beta function
(``betainc``, a continued fraction evaluated with the modified Lentz method), so the degrees of
freedom need not be integers, as Welch–Satterthwaite's rarely are.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

_EPS, _TINY, _MAX_ITER = 1e-15, 1e-300, 500


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    half = t_sf2(t, df) / 2.0
    return 1.0 - half if t >= 0 else half


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on the CDF: exact to ~1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


def mean_std(values: list[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (ddof=1) or None for fewer than two values, count) of the
    non-None values."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def welch(mean1: float | None, std1: float | None, n1: int, mean2: float | None, std2: float | None,
          n2: int, level: float = 0.95) -> dict[str, Any]:
    """Group 1 minus group 2 by Welch's unequal-variance t-test: ``diff`` (difference of means),
    ``low``/``high`` (its ``level`` confidence interval), ``df`` (Welch–Satterthwaite), ``t``, ``p``
    (two-sided), and ``note`` saying why there is no interval (``low``, ``high``, ``p`` None)
    when the groups cannot tell: fewer than two values in a group, or no spread in either."""
    out: dict[str, Any] = {"diff": None, "low": None, "high": None, "df": None, "t": None, "p": None,
                           "note": None}
    if mean1 is None or mean2 is None:
        out["note"] = "no values"
        return out
    out["diff"] = mean1 - mean2
    if n1 < 2 or n2 < 2:
        out["note"] = f"n too small to tell (n={n1} vs {n2}; needs 2 or more each)"
        return out
    v1, v2 = std1 ** 2 / n1, std2 ** 2 / n2
    se2 = v1 + v2
    if se2 == 0.0:
        out["note"] = "no spread in either group: cannot tell"
        return out
    df = se2 ** 2 / ((v1 ** 2 / (n1 - 1) if v1 else 0.0) + (v2 ** 2 / (n2 - 1) if v2 else 0.0))
    se = math.sqrt(se2)
    half = t_ppf(0.5 + level / 2.0, df) * se
    t = out["diff"] / se
    out.update(low=out["diff"] - half, high=out["diff"] + half, df=df, t=t, p=t_sf2(t, df))
    return out
