"""Paired bootstrap: a confidence interval and a p-value for a base → fine-tuned difference on the same test items."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(base, tuned, finish=None, resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Resample test items with replacement (the same items for both systems) and recompute the difference.

    `base` and `tuned` are per-item scores [n] or per-item sufficient statistics [n, d]; `finish(summed [r, d]) ->
    [r]` turns summed statistics into the metric (default: the mean of per-item scores). The p-value is two-sided:
    twice the smaller share of resampled differences on either side of zero (the paired bootstrap test of
    Koehn 2004), floored at 1/resamples."""
    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if b.shape[0] != t.shape[0] or b.shape[0] == 0:
        raise ValueError("paired bootstrap needs two equally long, non-empty score lists")
    if b.ndim == 1:
        b, t = np.column_stack([b, np.ones_like(b)]), np.column_stack([t, np.ones_like(t)])
        finish = lambda s: s[:, 0] / s[:, 1]  # noqa: E731
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(b.shape[0], np.full(b.shape[0], 1 / b.shape[0]), size=resamples)  # [r, n] weights
    diffs = finish(counts @ t) - finish(counts @ b)
    observed = float(finish(t.sum(0, keepdims=True))[0] - finish(b.sum(0, keepdims=True))[0])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {"difference": observed, "ci_low": float(low), "ci_high": float(high),
            "p_value": float(min(1.0, max(p, 1 / resamples))), "resamples": resamples, "confidence": confidence,
            "significant": bool(low > 0 or high < 0)}


def compare(task_type: str, base_predictions, tuned_predictions, references, choices=None, resamples: int = 2000,
            seed: int = 0, confidence: float = 0.95) -> dict:
    """Bootstrap every metric of a task for one base → fine-tuned comparison on the same test items."""
    from .metrics import metric_statistics

    base = metric_statistics(task_type, base_predictions, references, choices)
    tuned = metric_statistics(task_type, tuned_predictions, references, choices)
    return {m: paired_bootstrap(base[m][0], tuned[m][0], base[m][1], resamples, seed, confidence) for m in base}
