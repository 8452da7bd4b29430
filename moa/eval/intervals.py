"""Confidence intervals for accuracies (pure Python).

Wilson's score interval: for k correct of n rows at z (1.96 for 95%),
    centre = (k + z²/2) / (n + z²),  half = z·sqrt(k(n−k)/n + z²/4) / (n + z²).
Unlike the normal approximation it stays inside [0, 1] and is honest at k = 0 or k = n and at small n.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of Wilson's interval for k successes in n trials, as fractions; (0, 1) for n = 0."""
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z * math.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    return max(0.0, centre - half), min(1.0, centre + half)
