"""Threshold-exceedance scores of ensembles per lead time and threshold, streamed.

The reliability diagram and the ROC curve follow :mod:`pysteps.verification.probscores`
(``reldiag_*`` and ``ROC_curve_*``) with counts kept per lead time and threshold; the Brier
score (:mod:`~nowcast.verification.brier`) is built on the same histograms. Forecasts and
observations are laid out as in :mod:`~nowcast.verification.ensemble`.

Conventions, as pysteps' ``excprob``, ``reldiag`` and ``ROC_curve``:

- An event is ``value >= threshold``, compared in the data's dtype (CSI keeps ``>``).
- The forecast probability is the fraction of members with an event, ``k / m`` for ``k`` of
  ``m`` members, as ``pysteps.postprocessing.ensemblestats.excprob``.
- A pixel where the observation or any member is not finite is left out (``excprob`` then gives
  NaN, which ``reldiag_accum`` and ``ROC_curve_accum`` drop).
- The ROC curve has m + 1 probability thresholds, ``numpy.linspace(0, 1, m + 1)``, and its area
  comes from ``ROC_curve_compute`` itself.
- ``reldiag_accum`` zeroes a bin that holds fewer than ``min_count`` samples in one call; here a
  call is one frame (one start and lead time), so pysteps called per window and lead time gives
  the same diagram.

Each frame is first reduced to a histogram of (number of members with an event, observed event);
every score here is a sum over that histogram.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nowcast import import_pysteps
from nowcast.verification._accumulator import (
    ScoreAccumulator,
    add_into,
    as_coordinate,
    leading_shape,
    merge,
)
from nowcast.verification.ensemble import (
    as_ensemble,
    check_scores,
    check_settings,
    member_frames,
    valid_pixels,
)

_roc_curve_compute = import_pysteps("pysteps.verification.probscores").ROC_curve_compute

#: Rain-rate thresholds (mm/h) of the probability scores.
DEFAULT_THRESHOLDS = (1.0, 5.0, 10.0)


def member_probabilities(n_members: int) -> np.ndarray:
    """Return the forecast probabilities ``k / m``, k = 0 .. m, as ``excprob`` forms them."""
    return 1.0 * np.arange(n_members + 1) / n_members


def event_histograms(
    forecast: np.ndarray, observation: np.ndarray, thresholds: Sequence[float]
) -> np.ndarray:
    """Count pixels per frame by number of members with an event and by observed event.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        Arrays checked by :func:`~nowcast.verification.ensemble.as_ensemble`.
    thresholds : sequence of float
        Event thresholds (event: ``value >= threshold``).

    Returns
    -------
    numpy.ndarray
        int64 array ([n_starts,] n_leadtimes, n_thresholds, 2, n_members + 1): ``[..., 0, k]``
        counts the valid pixels without an observed event and ``k`` members with one,
        ``[..., 1, k]`` those with an observed event.
    """
    n_members = forecast.shape[-4]
    thresholds = [float(threshold) for threshold in thresholds]
    shape = observation.shape[:-2] + (len(thresholds), 2, n_members + 1)
    histograms = np.zeros(shape, dtype=np.int64)
    for index, members, observed in member_frames(forecast, observation):
        members, observed = valid_pixels(members, observed)
        for t, threshold in enumerate(thresholds):
            k = (members >= threshold).sum(axis=0)
            event = observed >= threshold
            cells = np.bincount(k + (n_members + 1) * event, minlength=2 * (n_members + 1))
            histograms[index + (t,)] = cells.reshape(2, n_members + 1)
    return histograms


@dataclasses.dataclass(eq=False)
class ReliabilitySums(ScoreAccumulator):
    """Reliability-diagram sums per lead time, threshold and probability bin.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    thresholds : numpy.ndarray
        Event thresholds, shape (n_thresholds,).
    bin_centres : numpy.ndarray
        Centres of the probability bins, shape (n_bins,).
    sum_probability : numpy.ndarray
        float64 sum of the forecast probabilities in each bin (pysteps' ``X_sum``), shaped
        ([n_starts,] n_leadtimes, n_thresholds, n_bins).
    n_observed : numpy.ndarray
        int64 number of observed events in each bin (``Y_sum``), same shape.
    n : numpy.ndarray
        int64 number of samples in each bin (``num_idx``), same shape.
    min_count : int
        A bin with fewer samples in one frame adds nothing from that frame.
    """

    thresholds: np.ndarray
    bin_centres: np.ndarray
    sum_probability: np.ndarray
    n_observed: np.ndarray
    n: np.ndarray
    min_count: int = 10

    dims = ("lead_time", "threshold", "bin")
    coordinate_fields = ("lead_times", "thresholds", "bin_centres")
    additive_fields = ("sum_probability", "n_observed", "n")

    @property
    def bin_edges(self) -> np.ndarray:
        """pysteps' bin edges, ``numpy.linspace(-1e-6, 1 + 1e-6, n_bins + 1)``."""
        return np.linspace(-1e-6, 1 + 1e-6, int(self.bin_centres.size + 1))


def reldiag_init(
    lead_times: Sequence[float],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    n_bins: int = 10,
    min_count: int = 10,
    n_starts: int | None = None,
) -> ReliabilitySums:
    """Initialise empty reliability-diagram sums.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    thresholds : sequence of float, optional
        Event thresholds (mm/h), by default 1, 5 and 10.
    n_bins : int, optional
        Number of probability bins, by default 10 (as pysteps).
    min_count : int, optional
        Minimum number of samples of a bin in one frame, by default 10 (as pysteps).
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    ReliabilitySums
        Zero sums shaped ([n_starts,] n_leadtimes, n_thresholds, n_bins).
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    lead_times = as_coordinate(lead_times)
    thresholds = as_coordinate(thresholds)
    edges = np.linspace(-1e-6, 1 + 1e-6, int(n_bins) + 1)
    centres = 0.5 * (edges[:-1] + edges[1:])
    shape = leading_shape(n_starts) + (lead_times.size, thresholds.size, centres.size)
    return ReliabilitySums(
        lead_times,
        thresholds,
        centres,
        np.zeros(shape),
        np.zeros(shape, dtype=np.int64),
        np.zeros(shape, dtype=np.int64),
        int(min_count),
    )


def reldiag_accum(sums: ReliabilitySums, forecast, observation) -> ReliabilitySums:
    """Accumulate an ensemble into reliability-diagram sums (in place).

    Parameters
    ----------
    sums : ReliabilitySums
        Sums from :func:`reldiag_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x) in mm/h.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x) in mm/h.

    Returns
    -------
    ReliabilitySums
        ``sums`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, sums.lead_times.size)
    histograms = event_histograms(forecast, observation, sums.thresholds)
    probabilities = member_probabilities(forecast.shape[-4])
    # One-hot (n_members + 1, n_bins): the bin of each probability, as reldiag_accum digitizes.
    bins = np.digitize(probabilities, sums.bin_edges, right=True) - 1
    in_bin = (bins[:, None] == np.arange(sums.bin_centres.size)).astype(np.int64)
    per_k = histograms.sum(axis=-2)
    count = per_k @ in_bin
    kept = count >= sums.min_count
    add_into(sums, "n", np.where(kept, count, 0))
    add_into(sums, "n_observed", np.where(kept, histograms[..., 1, :] @ in_bin, 0))
    add_into(sums, "sum_probability", np.where(kept, (per_k * probabilities) @ in_bin, 0.0))
    return sums


