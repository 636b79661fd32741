"""Rank histogram per lead time and its divergence from flat, streamed.

Follows :mod:`pysteps.verification.ensscores` (``rankhist_init / accum / compute``) with counts
kept per lead time, so histograms merge by addition and start times can be bootstrapped.
Forecasts and observations are laid out as in :mod:`~nowcast.verification.ensemble`.

Conventions of pysteps 1.21.5 kept here:

- Pixels where the observation or any member is not finite are left out, and so are pixels where
  the observation and every member are below ``x_min``.
- Values below ``x_min`` become ``x_min - 1``, so dry members and a dry observation tie.
- The rank of an observation is the number of members below it; an observation equal to ``e``
  members gets a rank drawn uniformly from the ``e + 1`` ranks it spans. The draws come from
  ``np.random.uniform`` (as in pysteps) unless a generator is given, one call per frame with
  ties, in C order of (start, lead time) and of the pixels; pysteps called per window and lead
  time in that order, after the same ``np.random.seed``, gives the same histogram.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nowcast.verification._accumulator import (
    ScoreAccumulator,
    add_into,
    as_coordinate,
    leading_shape,
    merge,
)
from nowcast.verification.ensemble import (
    DEFAULT_X_MIN,
    as_ensemble,
    check_scores,
    check_settings,
    member_frames,
    valid_pixels,
)


@dataclasses.dataclass(eq=False)
class RankHistogram(ScoreAccumulator):
    """Counts of the observation's rank among the members, per lead time.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    ranks : numpy.ndarray
        Ranks 0 .. n_members (int), shape (n_members + 1,).
    counts : numpy.ndarray
        int64 counts shaped ([n_starts,] n_leadtimes, n_members + 1).
    x_min : float or None
        Rain rate below which values count as dry; None: no threshold.
    """

    ranks: np.ndarray
    counts: np.ndarray
    x_min: float | None = DEFAULT_X_MIN

    dims = ("lead_time", "rank")
    coordinate_fields = ("lead_times", "ranks")
    additive_fields = ("counts",)


def rankhist_init(
    lead_times: Sequence[float],
    n_members: int,
    x_min: float | None = DEFAULT_X_MIN,
    n_starts: int | None = None,
) -> RankHistogram:
    """Initialise an empty rank histogram.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    n_members : int
        Number of ensemble members of the forecasts to accumulate.
    x_min : float or None, optional
        Dry threshold (mm/h), by default 0.1; None keeps every pixel.
    n_starts : int, optional
        Keep counts per forecast start time (for the bootstrap).

    Returns
    -------
    RankHistogram
        Zero counts shaped ([n_starts,] n_leadtimes, n_members + 1).
    """
    if int(n_members) < 1:
        raise ValueError(f"n_members must be at least 1, got {n_members}")
    lead_times = as_coordinate(lead_times)
    ranks = np.arange(int(n_members) + 1, dtype=np.int64)
    shape = leading_shape(n_starts) + (lead_times.size, ranks.size)
    x_min = None if x_min is None else float(x_min)
    return RankHistogram(lead_times, ranks, np.zeros(shape, dtype=np.int64), x_min)


def frame_ranks(
    members: np.ndarray, observed: np.ndarray, x_min: float | None, random_state=None
) -> np.ndarray:
    """Count the observation's ranks over one frame.

    Parameters
    ----------
    members : numpy.ndarray
        (n_members, y, x).
    observed : numpy.ndarray
        (y, x).
    x_min : float or None
        Dry threshold, see :class:`RankHistogram`.
    random_state : numpy.random.Generator or numpy.random.RandomState, optional
        Source of the tie-breaking draws; by default the global ``np.random``, as pysteps.

    Returns
    -------
    numpy.ndarray
        int64 counts per rank, (n_members + 1,).
    """
    n_members = members.shape[0]
    members, observed = valid_pixels(members, observed)
    if x_min is not None:
        wet = (observed >= x_min) | (members >= x_min).any(axis=0)
        members, observed = members[:, wet], observed[wet]
        members = np.where(members < x_min, members.dtype.type(x_min - 1), members)
        observed = np.where(observed < x_min, observed.dtype.type(x_min - 1), observed)
    below = (members < observed).sum(axis=0)
    equal = (members == observed).sum(axis=0)
    ranks = below
    tied = np.flatnonzero(equal > 0)
    if tied.size > 0:
        draw = (np.random if random_state is None else random_state).uniform(
            low=0.0, high=1.0, size=tied.size
        )
        # The arithmetic of rankhist_accum, so that truncation agrees at every draw.
        ranks[tied] = (below[tied] + draw * (equal[tied] + 1)).astype(int)
    return np.bincount(ranks, minlength=n_members + 1)


def rankhist_accum(
    histogram: RankHistogram, forecast, observation, random_state=None
) -> RankHistogram:
    """Accumulate an ensemble into a rank histogram (in place).

    Parameters
    ----------
    histogram : RankHistogram
        Histogram from :func:`rankhist_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x) with the histogram's number of
        members.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x).
    random_state : numpy.random.Generator or numpy.random.RandomState, optional
        Source of the tie-breaking draws; by default the global ``np.random``, as pysteps. Give
        one seeded per window for results that do not depend on the order of the windows.

    Returns
    -------
    RankHistogram
        ``histogram`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, histogram.lead_times.size)
    n_members = histogram.ranks.size - 1
    if forecast.shape[-4] != n_members:
        raise ValueError(
            f"the rank histogram has {n_members} members but the forecast has {forecast.shape[-4]}"
        )
    counts = np.zeros(observation.shape[:-2] + (n_members + 1,), dtype=np.int64)
    for index, members, observed in member_frames(forecast, observation):
        counts[index] = frame_ranks(members, observed, histogram.x_min, random_state)
    add_into(histogram, "counts", counts)
    return histogram


