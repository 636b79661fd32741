"""Fractions skill score (FSS) per lead time, threshold and scale, streamed.

Follows :mod:`pysteps.verification.spatialscores` (``fss_init / accum / merge / compute``) and
reproduces ``fss_accum``, whose fractions are ``scipy.ndimage.uniform_filter`` of the event
fields (``mode="constant"``: zero outside the grid). A compiled kernel
(:func:`~nowcast.verification._kernels.fractions_products`) counts the events in each window
from a summed-area table, built once per frame and threshold and read at every scale: the same
fractions (exact counts, where the filter rounds running means), at four lookups per pixel
whatever the window size (speed against the filters: docs/performance.md).

Conventions of pysteps 1.21.5 kept here (they differ from :mod:`nowcast.verification.detcat`):

- An event is ``value >= threshold``.
- A non-finite value is a non-event (pysteps sets it to ``threshold - 1``), in the forecast and the
  observation independently; such pixels are not dropped.
- No filtering at scale 1 (or below).
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
    fractions_products,
    in_kernel_dtype,
    kernel_dtype,
    run_over_frames,
)

_pysteps_fss_compute = import_pysteps("pysteps.verification.spatialscores").fss_compute


@dataclasses.dataclass(eq=False)
class FractionsSums(ScoreAccumulator):
    """FSS sums per lead time, threshold and scale.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    thresholds : numpy.ndarray
        Event thresholds, shape (n_thresholds,).
    scales : numpy.ndarray
        Window sizes in pixels (int), shape (n_scales,).
    sum_fct_sq, sum_fct_obs, sum_obs_sq : numpy.ndarray
        float64 sums of squared forecast fractions, of forecast times observed fractions and of
        squared observed fractions, shaped ([n_starts,] n_leadtimes, n_thresholds, n_scales).
    """

    thresholds: np.ndarray
    scales: np.ndarray
    sum_fct_sq: np.ndarray
    sum_fct_obs: np.ndarray
    sum_obs_sq: np.ndarray

    dims = ("lead_time", "threshold", "scale")
    coordinate_fields = ("lead_times", "thresholds", "scales")
    additive_fields = ("sum_fct_sq", "sum_fct_obs", "sum_obs_sq")


def fss_init(
    lead_times: Sequence[float],
    thresholds: Sequence[float],
    scales: Sequence[int],
    n_starts: int | None = None,
) -> FractionsSums:
    """Initialise empty FSS sums.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    thresholds : sequence of float
        Event thresholds.
    scales : sequence of int
        Square window sizes in pixels.
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    FractionsSums
        Zero sums shaped ([n_starts,] n_leadtimes, n_thresholds, n_scales).
    """
    lead_times = as_coordinate(lead_times)
    thresholds = as_coordinate(thresholds)
    scales = as_coordinate(scales, dtype=np.int64)
    shape = leading_shape(n_starts) + (lead_times.size, thresholds.size, scales.size)
    return FractionsSums(
        lead_times,
        thresholds,
        scales,
        *(np.zeros(shape) for _ in FractionsSums.additive_fields),
    )


def fss_sums(
    forecast: np.ndarray,
    observation: np.ndarray,
    thresholds: Sequence[float],
    scales: Sequence[int],
) -> dict[str, np.ndarray]:
    """Compute the FSS sums per frame, threshold and scale.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        Arrays of the same shape (..., y, x).
    thresholds : sequence of float
        Event thresholds (event: ``value >= threshold``, compared in the data's dtype).
    scales : sequence of int
        Window sizes in pixels.

    Returns
    -------
    dict of numpy.ndarray
        The additive fields of :class:`FractionsSums`, shaped (..., n_thresholds, n_scales).
    """
    forecast, observation = as_float_pair(forecast, observation)
    dtype = kernel_dtype(forecast.dtype)
    thresholds = in_kernel_dtype(thresholds, forecast.dtype)
    scales = np.asarray(scales, dtype=np.int64)
    frame_shape = forecast.shape[-2:]
    forecast_frames = as_frames(forecast, dtype).reshape((-1,) + frame_shape)
    observation_frames = as_frames(observation, dtype).reshape((-1,) + frame_shape)
    n_frames = forecast_frames.shape[0]
    sums = np.zeros((n_frames, thresholds.size, scales.size, 3))
    run_over_frames(
        fractions_products,
        n_frames,
        frame_shape[0] * frame_shape[1],
        forecast_frames,
        observation_frames,
        thresholds,
        scales,
        dtype.type(np.inf),
        sums,
    )
    sums = sums.reshape(forecast.shape[:-2] + sums.shape[1:])
    return {name: sums[..., n] for n, name in enumerate(FractionsSums.additive_fields)}


def fss_accum(sums: FractionsSums, forecast: np.ndarray, observation: np.ndarray) -> FractionsSums:
    """Accumulate a forecast stack into FSS sums (in place).

    Parameters
    ----------
    sums : FractionsSums
        Sums from :func:`fss_init`.
    forecast, observation : array_like
        Arrays (n_leadtimes, y, x) or (n_starts, n_leadtimes, y, x). A start axis is summed out
        unless ``sums`` keeps one. Non-finite values count as non-events.

    Returns
    -------
    FractionsSums
        ``sums`` itself, for chaining.
    """
    forecast, observation = as_stack(forecast, observation, sums.lead_times.size)
    frame_sums = fss_sums(forecast, observation, sums.thresholds, sums.scales)
    for name in FractionsSums.additive_fields:
        add_into(sums, name, frame_sums[name])
    return sums


def fss_merge(first: FractionsSums, second: FractionsSums) -> FractionsSums:
    """Merge two FSS accumulators with the same coordinates.

    Parameters
    ----------
    first, second : FractionsSums
        Sums built on disjoint start times.

    Returns
    -------
    FractionsSums
        New accumulator with added sums; the inputs are unchanged.
    """
    return merge(first, second)


def fss_compute(sums: FractionsSums, scores: Sequence[str] = ("FSS",)) -> dict[str, np.ndarray]:
    """Compute the FSS from accumulated sums.

    Parameters
    ----------
    sums : FractionsSums
        Accumulated sums; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("FSS",)``; the argument exists so that every score family has the same
        ``compute(accumulator, scores)`` signature.

    Returns
    -------
    dict of numpy.ndarray
        ``{"FSS": array}`` shaped like the sums; NaN where neither field had an event.
    """
    if isinstance(scores, str):
        scores = (scores,)
    unknown = [name for name in scores if name.upper() != "FSS"]
    if unknown:
        raise ValueError(f"unknown scores {unknown}; available: FSS")
    fields = {name: getattr(sums, name) for name in FractionsSums.additive_fields}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"FSS": np.asarray(_pysteps_fss_compute(fields), dtype=np.float64)}
