"""Continuous scores per lead time (ME, MAE, MSE, RMSE and HKO-7 balanced B-MSE / B-MAE), streamed.

Follows :mod:`pysteps.verification.detcontscores` (``det_cont_fct_init / accum / merge /
compute``) but keeps plain sums and counts instead of pysteps' running means, so a merge is an
addition and the bootstrap can resample start times with one matrix product. Pairs where the
forecast or the observation is not finite are ignored, as in ``det_cont_fct``. With no valid pair
a score is NaN (pysteps reports 0 there because its running means start at 0). All sums of a
frame come from one compiled pass over its pixels (:mod:`~nowcast.verification._kernels`).

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
    leading_shape,
    merge,
)
from nowcast.verification._kernels import (
    as_frames,
    in_kernel_dtype,
    kernel_dtype,
    run_over_frames,
    sum_errors,
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
        The additive fields of :class:`ContinuousErrors`, each shaped (...). As in
        ``det_cont_fct``, each error is formed in the input dtype (float16 input in float32);
        the sums are float64.
    """
    forecast, observation = as_float_pair(forecast, observation)
    dtype = kernel_dtype(forecast.dtype)
    forecast_frames, observation_frames = as_frames(forecast, dtype), as_frames(observation, dtype)
    n_frames, n_pixels = forecast_frames.shape
    names = ContinuousErrors.additive_fields
    sums = np.empty((n_frames, len(names)))
    edges = tuple(in_kernel_dtype([edge for edge, _ in _WEIGHT_STEPS], forecast.dtype))
    steps = tuple(float(step) for _, step in _WEIGHT_STEPS)
    run_over_frames(
        sum_errors,
        n_frames,
        n_pixels,
        forecast_frames,
        observation_frames,
        float(HKO7_WEIGHTS[0]),
        edges,
        steps,
        dtype.type(np.inf),
        sums,
    )
    sums = sums.reshape(forecast.shape[:-2] + (len(names),))
    result = {name: sums[..., k] for k, name in enumerate(names)}
    result["n"] = result["n"].astype(np.int64)
    return result


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