def rankhist_merge(first: RankHistogram, second: RankHistogram) -> RankHistogram:
    """Merge two rank histograms with the same coordinates and ``x_min``.

    Parameters
    ----------
    first, second : RankHistogram
        Histograms built on disjoint data.

    Returns
    -------
    RankHistogram
        New histogram with added counts; the inputs are unchanged.
    """
    check_settings(first, second, ("x_min",))
    return merge(first, second)


def rank_frequencies(histogram: RankHistogram) -> np.ndarray:
    """Return the normalised rank histogram (pysteps' ``rankhist_compute(normalize=True)``).

    Parameters
    ----------
    histogram : RankHistogram
        Accumulated counts; any leading axes are kept.

    Returns
    -------
    numpy.ndarray
        Relative frequencies shaped like the counts, summing to one over the ranks; NaN where
        nothing was counted.
    """
    counts = histogram.counts.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return counts / counts.sum(axis=-1, keepdims=True)


def rankhist_compute(
    histogram: RankHistogram, scores: Sequence[str] = ("RANK_KL",)
) -> dict[str, np.ndarray]:
    """Compute the divergence of the rank histogram from a flat one.

    ``RANK_KL`` is the Kullback-Leibler divergence D_KL(h || u) = sum_i h_i log(h_i / u_i), in
    nats, of the normalised histogram h from the uniform u_i = 1 / (n_members + 1): 0 for a flat
    histogram, larger for U shapes (under-dispersion), domes or slopes (bias). Empty ranks add
    nothing.

    Parameters
    ----------
    histogram : RankHistogram
        Accumulated counts; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("RANK_KL",)``.

    Returns
    -------
    dict of numpy.ndarray
        ``{"RANK_KL": array}`` shaped like the counts without the rank axis; NaN where nothing
        was counted.
    """
    check_scores(scores, ("RANK_KL",))
    frequencies = rank_frequencies(histogram)
    n_ranks = histogram.ranks.size
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(frequencies > 0, frequencies * np.log(frequencies * n_ranks), 0.0)
    divergence = terms.sum(axis=-1)
    return {"RANK_KL": np.where(np.isnan(frequencies).any(axis=-1), np.nan, divergence)}


def rankhist_curves(histogram: RankHistogram) -> dict[str, dict[str, np.ndarray]]:
    """Return the rank histogram as a curve for tidy tables.

    Parameters
    ----------
    histogram : RankHistogram
        A pooled histogram.

    Returns
    -------
    dict
        ``{"RANK_HISTOGRAM": {"x": rank, "y": relative frequency, "n": count}}``, each shaped
        (n_leadtimes, n_members + 1).
    """
    ranks = np.broadcast_to(histogram.ranks, histogram.counts.shape).astype(np.float64)
    return {
        "RANK_HISTOGRAM": {
            "x": ranks,
            "y": rank_frequencies(histogram),
            "n": histogram.counts.astype(np.float64),
        }
    }
