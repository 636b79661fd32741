"""Brier score of exceedance probabilities per lead time and threshold, streamed.

The Brier score is the mean of (p - o)^2 over the valid pixels, for a forecast probability p of
``value >= threshold`` and the observed event o (1 or 0). An ensemble's probability is the
fraction of members with an event, as in :mod:`~nowcast.verification.probabilistic`; a
probability forecast (pysteps' ``lagrangian_probability``, the reference of the Brier skill
score) enters through :func:`brier_accum_probability`. pysteps 1.21.5 has no Brier score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nowcast.verification._accumulator import (
    ScoreAccumulator,
    add_into,
    as_coordinate,
    check_compatible,
    leading_shape,
    merge,
)
from nowcast.verification.ensemble import as_ensemble, check_scores, member_frames, valid_pixels
from nowcast.verification.probabilistic import (
    DEFAULT_THRESHOLDS,
    event_histograms,
    member_probabilities,
)


@dataclasses.dataclass(eq=False)
class BrierSums(ScoreAccumulator):
    """Sums of squared probability errors per lead time and threshold.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    thresholds : numpy.ndarray
        Event thresholds, shape (n_thresholds,).
    sum_squared_error : numpy.ndarray
        float64 sum of (probability - observed event)^2, shaped ([n_starts,] n_leadtimes,
        n_thresholds).
    n : numpy.ndarray
        int64 number of valid pixels, same shape.
    """

    thresholds: np.ndarray
    sum_squared_error: np.ndarray
    n: np.ndarray

    dims = ("lead_time", "threshold")
    coordinate_fields = ("lead_times", "thresholds")
    additive_fields = ("sum_squared_error", "n")


def brier_init(
    lead_times: Sequence[float],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    n_starts: int | None = None,
) -> BrierSums:
    """Initialise empty Brier-score sums.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    thresholds : sequence of float, optional
        Event thresholds (mm/h), by default 1, 5 and 10.
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    BrierSums
        Zero sums shaped ([n_starts,] n_leadtimes, n_thresholds).
    """
    lead_times = as_coordinate(lead_times)
    thresholds = as_coordinate(thresholds)
    shape = leading_shape(n_starts) + (lead_times.size, thresholds.size)
    return BrierSums(lead_times, thresholds, np.zeros(shape), np.zeros(shape, dtype=np.int64))


def brier_accum(sums: BrierSums, forecast, observation) -> BrierSums:
    """Accumulate an ensemble into Brier-score sums (in place).

    Parameters
    ----------
    sums : BrierSums
        Sums from :func:`brier_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x) in mm/h; its probability is the
        fraction of members with an event.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x) in mm/h.

    Returns
    -------
    BrierSums
        ``sums`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, sums.lead_times.size)
    histograms = event_histograms(forecast, observation, sums.thresholds)
    probabilities = member_probabilities(forecast.shape[-4])
    squared = (
        histograms[..., 0, :] * probabilities**2
        + histograms[..., 1, :] * (1.0 - probabilities) ** 2
    )
    add_into(sums, "sum_squared_error", squared.sum(axis=-1))
    add_into(sums, "n", histograms.sum(axis=(-2, -1)))
    return sums


def brier_accum_probability(sums: BrierSums, probability, observation) -> BrierSums:
    """Accumulate exceedance probabilities (not an ensemble) into Brier-score sums (in place).

    For probability forecasts such as pysteps' ``lagrangian_probability``, the reference of the
    Brier skill score.

    Parameters
    ----------
    sums : BrierSums
        Sums from :func:`brier_init`.
    probability : array_like
        Probabilities of ``value >= threshold``, ([n_starts,] n_thresholds, n_leadtimes, y, x),
        thresholds first as ``excprob`` returns them, in the order of ``sums.thresholds``.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x) in mm/h.

    Returns
    -------
    BrierSums
        ``sums`` itself, for chaining. Pixels where the probability or the observation is not
        finite are left out.
    """
    probability = np.asarray(probability)
    if probability.ndim not in (4, 5) or probability.shape[-4] != sums.thresholds.size:
        raise ValueError(
            f"expected probabilities shaped ([n_starts,] n_thresholds={sums.thresholds.size}, "
            f"n_leadtimes, y, x), got {probability.shape}"
        )
    probability, observation = as_ensemble(probability, observation, sums.lead_times.size)
    leading = observation.shape[:-2]
    squared = np.zeros(leading + (sums.thresholds.size,))
    count = np.zeros(leading + (sums.thresholds.size,), dtype=np.int64)
    for index, frames, observed in member_frames(probability, observation):
        for t, threshold in enumerate(sums.thresholds):
            p, observed_t = valid_pixels(frames[t : t + 1], observed)
            event = (observed_t >= float(threshold)).astype(np.float64)
            squared[index + (t,)] = np.square(p[0].astype(np.float64) - event).sum()
            count[index + (t,)] = event.size
    add_into(sums, "sum_squared_error", squared)
    add_into(sums, "n", count)
    return sums


def brier_merge(first: BrierSums, second: BrierSums) -> BrierSums:
    """Merge two Brier-score accumulators with the same coordinates.

    Parameters
    ----------
    first, second : BrierSums
        Sums built on disjoint data.

    Returns
    -------
    BrierSums
        New accumulator with added sums; the inputs are unchanged.
    """
    return merge(first, second)


def brier_compute(sums: BrierSums, scores: Sequence[str] = ("BRIER",)) -> dict[str, np.ndarray]:
    """Compute the Brier score.

    Parameters
    ----------
    sums : BrierSums
        Accumulated sums; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("BRIER",)``.

    Returns
    -------
    dict of numpy.ndarray
        ``{"BRIER": array}`` shaped like the sums; NaN without a valid pixel.
    """
    check_scores(scores, ("BRIER",))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"BRIER": sums.sum_squared_error / sums.n}


def brier_skill_score(sums: BrierSums, reference: BrierSums) -> np.ndarray:
    """Brier skill score against a reference forecast, 1 - BS / BS_reference.

    Parameters
    ----------
    sums : BrierSums
        Accumulated sums of the forecast.
    reference : BrierSums
        Sums of the reference (e.g. ``lagrangian_probability`` through
        :func:`brier_accum_probability`) over the same lead times, thresholds and pixels.

    Returns
    -------
    numpy.ndarray
        Skill shaped like the sums: 1 is perfect, 0 no better than the reference; NaN or inf
        where the reference's Brier score is undefined or 0.
    """
    check_compatible(sums, reference)
    score = brier_compute(sums)["BRIER"]
    reference_score = brier_compute(reference)["BRIER"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - score / reference_score
