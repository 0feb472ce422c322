"""Paired bootstrap over test examples: intervals for accuracies, hypervolumes and their differences.

Every model of an evaluation is measured on the same test examples, so one resample draws each
task's n test examples with replacement once and re-scores every model on that draw (paired):
differences between methods then carry only the noise that does not cancel. Intervals are
percentile intervals of the resampled statistic. One-sided bounds (`one_sided`, and the exact
binomial `binomial_bound` for an accuracy) certify a requirement such as "accuracy >= 0.8".
"""

from __future__ import annotations

import numpy as np


def accuracy_samples(correct: dict[str, np.ndarray], resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Resampled means {task: Array[B, R]} of R models from per-example metrics {task: Array[R, n_task]}
    (bool correctness for accuracy, or floats such as per-example losses).

    Resample b draws n_task examples of each task with replacement (multinomial counts), the same
    draw for all R models. Seeded: the same inputs give the same samples.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    out = {}
    for task, c in correct.items():
        c = np.asarray(c)
        if c.ndim != 2 or c.shape[1] == 0:
            raise ValueError(
                f"correctness of task {task!r} must be [models, examples] with examples > 0, got {c.shape}"
            )
        n = c.shape[1]
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)  # [B, n]
        out[task] = counts.astype(np.float64) @ c.T.astype(np.float64) / n
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (lo, hi) of samples [B, ...] along the first axis."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi


def one_sided(samples: np.ndarray, level: float, side: str) -> float:
    """One-sided percentile bound of resampled values samples [B]: "lower" (the (1 - level) quantile: the
    statistic is at least this with confidence `level`) or "upper" (the `level` quantile)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if side not in ("lower", "upper"):
        raise ValueError(f"side must be 'lower' or 'upper', got {side!r}")
    return float(np.quantile(np.asarray(samples, dtype=float), 1 - level if side == "lower" else level))


def binomial_bound(successes: int, n: int, level: float, side: str) -> float:
    """Exact (Clopper-Pearson) one-sided bound on a success probability from `successes` of n trials.

    "lower": the p with P(Binomial(n, p) >= successes) = 1 - level (0 when successes = 0);
    "upper": the p with P(Binomial(n, p) <= successes) = 1 - level (1 when successes = n).
    The true p lies beyond the bound with probability at most 1 - level, whatever p is.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if side not in ("lower", "upper"):
        raise ValueError(f"side must be 'lower' or 'upper', got {side!r}")
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    from scipy.stats import beta

    if side == "lower":
        return 0.0 if successes == 0 else float(beta.ppf(1 - level, successes, n - successes + 1))
    return 1.0 if successes == n else float(beta.ppf(level, successes + 1, n - successes))


__all__ = ["accuracy_samples", "binomial_bound", "interval", "one_sided"]
