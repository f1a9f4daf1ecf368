"""The classification benchmark's statistics: pure functions of per-sample correctness arrays.

Every model in the benchmark is evaluated on the same held-out texts, so two models are compared
sample by sample (paired): McNemar's exact test on the texts where exactly one of them is right,
and a paired bootstrap of the accuracy difference (texts resampled with replacement, the same
resample for both models). A student row trained with several seeds is summarized by its mean
and spread over seeds; its paired comparisons use the per-text correctness averaged over seeds,
so the interval covers text sampling, and the seed spread is reported beside it.
"""

from __future__ import annotations

import math

import numpy as np


def mcnemar_exact(first_correct: np.ndarray, second_correct: np.ndarray) -> dict:
    """McNemar's exact two-sided test of two classifiers on the same texts.

    first_correct, second_correct: (n,) bool, whether each model got text i right.
    Returns b (first right, second wrong), c (the reverse) and the two-sided p-value of the
    binomial test of b against Binomial(b + c, 1/2): min(1, 2 · P(X ≤ min(b, c)));
    1.0 when b + c = 0 (no evidence either way)."""
    first, second = _as_bool(first_correct), _as_bool(second_correct)
    if first.shape != second.shape:
        raise ValueError(f"paired arrays differ in shape: {first.shape} vs {second.shape}")
    b = int(np.sum(first & ~second))
    c = int(np.sum(~first & second))
    discordant = b + c
    if discordant == 0:
        return {"b": b, "c": c, "p_value": 1.0}
    tail = sum(math.comb(discordant, i) for i in range(min(b, c) + 1))
    # Exact integer arithmetic before the one division: no underflow for large b + c.
    p_value = min(1.0, 2 * tail / 2**discordant)
    return {"b": b, "c": c, "p_value": float(p_value)}


def paired_bootstrap(
    first_correct: np.ndarray,
    second_correct: np.ndarray,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Paired bootstrap of the accuracy difference first − second.

    first_correct, second_correct: (n,) or (seeds, n) correctness (bool or 0/1); with a seed
    axis each text's correctness is first averaged over that model's seeds (the two models may
    have different seed counts). Each resample draws n text indices with replacement, the same
    for both models. Returns the observed difference, the percentile interval at `confidence`,
    and the share of resamples with a difference ≤ 0 (a one-sided bootstrap p-value)."""
    first, second = _per_text(first_correct), _per_text(second_correct)
    if first.shape != second.shape:
        raise ValueError(f"paired arrays differ in texts: {first.shape} vs {second.shape}")
    difference = first - second
    generator = np.random.default_rng(seed)
    indices = generator.integers(0, len(difference), size=(resamples, len(difference)))
    resampled = difference[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return {
        "difference": float(difference.mean()),
        "low": float(low),
        "high": float(high),
        "confidence": confidence,
        "share_not_above_zero": float(np.mean(resampled <= 0)),
        "resamples": resamples,
    }


def mean_and_spread(values) -> dict:
    """Mean, sample standard deviation (ddof 1; 0 for one value), min and max over seeds."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("no values to summarize")
    spread = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {
        "mean": float(array.mean()),
        "std": spread,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": int(array.size),
    }


def gap_closed(student: float, baseline: float, teacher: float) -> float:
    """(student − baseline) / (teacher − baseline): 0 at the baseline, 1 at the teacher; nan
    when the teacher is no better than the baseline (there is no gap to close)."""
    gap = teacher - baseline
    return (student - baseline) / gap if gap > 0 else float("nan")


def _as_bool(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).astype(bool)


def _per_text(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array.mean(axis=0) if array.ndim == 2 else array
