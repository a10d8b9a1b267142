"""Paired bootstrap: a confidence interval and a p-value for a base → fine-tuned difference on the same test items."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(base: list[float], tuned: list[float], resamples: int = 2000, seed: int = 0,
                     confidence: float = 0.95, statistic=None) -> dict:
    """Resample test items with replacement (the same items for both systems) and recompute the difference.

    `statistic(indices) -> (base_value, tuned_value)` recomputes a corpus metric (BLEU, chrF) on a resample; by
    default the metric is the mean of the per-item scores. The p-value is two-sided: twice the smaller share of
    resampled differences on either side of zero (the usual paired bootstrap test, Koehn 2004), floored at
    1/resamples."""
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if b.shape != t.shape or b.size == 0:
        raise ValueError("paired bootstrap needs two equally long, non-empty score lists")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, b.size, size=(resamples, b.size))
    if statistic is None:
        diffs = t[idx].mean(axis=1) - b[idx].mean(axis=1)
        observed = float(t.mean() - b.mean())
    else:
        pairs = np.array([statistic(row) for row in idx])
        diffs = pairs[:, 1] - pairs[:, 0]
        ob = statistic(np.arange(b.size))
        observed = float(ob[1] - ob[0])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {"difference": observed, "ci_low": float(low), "ci_high": float(high),
            "p_value": float(min(1.0, max(p, 1 / resamples))), "resamples": resamples, "confidence": confidence,
            "significant": bool(low > 0 or high < 0)}
