"""Bootstrap confidence intervals over forecast start times.

Scores of consecutive lead times and neighbouring pixels are strongly correlated, so the unit
that is resampled is the forecast start time: a per-start accumulator (a leading start axis, see
``n_starts`` of the ``*_init`` functions) is resampled with replacement and pooled. Drawing start
indices with replacement and summing is the same as weighting each start by a multinomial count,
so all bootstrap samples come from one (n_boot, n_starts) @ (n_starts, ...) matrix product.

Percentile intervals are used. Samples whose score is NaN (e.g. no observed event in the drawn
starts) are left out of the quantiles.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np

from nowcast.verification._accumulator import ScoreAccumulator, sum_starts, weighted_starts

ComputeFunction = Callable[[ScoreAccumulator], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True, eq=False)
class ConfidenceInterval:
    """A point estimate with its bootstrap percentile interval.

    Attributes
    ----------
    estimate : numpy.ndarray
        Score of the pooled start times.
    lower, upper : numpy.ndarray
        Interval bounds, same shape as ``estimate``.
    """

    estimate: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def resampling_counts(
    n_starts: int, n_boot: int = 1000, seed: int | np.random.Generator | None = 0
) -> np.ndarray:
    """Draw how often each start time appears in each bootstrap sample.

    Parameters
    ----------
    n_starts : int
        Number of forecast start times.
    n_boot : int, optional
        Number of bootstrap samples, by default 1000.
    seed : int or numpy.random.Generator or None, optional
        Seed for :func:`numpy.random.default_rng`, by default 0 (reproducible).

    Returns
    -------
    numpy.ndarray
        int64 array (n_boot, n_starts); every row sums to n_starts.
    """
    if n_starts < 1 or n_boot < 1:
        raise ValueError(f"need n_starts >= 1 and n_boot >= 1, got {n_starts}, {n_boot}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_starts, np.full(n_starts, 1.0 / n_starts), size=n_boot)


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the lower and upper percentile bounds along the first axis, ignoring NaN."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    with warnings.catch_warnings():
        # An all-NaN slice (a score undefined in every sample) has a NaN interval; that is the
        # answer, not a problem worth a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        lower, upper = np.nanquantile(samples, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return lower, upper


def _sample_scores(
    per_start: ScoreAccumulator, compute: ComputeFunction, counts: np.ndarray
) -> dict[str, np.ndarray]:
    """Scores of every bootstrap sample, each shaped (n_boot, ...)."""
    return compute(weighted_starts(per_start, counts))


def bootstrap_ci(
    per_start: ScoreAccumulator,
    compute: ComputeFunction,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int | np.random.Generator | None = 0,
) -> dict[str, ConfidenceInterval]:
    """Bootstrap confidence intervals of pooled scores.

    Parameters
    ----------
    per_start : ScoreAccumulator
        Accumulator with a leading start axis (``n_starts`` given to its init, or built with
        ``concat_starts``).
    compute : callable
        Score function of the family, e.g. :func:`~nowcast.verification.detcat.
        contingency_compute` or a ``functools.partial`` of it choosing the scores.
    n_boot : int, optional
        Number of bootstrap samples, by default 1000.
    confidence : float, optional
        Interval coverage, by default 0.95 (2.5th and 97.5th percentiles).
    seed : int or numpy.random.Generator or None, optional
        Seed of the resampling, by default 0.

    Returns
    -------
    dict of ConfidenceInterval
        Score name to its estimate (all starts pooled) and interval.
    """
    counts = resampling_counts(_require_starts(per_start), n_boot, seed)
    estimates = compute(sum_starts(per_start))
    samples = _sample_scores(per_start, compute, counts)
    return {
        name: ConfidenceInterval(estimates[name], *_percentiles(samples[name], confidence))
        for name in estimates
    }


def bootstrap_difference(
    per_start_a: ScoreAccumulator,
    per_start_b: ScoreAccumulator,
    compute: ComputeFunction,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int | np.random.Generator | None = 0,
) -> dict[str, ConfidenceInterval]:
    """Paired bootstrap interval of the score difference between two methods (a - b).

    Both methods are verified on the same start times; each bootstrap sample draws one set of
    start times and uses it for both, which removes the case-to-case variation they share.

    Parameters
    ----------
    per_start_a, per_start_b : ScoreAccumulator
        Per-start accumulators of the two methods, same type, coordinates and start order.
    compute : callable
        Score function of the family.
    n_boot : int, optional
        Number of bootstrap samples, by default 1000.
    confidence : float, optional
        Interval coverage, by default 0.95.
    seed : int or numpy.random.Generator or None, optional
        Seed of the resampling, by default 0.

    Returns
    -------
    dict of ConfidenceInterval
        Score name to the pooled difference a - b and its interval.
    """
    n_starts = _require_starts(per_start_a)
    if per_start_b.n_starts != n_starts or type(per_start_a) is not type(per_start_b):
        raise ValueError("paired bootstrap needs two accumulators of one type over the same starts")
    counts = resampling_counts(n_starts, n_boot, seed)
    estimates_a = compute(sum_starts(per_start_a))
    estimates_b = compute(sum_starts(per_start_b))
    samples_a = _sample_scores(per_start_a, compute, counts)
    samples_b = _sample_scores(per_start_b, compute, counts)
    return {
        name: ConfidenceInterval(
            estimates_a[name] - estimates_b[name],
            *_percentiles(samples_a[name] - samples_b[name], confidence),
        )
        for name in estimates_a
    }


def _require_starts(per_start: ScoreAccumulator) -> int:
    """Return the number of start times, raising ValueError for a pooled accumulator."""
    if per_start.n_starts is None:
        raise ValueError(
            "the bootstrap needs per-start accumulators: pass n_starts to the init function "
            "or stack pooled ones with concat_starts"
        )
    return per_start.n_starts
