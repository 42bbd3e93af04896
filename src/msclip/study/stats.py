"""Summary statistics over seeds: mean, sample standard deviation and the Welch t-interval of a difference.

The interval of a variant's difference to the baseline is Welch's: for samples a (variant) and b (baseline)
with sample variances s_a^2, s_b^2 and sizes n_a, n_b, the difference of means d = mean(a) - mean(b) has
standard error se = sqrt(s_a^2/n_a + s_b^2/n_b) and d +- t_{1-alpha/2, nu} * se, with the
Welch-Satterthwaite degrees of freedom nu = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)).
It needs at least 2 seeds on each side ("n/a" otherwise). The t quantile is computed here (no scipy):
the t density integrated by Simpson's rule and inverted by bisection, accurate to ~1e-8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def _t_pdf(x: float, nu: float) -> float:
    c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    return math.exp(c - (nu + 1) / 2 * math.log1p(x * x / nu))


def t_cdf(x: float, nu: float) -> float:
    """P(T <= x) for Student's t with nu (> 0, not necessarily integer) degrees of freedom."""
    if x < 0:
        return 1.0 - t_cdf(-x, nu)
    steps = 400  # Simpson on [0, x]: the density is smooth, so this is far below the printed precision
    h = x / steps
    total = _t_pdf(0.0, nu) + _t_pdf(x, nu)
    total += sum((4 if i % 2 else 2) * _t_pdf(i * h, nu) for i in range(1, steps))
    return 0.5 + total * h / 3


def t_quantile(p: float, nu: float) -> float:
    """x with t_cdf(x, nu) = p, for 0.5 <= p < 1 (bisection)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile: p={p} outside [0.5, 1)")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, nu) < p:
        hi *= 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, nu) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Interval:
    diff: float  # mean(variant) - mean(baseline)
    low: float | None  # None when an interval cannot be formed (fewer than 2 seeds on a side)
    high: float | None
    df: float | None
    level: float = 0.95

    def text(self, digits: int = 1) -> str:
        if self.low is None:
            return f"{self.diff:+.{digits}f} (n/a)"
        return f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    @property
    def excludes_zero(self) -> bool | None:
        return None if self.low is None else (self.low > 0 or self.high < 0)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Welch t-interval of mean(a) - mean(b) (see the module text); `low`/`high` None with < 2 values a side.
    Two samples with zero variance give a zero-width interval."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    d = ma - mb
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return Interval(d, None, None, None, level)
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(d, d, d, float(na + nb - 2), level)
    nu = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    half = t_quantile(1 - (1 - level) / 2, nu) * se
    return Interval(d, d - half, d + half, nu, level)