def reldiag_merge(first: ReliabilitySums, second: ReliabilitySums) -> ReliabilitySums:
    """Merge two reliability-diagram accumulators with the same coordinates and ``min_count``.

    Parameters
    ----------
    first, second : ReliabilitySums
        Sums built on disjoint data.

    Returns
    -------
    ReliabilitySums
        New accumulator with added sums; the inputs are unchanged.
    """
    check_settings(first, second, ("min_count",))
    return merge(first, second)


def reldiag_compute(sums: ReliabilitySums, scores: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Compute the points of the reliability diagram (pysteps' ``reldiag_compute``).

    Parameters
    ----------
    sums : ReliabilitySums
        Accumulated sums; any leading axes are kept.
    scores : sequence of str, optional
        Ignored: the diagram is a curve, with no summary score; see :func:`reldiag_curves`.

    Returns
    -------
    dict of numpy.ndarray
        ``FORECAST_PROBABILITY`` (mean forecast probability of each bin) and
        ``OBSERVED_FREQUENCY`` (observed relative frequency of the event), shaped like the
        sums; NaN for an empty bin.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "FORECAST_PROBABILITY": sums.sum_probability / sums.n,
            "OBSERVED_FREQUENCY": sums.n_observed / sums.n,
        }


def reldiag_curves(sums: ReliabilitySums) -> dict[str, dict[str, np.ndarray]]:
    """Return the reliability diagram as a curve for tidy tables.

    Parameters
    ----------
    sums : ReliabilitySums
        A pooled accumulator.

    Returns
    -------
    dict
        ``{"RELIABILITY": {"x": mean forecast probability, "y": observed frequency, "n":
        samples}}``, each shaped (n_leadtimes, n_thresholds, n_bins).
    """
    points = reldiag_compute(sums)
    return {
        "RELIABILITY": {
            "x": points["FORECAST_PROBABILITY"],
            "y": points["OBSERVED_FREQUENCY"],
            "n": sums.n.astype(np.float64),
        }
    }


@dataclasses.dataclass(eq=False)
class ROCCounts(ScoreAccumulator):
    """pysteps' ROC-curve counts per lead time, threshold and probability threshold.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    thresholds : numpy.ndarray
        Event thresholds, shape (n_thresholds,).
    probability_thresholds : numpy.ndarray
        ``numpy.linspace(0, 1, n_members + 1)``; a pixel is forecast "yes" at ``p`` when its
        forecast probability is ``>= p``.
    hits, misses, false_alarms, correct_negatives : numpy.ndarray
        int64 counts shaped ([n_starts,] n_leadtimes, n_thresholds, n_probability_thresholds).
    """

    thresholds: np.ndarray
    probability_thresholds: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    false_alarms: np.ndarray
    correct_negatives: np.ndarray

    dims = ("lead_time", "threshold", "probability_threshold")
    coordinate_fields = ("lead_times", "thresholds", "probability_thresholds")
    additive_fields = ("hits", "misses", "false_alarms", "correct_negatives")


def roc_init(
    lead_times: Sequence[float],
    n_members: int,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    n_starts: int | None = None,
) -> ROCCounts:
    """Initialise empty ROC counts with ``n_members + 1`` probability thresholds.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    n_members : int
        Number of members m of the ensembles; the curve has m + 1 probability thresholds.
    thresholds : sequence of float, optional
        Event thresholds (mm/h), by default 1, 5 and 10.
    n_starts : int, optional
        Keep counts per forecast start time (for the bootstrap).

    Returns
    -------
    ROCCounts
        Zero counts shaped ([n_starts,] n_leadtimes, n_thresholds, n_members + 1).
    """
    if int(n_members) < 1:
        raise ValueError(f"n_members must be at least 1, got {n_members}")
    lead_times = as_coordinate(lead_times)
    thresholds = as_coordinate(thresholds)
    probability_thresholds = np.linspace(0.0, 1.0, int(n_members) + 1)
    shape = leading_shape(n_starts) + (lead_times.size, thresholds.size, int(n_members) + 1)
    return ROCCounts(
        lead_times,
        thresholds,
        probability_thresholds,
        *(np.zeros(shape, dtype=np.int64) for _ in ROCCounts.additive_fields),
    )


def roc_accum(counts: ROCCounts, forecast, observation) -> ROCCounts:
    """Accumulate an ensemble into ROC counts (in place).

    Parameters
    ----------
    counts : ROCCounts
        Counts from :func:`roc_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x) in mm/h.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x) in mm/h.

    Returns
    -------
    ROCCounts
        ``counts`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, counts.lead_times.size)
    histograms = event_histograms(forecast, observation, counts.thresholds)
    probabilities = member_probabilities(forecast.shape[-4])
    # (n_members + 1, n_probability_thresholds): does k members' probability say "yes" at p?
    yes = (probabilities[:, None] >= counts.probability_thresholds).astype(np.int64)
    no = 1 - yes
    observed_no, observed_yes = histograms[..., 0, :], histograms[..., 1, :]
    add_into(counts, "hits", observed_yes @ yes)
    add_into(counts, "misses", observed_yes @ no)
    add_into(counts, "false_alarms", observed_no @ yes)
    add_into(counts, "correct_negatives", observed_no @ no)
    return counts


def roc_merge(first: ROCCounts, second: ROCCounts) -> ROCCounts:
    """Merge two ROC accumulators with the same coordinates.

    Parameters
    ----------
    first, second : ROCCounts
        Counts built on disjoint data.

    Returns
    -------
    ROCCounts
        New accumulator with added counts; the inputs are unchanged.
    """
    return merge(first, second)


def roc_curve(counts: ROCCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the ROC curve and its area with pysteps' ``ROC_curve_compute``.

    Parameters
    ----------
    counts : ROCCounts
        Accumulated counts; any leading axes are kept.

    Returns
    -------
    tuple of numpy.ndarray
        POFD and POD, shaped like the counts, and the area under the curve, shaped like the
        counts without the probability-threshold axis. The order (POFD, POD) is pysteps'.
    """
    roc = {
        "hits": np.moveaxis(counts.hits, -1, 0),
        "misses": np.moveaxis(counts.misses, -1, 0),
        "false_alarms": np.moveaxis(counts.false_alarms, -1, 0),
        "corr_neg": np.moveaxis(counts.correct_negatives, -1, 0),
        "prob_thrs": counts.probability_thresholds,
    }
    with np.errstate(divide="ignore", invalid="ignore"):
        pofd, pod, area = _roc_curve_compute(roc, compute_area=True)
    pofd = np.moveaxis(np.asarray(pofd, dtype=np.float64), 0, -1)
    pod = np.moveaxis(np.asarray(pod, dtype=np.float64), 0, -1)
    return pofd, pod, np.asarray(area, dtype=np.float64)


def roc_compute(counts: ROCCounts, scores: Sequence[str] = ("ROC_AREA",)) -> dict[str, np.ndarray]:
    """Compute the area under the ROC curve.

    Parameters
    ----------
    counts : ROCCounts
        Accumulated counts; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("ROC_AREA",)``.

    Returns
    -------
    dict of numpy.ndarray
        ``{"ROC_AREA": array}`` shaped ([...,] n_leadtimes, n_thresholds); NaN where no event or
        no non-event was observed.
    """
    check_scores(scores, ("ROC_AREA",))
    return {"ROC_AREA": roc_curve(counts)[2]}


def roc_curves(counts: ROCCounts) -> dict[str, dict[str, np.ndarray]]:
    """Return the ROC curve for tidy tables.

    Parameters
    ----------
    counts : ROCCounts
        A pooled accumulator.

    Returns
    -------
    dict
        ``{"ROC": {"x": POFD, "y": POD, "n": valid samples}}``, each shaped (n_leadtimes,
        n_thresholds, n_members + 1).
    """
    pofd, pod, _ = roc_curve(counts)
    total = counts.hits + counts.misses + counts.false_alarms + counts.correct_negatives
    return {"ROC": {"x": pofd, "y": pod, "n": total.astype(np.float64)}}
