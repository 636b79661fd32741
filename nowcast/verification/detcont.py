"""Continuous scores per lead time (ME, MAE, MSE, RMSE and HKO-7 balanced B-MSE / B-MAE), streamed.

Follows :mod:`pysteps.verification.detcontscores` (``det_cont_fct_init / accum / merge /
compute``) but keeps plain sums and counts instead of pysteps' running means, so a merge is an
addition and the bootstrap can resample start times with one matrix product. Pairs where the
forecast or the observation is not finite are ignored, as in ``det_cont_fct``. With no valid pair
a score is NaN (pysteps reports 0 there because its running means start at 0).

The balanced scores follow the HKO-7 benchmark (Shi et al., 2017, "Deep learning for
precipitation nowcasting: a benchmark and a new model"): each squared (absolute) error is
weighted by :func:`balanced_weights` of the observed rain rate. HKO-7 reports the weighted sum
over the pixels of a frame; we divide by the number of valid pairs so that values do not depend on
grid size or radar mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nowcast.verification._accumulator import (
    ScoreAccumulator,
    add_into,
    as_coordinate,
    as_float_pair,
    as_stack,
    iter_frames,
    leading_shape,
    merge,
)

#: Rain-rate bin edges (mm/h) of the HKO-7 balanced scores; a bin includes its lower edge.
HKO7_THRESHOLDS = (0.5, 2.0, 5.0, 10.0, 30.0)
#: Weight of each bin: below 0.5, [0.5, 2), [2, 5), [5, 10), [10, 30) and from 30 mm/h up.
HKO7_WEIGHTS = (1.0, 1.0, 2.0, 5.0, 10.0, 30.0)

# (edge, weight increase at the edge), leaving out edges where the weight does not change.
_WEIGHT_STEPS = tuple(
    (edge, upper - lower)
    for edge, lower, upper in zip(HKO7_THRESHOLDS, HKO7_WEIGHTS[:-1], HKO7_WEIGHTS[1:], strict=True)
    if upper != lower
)

DEFAULT_SCORES = ("ME", "MAE", "MSE", "RMSE", "BMSE", "BMAE")
AVAILABLE_SCORES = DEFAULT_SCORES


def balanced_weights(rain_rate):
    """Return the HKO-7 weight of each rain rate.

    Parameters
    ----------
    rain_rate : array_like or torch.Tensor
        Observed rain rate in mm/h. numpy arrays, torch tensors and dask arrays all work, since
        only comparisons and arithmetic are used.

    Returns
    -------
    array_like
        Weights from :data:`HKO7_WEIGHTS` (bins :data:`HKO7_THRESHOLDS`), of the input's type;
        NaN where the rain rate is NaN or infinite.
    """
    if not hasattr(rain_rate, "shape"):
        rain_rate = np.asarray(rain_rate, dtype=np.float64)
    # 0 * rain_rate is 0 for finite rates and NaN otherwise, which keeps missing data missing
    # without a backend-specific isnan/where.
    weights = HKO7_WEIGHTS[0] + 0.0 * rain_rate
    for threshold, lower, upper in zip(
        HKO7_THRESHOLDS, HKO7_WEIGHTS[:-1], HKO7_WEIGHTS[1:], strict=True
    ):
        weights = weights + (upper - lower) * (rain_rate >= threshold)
    return weights


@dataclasses.dataclass(eq=False)
class ContinuousErrors(ScoreAccumulator):
    """Sums of errors and the number of valid pairs per lead time.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    n : numpy.ndarray
        int64 number of valid (both finite) pairs, shaped ([n_starts,] n_leadtimes).
    sum_error, sum_absolute_error, sum_squared_error : numpy.ndarray
        float64 sums of forecast - observation, its absolute value and its square.
    sum_weighted_absolute_error, sum_weighted_squared_error : numpy.ndarray
        The same sums weighted by :func:`balanced_weights` of the observation.
    """

    n: np.ndarray
    sum_error: np.ndarray
    sum_absolute_error: np.ndarray
    sum_squared_error: np.ndarray
    sum_weighted_absolute_error: np.ndarray
    sum_weighted_squared_error: np.ndarray

    additive_fields = (
        "n",
        "sum_error",
        "sum_absolute_error",
        "sum_squared_error",
        "sum_weighted_absolute_error",
        "sum_weighted_squared_error",
    )


def continuous_init(lead_times: Sequence[float], n_starts: int | None = None) -> ContinuousErrors:
    """Initialise empty continuous-score sums.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    ContinuousErrors
        Zero sums shaped ([n_starts,] n_leadtimes).
    """
    lead_times = as_coordinate(lead_times)
    shape = leading_shape(n_starts) + (lead_times.size,)
    return ContinuousErrors(
        lead_times,
        np.zeros(shape, dtype=np.int64),
        *(np.zeros(shape) for _ in ContinuousErrors.additive_fields[1:]),
    )


def continuous_sums(forecast: np.ndarray, observation: np.ndarray) -> dict[str, np.ndarray]:
    """Sum errors per frame over the valid pairs.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        Arrays of the same shape (..., y, x).

    Returns
    -------
    dict of numpy.ndarray
        The additive fields of :class:`ContinuousErrors`, each shaped (...).
    """
    forecast, observation = as_float_pair(forecast, observation)
    n_pixels = forecast.shape[-2] * forecast.shape[-1]
    names = ContinuousErrors.additive_fields
    sums = np.empty(forecast.shape[:-2] + (len(names),))
    # As in det_cont_fct, errors are computed in the input dtype; their sums are float64.
    error = np.empty(n_pixels, dtype=forecast.dtype)
    absolute_error = np.empty(n_pixels, dtype=forecast.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        for index, forecast_frame, observation_frame in iter_frames(forecast, observation):
            np.subtract(forecast_frame, observation_frame, out=error)
            n_valid = n_pixels
            sum_error = _blocked_sum(error)
            if not np.isfinite(sum_error):
                # A NaN or inf anywhere makes the sum non-finite; only then build the mask.
                valid = np.isfinite(error)
                n_valid = np.count_nonzero(valid)
                error[~valid] = 0.0
                observation_frame = np.where(valid, observation_frame, 0.0)
                sum_error = _blocked_sum(error)
            np.abs(error, out=absolute_error)
            sum_absolute_error = _blocked_sum(absolute_error)
            sum_squared_error = _blocked_sum(error, error)
            extra_absolute, extra_squared = _extra_weighted_sums(observation_frame, error)
            sums[index] = (
                n_valid,
                sum_error,
                sum_absolute_error,
                sum_squared_error,
                HKO7_WEIGHTS[0] * sum_absolute_error + extra_absolute,
                HKO7_WEIGHTS[0] * sum_squared_error + extra_squared,
            )
    result = {name: sums[..., k] for k, name in enumerate(names)}
    result["n"] = result["n"].astype(np.int64)
    return result


_SUM_ROWS = 64


def _blocked_sum(values: np.ndarray, other: np.ndarray | None = None) -> float:
    """Return sum(values) (or sum(values * other)) of 1-D arrays as a float64.

    The array is viewed as at most 64 rows and reduced down the rows: numpy adds whole rows
    with SIMD, so every column sums at most 64 terms in the input dtype, and the column sums
    are added in float64. This is three times faster than ``values.sum()`` (pairwise, but not
    vectorised across lanes) and as accurate for float32 frames: the error of a 64-term sum is a
    few ulp, against ~1e-6 relative for a single float32 accumulator over a 512 x 512 frame
    (which is what ``np.einsum`` and ``np.dot`` use).
    """
    n_rows = min(_SUM_ROWS, values.size)
    if n_rows == 0:
        return 0.0
    n_columns = values.size // n_rows
    n_main = n_rows * n_columns
    main = values[:n_main].reshape(n_rows, n_columns)
    if other is None:
        columns = main.sum(axis=0)
        rest = values[n_main:]
    else:
        # einsum multiplies and adds down the rows in one pass, without a squared-error array.
        columns = np.einsum("ij,ij->j", main, other[:n_main].reshape(n_rows, n_columns))
        rest = values[n_main:] * other[n_main:]
    return float(np.sum(columns, dtype=np.float64) + np.sum(rest, dtype=np.float64))


def _extra_weighted_sums(rain_rate: np.ndarray, error: np.ndarray) -> tuple[float, float]:
    """Return sum((w - w0) |e|) and sum((w - w0) e^2) for HKO-7 weights w and base weight w0.

    ``w - w0`` is zero below the first edge where the weight changes (2 mm/h), which is most
    pixels, so the pixels above it are gathered once and weighted there. Measured on 512 x 512
    radar frames: boolean indexing is the cheapest gather (``np.flatnonzero`` with ``np.take``
    costs three times more), and on the gathered pixels ``astype`` of a comparison is the
    cheapest indicator (``np.where``, ``np.take`` of a weight table and ``np.searchsorted``
    cost 5 to 20 times more).
    """
    (first_edge, first_step), *other_steps = _WEIGHT_STEPS
    heavier = rain_rate >= first_edge
    # Most frames hold no heavy rain; any() is far cheaper than an empty gather.
    if not heavier.any():
        return 0.0, 0.0
    rain_rate = rain_rate[heavier]
    absolute_error = np.abs(error[heavier])
    extra_weight = np.full(rain_rate.size, first_step, dtype=error.dtype)
    for edge, step in other_steps:
        extra_weight += step * (rain_rate >= edge).astype(error.dtype)
    weighted_absolute_error = extra_weight * absolute_error
    return (
        _blocked_sum(weighted_absolute_error),
        _blocked_sum(weighted_absolute_error, absolute_error),
    )


def continuous_accum(
    errors: ContinuousErrors, forecast: np.ndarray, observation: np.ndarray
) -> ContinuousErrors:
    """Accumulate a forecast stack into continuous-score sums (in place).

    Parameters
    ----------
    errors : ContinuousErrors
        Sums from :func:`continuous_init`.
    forecast, observation : array_like
        Arrays (n_leadtimes, y, x) or (n_starts, n_leadtimes, y, x) in mm/h. A start axis is
        summed out unless ``errors`` keeps one. Pairs with a non-finite value are ignored.

    Returns
    -------
    ContinuousErrors
        ``errors`` itself, for chaining.
    """
    forecast, observation = as_stack(forecast, observation, errors.lead_times.size)
    sums = continuous_sums(forecast, observation)
    for name in ContinuousErrors.additive_fields:
        add_into(errors, name, sums[name])
    return errors


def continuous_merge(first: ContinuousErrors, second: ContinuousErrors) -> ContinuousErrors:
    """Merge two continuous-score accumulators with the same lead times.

    Parameters
    ----------
    first, second : ContinuousErrors
        Sums built on disjoint data.

    Returns
    -------
    ContinuousErrors
        New accumulator with added sums; the inputs are unchanged.
    """
    return merge(first, second)


def continuous_compute(
    errors: ContinuousErrors, scores: Sequence[str] = DEFAULT_SCORES
) -> dict[str, np.ndarray]:
    """Compute continuous scores from accumulated sums.

    Parameters
    ----------
    errors : ContinuousErrors
        Accumulated sums; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Names (case-insensitive) among ME, MAE, MSE, RMSE, BMSE and BMAE; all by default.

    Returns
    -------
    dict of numpy.ndarray
        Score name (upper case) to float array shaped like ``errors.n``; NaN where there was no
        valid pair.
    """
    if isinstance(scores, str):
        scores = (scores,)
    unknown = [name for name in scores if name.upper() not in AVAILABLE_SCORES]
    if unknown:
        raise ValueError(f"unknown scores {unknown}; available: {', '.join(AVAILABLE_SCORES)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        n = errors.n.astype(np.float64)
        means = {
            "ME": errors.sum_error / n,
            "MAE": errors.sum_absolute_error / n,
            "MSE": errors.sum_squared_error / n,
            "BMSE": errors.sum_weighted_squared_error / n,
            "BMAE": errors.sum_weighted_absolute_error / n,
        }
        means["RMSE"] = np.sqrt(means["MSE"])
    return {name.upper(): means[name.upper()] for name in scores}
