"""Percentile-bootstrap intervals for evaluation reports (both demos; any user comparing two models).

Every interval is ``{"mean", "lo", "hi", "n"}``; a paired difference adds ``"significant"`` (the interval
excludes 0). Resampling is over rows (captions, prompts), seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> dict[str, float]:
    """Mean of ``values`` and its percentile-bootstrap ``level`` interval; NaNs are dropped (a metric that does not
    apply to a row, e.g. the order of a one-event caption)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    alpha = 1 - level
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(values))}


def paired_difference(after: Sequence[float] | np.ndarray, before: Sequence[float] | np.ndarray,
                      n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float | bool]:
    """``after - before`` row by row (the same rows scored twice), with its bootstrap interval and whether that
    interval excludes 0."""
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    ci: dict = bootstrap_ci(diff, n_boot, seed, level)
    ci["significant"] = bool(ci["lo"] > 0 or ci["hi"] < 0)
    return ci
