"""Contingency-table (categorical) scores per lead time and threshold, streamed.

Follows :mod:`pysteps.verification.detcatscores` (``det_cat_fct_init / accum / merge /
compute``) on whole forecast stacks; a compiled kernel
(:mod:`~nowcast.verification._kernels`) counts every threshold in one read of each pixel.

Conventions, checked against pysteps 1.21.5:

- An event is ``value > threshold`` (strictly greater), as in ``det_cat_fct_accum``. The
  comparison happens in the dtype of the data, as numpy does for a Python float threshold.
- Pairs where forecast or observation is not finite are dropped from all four cells. pysteps
  documents "NaNs are ignored" but its accum counts a NaN as a non-event, so a NaN observation
  under forecast rain becomes a false alarm and NaN pairs become correct negatives. Pixels outside
  radar range are NaN, so we drop them; our table equals pysteps' table computed on the finite
  pairs only.
- Scores come from ``det_cat_fct_compute`` itself, so formulas and zero-denominator results
  (NaN for 0/0, inf for x/0) are pysteps' own.
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
    as_float_pair,
    as_stack,
    leading_shape,
    merge,
)
from nowcast.verification._kernels import (
    as_frames,
    count_events,
    in_kernel_dtype,
    kernel_dtype,
    run_over_frames,
)

det_cat_fct_compute = import_pysteps("pysteps.verification.detcatscores").det_cat_fct_compute

DEFAULT_SCORES = ("CSI", "POD", "FAR", "HSS", "ETS", "BIAS")
# Score names det_cat_fct_compute understands (it silently ignores anything else).
AVAILABLE_SCORES = (
    "ACC",
    "BIAS",
    "CSI",
    "ETS",
    "F1",
    "FA",
    "FAR",
    "GSS",
    "HK",
    "HSS",
    "MCC",
    "POD",
    "SEDI",
)


@dataclasses.dataclass(eq=False)
class ContingencyTable(ScoreAccumulator):
    """Hits, misses, false alarms and correct negatives per lead time and threshold.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    thresholds : numpy.ndarray
        Rain-rate thresholds, shape (n_thresholds,).
    hits, misses, false_alarms, correct_negatives : numpy.ndarray
        int64 counts shaped ([n_starts,] n_leadtimes, n_thresholds).
    """

    thresholds: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    false_alarms: np.ndarray
    correct_negatives: np.ndarray

    dims = ("lead_time", "threshold")
    coordinate_fields = ("lead_times", "thresholds")
    additive_fields = ("hits", "misses", "false_alarms", "correct_negatives")


def contingency_init(
    lead_times: Sequence[float], thresholds: Sequence[float], n_starts: int | None = None
) -> ContingencyTable:
    """Initialise an empty contingency table.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes (the coordinate of the forecast's lead-time axis).
    thresholds : sequence of float
        Event thresholds (same unit as the fields, e.g. mm/h).
    n_starts : int, optional
        Keep counts per forecast start time (needed for the bootstrap); the input to
        :func:`contingency_accum` must then have a leading start axis of this length.

    Returns
    -------
    ContingencyTable
        Table of zero counts shaped ([n_starts,] n_leadtimes, n_thresholds).
    """
    lead_times = as_coordinate(lead_times)
    thresholds = as_coordinate(thresholds)
    shape = leading_shape(n_starts) + (lead_times.size, thresholds.size)
    return ContingencyTable(
        lead_times,
        thresholds,
        *(np.zeros(shape, dtype=np.int64) for _ in ContingencyTable.additive_fields),
    )


def contingency_counts(
    forecast: np.ndarray, observation: np.ndarray, thresholds: Sequence[float]
) -> dict[str, np.ndarray]:
    """Count contingency-table cells per frame and threshold.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        Arrays of the same shape (..., y, x).
    thresholds : sequence of float
        Event thresholds; an event is ``value > threshold``, compared in the data's dtype.

    Returns
    -------
    dict of numpy.ndarray
        ``hits``, ``misses``, ``false_alarms`` and ``correct_negatives``, int64 arrays shaped
        (..., n_thresholds). Pairs with a non-finite value are not counted.
    """
    forecast, observation = as_float_pair(forecast, observation)
    dtype = kernel_dtype(forecast.dtype)
    thresholds = in_kernel_dtype(thresholds, forecast.dtype)
    n_thresholds = thresholds.size
    forecast_frames, observation_frames = as_frames(forecast, dtype), as_frames(observation, dtype)
    n_frames, n_pixels = forecast_frames.shape
    # Per frame: [n_valid, n_forecast(t)..., n_observed(t)..., n_both(t)...].
    counts = np.zeros((n_frames, 1 + 3 * n_thresholds), dtype=np.int64)
    run_over_frames(
        count_events,
        n_frames,
        n_pixels,
        forecast_frames,
        observation_frames,
        thresholds,
        dtype.type(np.inf),
        counts,
    )
    counts = counts.reshape(forecast.shape[:-2] + counts.shape[-1:])
    n_valid = counts[..., :1]
    n_forecast, n_observed, hits = np.split(counts[..., 1:], 3, axis=-1)
    return {
        "hits": hits,
        "misses": n_observed - hits,
        "false_alarms": n_forecast - hits,
        "correct_negatives": n_valid - n_forecast - n_observed + hits,
    }


def contingency_accum(
    table: ContingencyTable, forecast: np.ndarray, observation: np.ndarray
) -> ContingencyTable:
    """Accumulate a forecast stack into a contingency table (in place).

    Parameters
    ----------
    table : ContingencyTable
        Table from :func:`contingency_init`.
    forecast, observation : array_like
        Arrays (n_leadtimes, y, x) or (n_starts, n_leadtimes, y, x). A start axis is summed out
        unless the table keeps one. Pairs with a non-finite value are ignored.

    Returns
    -------
    ContingencyTable
        ``table`` itself, for chaining.
    """
    forecast, observation = as_stack(forecast, observation, table.lead_times.size)
    counts = contingency_counts(forecast, observation, table.thresholds)
    for name in ContingencyTable.additive_fields:
        add_into(table, name, counts[name])
    return table


def contingency_merge(first: ContingencyTable, second: ContingencyTable) -> ContingencyTable:
    """Merge two contingency tables with the same coordinates.

    Parameters
    ----------
    first, second : ContingencyTable
        Tables built on disjoint data (other starts, workers or tiles).

    Returns
    -------
    ContingencyTable
        New table with summed counts; the inputs are unchanged.
    """
    return merge(first, second)


def contingency_compute(
    table: ContingencyTable, scores: Sequence[str] = DEFAULT_SCORES
) -> dict[str, np.ndarray]:
    """Compute categorical scores from a contingency table.

    Parameters
    ----------
    table : ContingencyTable
        Accumulated table; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Score names (case-insensitive) from :data:`AVAILABLE_SCORES`, by default CSI, POD, FAR,
        HSS, ETS and BIAS.

    Returns
    -------
    dict of numpy.ndarray
        Score name (upper case, as pysteps names it) to float array shaped like the counts.
    """
    if isinstance(scores, str):
        scores = (scores,)
    unknown = [name for name in scores if name.upper() not in AVAILABLE_SCORES]
    if unknown:
        raise ValueError(f"unknown scores {unknown}; available: {', '.join(AVAILABLE_SCORES)}")
    contab = {name: getattr(table, name) for name in ContingencyTable.additive_fields}
    with np.errstate(divide="ignore", invalid="ignore"):
        result = det_cat_fct_compute(contab, [name.lower() for name in scores])
    return {name: np.asarray(value, dtype=np.float64) for name, value in result.items()}
