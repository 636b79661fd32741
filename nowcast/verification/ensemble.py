"""Ensemble scores per lead time (CRPS, pooled CRPS, spread/skill ratio), streamed.

Follows :mod:`pysteps.verification.probscores` (``CRPS_init / accum / compute``), keeping plain
sums and counts so that partial results merge by addition and start times can be bootstrapped.
This module also holds the input layout shared by every ensemble family
(:func:`as_ensemble`, :func:`member_frames`).

Forecasts are ensembles shaped ``(n_members, n_leadtimes, y, x)`` (the CF ``realization``
dimension first), or ``(n_starts, n_members, n_leadtimes, y, x)`` with a start axis; the
observation is ``([n_starts,] n_leadtimes, y, x)``. A pixel where the observation or any member is
not finite is left out, as pysteps' CRPS leaves it out. Frames are visited in C order of
``(start, lead time)``, the order in which pysteps is called per window and lead time.

The CRPS is pysteps 1.21.5's piecewise integral over the sorted members (Hersbach, 2000),
computed by a compiled kernel (:mod:`~nowcast.verification._ensemble_kernels`) with the same
tests and arithmetic. Its interval tests are strict, so an interval of the ensemble CDF with an
end equal to the observation adds nothing. With the observation at 0 mm/h and some members at
0, the interval from the last dry member to the first wet one is dropped: pysteps' CRPS is then
lower than the integral of the squared CDF difference (by well under 1 % on BoM scenes with
rain, more on nearly dry ones). A one-member ensemble has no inner interval: its CRPS is the
absolute error, so a deterministic forecast's CRPS is its MAE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from nowcast.verification._accumulator import (
    ScoreAccumulator,
    add_into,
    as_coordinate,
    as_float_pair,
    leading_shape,
    merge,
)
from nowcast.verification._ensemble_kernels import crps_sum
from nowcast.verification._kernels import kernel_dtype

#: Pooling sizes (pixels) of the pooled CRPS.
DEFAULT_SCALES = (1, 4, 16)
#: Rain rate (mm/h) below which the rank histogram treats values as dry.
DEFAULT_X_MIN = 0.1


def as_ensemble(forecast, observation, n_leadtimes: int) -> tuple[np.ndarray, np.ndarray]:
    """Check and return an ensemble forecast and its observation as numpy arrays.

    Parameters
    ----------
    forecast : array_like
        Ensemble (n_members, n_leadtimes, y, x) or (n_starts, n_members, n_leadtimes, y, x);
        xarray objects are turned into their values.
    observation : array_like
        Observation (n_leadtimes, y, x) or (n_starts, n_leadtimes, y, x).
    n_leadtimes : int
        Expected length of the lead-time axis.

    Returns
    -------
    tuple of numpy.ndarray
        Forecast and observation in their common floating dtype.
    """
    forecast = np.asarray(forecast)
    observation = np.asarray(observation)
    if forecast.ndim not in (4, 5) or forecast.size == 0 or forecast.shape[-3] != n_leadtimes:
        raise ValueError(
            f"expected an ensemble shaped ([n_starts,] n_members, n_leadtimes={n_leadtimes}, "
            f"y, x), got {forecast.shape}"
        )
    expected = forecast.shape[:-4] + forecast.shape[-3:]
    if observation.shape != expected:
        raise ValueError(
            f"observation shaped {observation.shape} does not match the ensemble "
            f"{forecast.shape}: expected {expected}"
        )
    return as_float_pair(forecast, observation)


def member_frames(
    forecast: np.ndarray, observation: np.ndarray
) -> Iterator[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """Yield the frames of an ensemble in C order of (start, lead time).

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        Arrays checked by :func:`as_ensemble`.

    Yields
    ------
    index : tuple of int
        ``(start, lead)`` or ``(lead,)``: where the frame's result goes.
    members : numpy.ndarray
        The members of the frame, (n_members, y, x).
    observed : numpy.ndarray
        The observed frame, (y, x).
    """
    for index in np.ndindex(observation.shape[:-2]):
        members = forecast[index[0], :, index[1]] if len(index) == 2 else forecast[:, index[0]]
        yield index, members, observation[index]


def valid_pixels(members: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the pixels of one frame where the observation and every member are finite.

    Parameters
    ----------
    members : numpy.ndarray
        (n_members, y, x).
    observed : numpy.ndarray
        (y, x).

    Returns
    -------
    tuple of numpy.ndarray
        Members (n_members, n_valid) and observation (n_valid,), in C order of the pixels.
    """
    members = members.reshape(members.shape[0], -1)
    observed = observed.reshape(-1)
    valid = np.isfinite(observed) & np.isfinite(members).all(axis=0)
    return members[:, valid], observed[valid]


def check_settings(first, second, names: Sequence[str]) -> None:
    """Raise ValueError unless two accumulators share the settings ``names`` (not coordinates)."""
    for name in names:
        if getattr(first, name) != getattr(second, name):
            raise ValueError(
                f"cannot merge: {name} differ, {getattr(first, name)} != {getattr(second, name)}"
            )


@dataclasses.dataclass(eq=False)
class CRPSSums(ScoreAccumulator):
    """Sums of pysteps' CRPS and the number of valid pixels per lead time.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    sum_crps : numpy.ndarray
        float64 sum of the CRPS (mm/h) over the valid pixels, shaped ([n_starts,] n_leadtimes).
    n : numpy.ndarray
        int64 number of valid pixels, same shape.
    """

    sum_crps: np.ndarray
    n: np.ndarray

    additive_fields = ("sum_crps", "n")


@dataclasses.dataclass(eq=False)
class PooledCRPSSums(ScoreAccumulator):
    """Sums of the CRPS of k x k block means per lead time and pooling size.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    scales : numpy.ndarray
        Block sizes k in pixels (int), shape (n_scales,).
    sum_crps, n : numpy.ndarray
        float64 sum of the CRPS over the valid blocks and their int64 number, shaped
        ([n_starts,] n_leadtimes, n_scales).
    """

    scales: np.ndarray
    sum_crps: np.ndarray
    n: np.ndarray

    dims = ("lead_time", "scale")
    coordinate_fields = ("lead_times", "scales")
    additive_fields = ("sum_crps", "n")


def crps_init(lead_times: Sequence[float], n_starts: int | None = None) -> CRPSSums:
    """Initialise empty CRPS sums.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    CRPSSums
        Zero sums shaped ([n_starts,] n_leadtimes).
    """
    lead_times = as_coordinate(lead_times)
    shape = leading_shape(n_starts) + (lead_times.size,)
    return CRPSSums(lead_times, np.zeros(shape), np.zeros(shape, dtype=np.int64))


def crps_pooled_init(
    lead_times: Sequence[float],
    scales: Sequence[int] = DEFAULT_SCALES,
    n_starts: int | None = None,
) -> PooledCRPSSums:
    """Initialise empty pooled-CRPS sums.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    scales : sequence of int, optional
        Block sizes k in pixels, by default 1, 4 and 16.
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    PooledCRPSSums
        Zero sums shaped ([n_starts,] n_leadtimes, n_scales).
    """
    lead_times = as_coordinate(lead_times)
    scales = as_coordinate(scales, dtype=np.int64)
    if (scales < 1).any():
        raise ValueError(f"pooling sizes must be at least 1 pixel, got {scales.tolist()}")
    shape = leading_shape(n_starts) + (lead_times.size, scales.size)
    return PooledCRPSSums(lead_times, scales, np.zeros(shape), np.zeros(shape, dtype=np.int64))


def frame_crps(members: np.ndarray, observed: np.ndarray) -> tuple[float, int]:
    """Sum pysteps' CRPS over the valid pixels of one frame.

    Parameters
    ----------
    members : numpy.ndarray
        (n_members, y, x).
    observed : numpy.ndarray
        (y, x).

    Returns
    -------
    tuple
        The float64 sum of the CRPS and the number of valid pixels. float16 data is computed in
        float32.
    """
    n_members = members.shape[0]
    dtype = kernel_dtype(members.dtype)
    members = np.ascontiguousarray(members, dtype=dtype).reshape(n_members, -1)
    observed = np.ascontiguousarray(observed, dtype=dtype).reshape(-1)
    p = 1.0 * np.arange(n_members + 1) / n_members  # as CRPS_accum
    total, n_valid = crps_sum(members, observed, p**2.0, (1.0 - p) ** 2.0)
    return float(total), int(n_valid)


def block_mean(fields: np.ndarray, size: int) -> np.ndarray:
    """Average non-overlapping ``size`` x ``size`` blocks of the last two axes.

    Rows and columns past the last whole block are dropped (pysteps' ``aggregate_fields`` with
    ``trim=True``); a block with a NaN pixel is NaN. Rows are averaged before columns, as
    ``aggregate_fields(..., axis=(-2, -1))`` does.

    Parameters
    ----------
    fields : numpy.ndarray
        (..., y, x).
    size : int
        Block size in pixels.

    Returns
    -------
    numpy.ndarray
        (..., y // size, x // size), in the input dtype.
    """
    n_rows, n_columns = fields.shape[-2] // size, fields.shape[-1] // size
    trimmed = fields[..., : n_rows * size, : n_columns * size]
    blocks = trimmed.reshape(fields.shape[:-2] + (n_rows, size, n_columns * size))
    rows = blocks.mean(axis=-2)
    return rows.reshape(rows.shape[:-1] + (n_columns, size)).mean(axis=-1)


def crps_sums(
    forecast: np.ndarray, observation: np.ndarray, scales: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Sum pysteps' CRPS per frame, at full resolution or after block pooling.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        Arrays checked by :func:`as_ensemble`.
    scales : sequence of int, optional
        Block sizes; the members and the observation are averaged over blocks of each size
        (:func:`block_mean`) before the CRPS, so a block with no data in any field is left out.
        None: no pooling and no scale axis.

    Returns
    -------
    dict of numpy.ndarray
        ``sum_crps`` (float64) and ``n`` (int64) shaped ([n_starts,] n_leadtimes[, n_scales]).
    """
    leading = observation.shape[:-2]
    extra = () if scales is None else (len(scales),)
    sums, counts = np.zeros(leading + extra), np.zeros(leading + extra, dtype=np.int64)
    for index, members, observed in member_frames(forecast, observation):
        if scales is None:
            sums[index], counts[index] = frame_crps(members, observed)
            continue
        for k, size in enumerate(scales):
            pooled = frame_crps(block_mean(members, int(size)), block_mean(observed, int(size)))
            sums[index + (k,)], counts[index + (k,)] = pooled
    return {"sum_crps": sums, "n": counts}


def crps_accum(sums: CRPSSums, forecast, observation) -> CRPSSums:
    """Accumulate an ensemble into CRPS sums (in place).

    Parameters
    ----------
    sums : CRPSSums
        Sums from :func:`crps_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x) in mm/h. A deterministic forecast is
        a one-member ensemble, whose CRPS is its MAE.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x) in mm/h.

    Returns
    -------
    CRPSSums
        ``sums`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, sums.lead_times.size)
    frame_sums = crps_sums(forecast, observation)
    for name in CRPSSums.additive_fields:
        add_into(sums, name, frame_sums[name])
    return sums


def crps_pooled_accum(sums: PooledCRPSSums, forecast, observation) -> PooledCRPSSums:
    """Accumulate an ensemble into pooled-CRPS sums (in place).

    Parameters
    ----------
    sums : PooledCRPSSums
        Sums from :func:`crps_pooled_init`.
    forecast, observation : array_like
        As for :func:`crps_accum`.

    Returns
    -------
    PooledCRPSSums
        ``sums`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, sums.lead_times.size)
    frame_sums = crps_sums(forecast, observation, sums.scales)
    for name in PooledCRPSSums.additive_fields:
        add_into(sums, name, frame_sums[name])
    return sums


def crps_merge(first, second):
    """Merge two CRPS (or two pooled-CRPS) accumulators with the same coordinates.

    Parameters
    ----------
    first, second : CRPSSums or PooledCRPSSums
        Sums built on disjoint data.

    Returns
    -------
    CRPSSums or PooledCRPSSums
        New accumulator with added sums; the inputs are unchanged.
    """
    return merge(first, second)


def crps_compute(sums: CRPSSums, scores: Sequence[str] = ("CRPS",)) -> dict[str, np.ndarray]:
    """Compute the mean CRPS from accumulated sums.

    Parameters
    ----------
    sums : CRPSSums
        Accumulated sums; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("CRPS",)``; the argument keeps the ``compute(accumulator, scores)`` signature
        of every family.

    Returns
    -------
    dict of numpy.ndarray
        ``{"CRPS": array}`` in mm/h, shaped like the sums; NaN without a valid pixel.
    """
    check_scores(scores, ("CRPS",))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"CRPS": sums.sum_crps / sums.n}


def crps_pooled_compute(
    sums: PooledCRPSSums, scores: Sequence[str] = ("CRPS_POOLED",)
) -> dict[str, np.ndarray]:
    """Compute the mean CRPS of the pooled fields per pooling size.

    Parameters
    ----------
    sums : PooledCRPSSums
        Accumulated sums; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("CRPS_POOLED",)``.

    Returns
    -------
    dict of numpy.ndarray
        ``{"CRPS_POOLED": array}`` in mm/h, shaped ([...,] n_leadtimes, n_scales); NaN without
        a valid block.
    """
    check_scores(scores, ("CRPS_POOLED",))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"CRPS_POOLED": sums.sum_crps / sums.n}


def check_scores(scores: Sequence[str], available: Sequence[str]) -> None:
    """Raise ValueError unless every name in ``scores`` (case-insensitive) is available."""
    if isinstance(scores, str):
        scores = (scores,)
    unknown = [name for name in scores if name.upper() not in available]
    if unknown:
        raise ValueError(f"unknown scores {unknown}; available: {', '.join(available)}")


@dataclasses.dataclass(eq=False)
class SpreadSkillSums(ScoreAccumulator):
    """Sums of the spread/skill ratio per lead time.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    sum_scaled_variance : numpy.ndarray
        float64 sum over the valid pixels of the member variance (ddof=1) times (m + 1) / m, with
        m members; the factor is taken per pixel so that ensembles of any size merge. Shaped
        ([n_starts,] n_leadtimes).
    sum_squared_error : numpy.ndarray
        float64 sum of the squared error of the ensemble mean, same shape.
    n : numpy.ndarray
        int64 number of valid pixels, same shape.
    """

    sum_scaled_variance: np.ndarray
    sum_squared_error: np.ndarray
    n: np.ndarray

    additive_fields = ("sum_scaled_variance", "sum_squared_error", "n")


def spread_skill_init(lead_times: Sequence[float], n_starts: int | None = None) -> SpreadSkillSums:
    """Initialise empty spread/skill sums.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    SpreadSkillSums
        Zero sums shaped ([n_starts,] n_leadtimes).
    """
    lead_times = as_coordinate(lead_times)
    shape = leading_shape(n_starts) + (lead_times.size,)
    return SpreadSkillSums(
        lead_times, np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=np.int64)
    )


def spread_skill_sums(forecast: np.ndarray, observation: np.ndarray) -> dict[str, np.ndarray]:
    """Sum member variances and squared errors of the ensemble mean per frame.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        Arrays checked by :func:`as_ensemble`, with at least two members.

    Returns
    -------
    dict of numpy.ndarray
        The additive fields of :class:`SpreadSkillSums`, shaped ([n_starts,] n_leadtimes),
        summed in float64 over the pixels where the observation and every member are finite.
    """
    n_members = forecast.shape[-4]
    if n_members < 2:
        raise ValueError(f"the spread/skill ratio needs at least 2 members, got {n_members}")
    factor = (n_members + 1) / n_members
    leading = observation.shape[:-2]
    result = {name: np.zeros(leading) for name in SpreadSkillSums.additive_fields}
    result["n"] = np.zeros(leading, dtype=np.int64)
    for index, members, observed in member_frames(forecast, observation):
        members, observed = valid_pixels(members, observed)
        members = members.astype(np.float64)
        mean = members.mean(axis=0)
        result["sum_scaled_variance"][index] = members.var(axis=0, ddof=1).sum() * factor
        result["sum_squared_error"][index] = np.square(mean - observed).sum()
        result["n"][index] = observed.size
    return result


def spread_skill_accum(sums: SpreadSkillSums, forecast, observation) -> SpreadSkillSums:
    """Accumulate an ensemble into spread/skill sums (in place).

    Parameters
    ----------
    sums : SpreadSkillSums
        Sums from :func:`spread_skill_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x), at least two members.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x).

    Returns
    -------
    SpreadSkillSums
        ``sums`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, sums.lead_times.size)
    frame_sums = spread_skill_sums(forecast, observation)
    for name in SpreadSkillSums.additive_fields:
        add_into(sums, name, frame_sums[name])
    return sums


def spread_skill_merge(first: SpreadSkillSums, second: SpreadSkillSums) -> SpreadSkillSums:
    """Merge two spread/skill accumulators with the same lead times.

    Parameters
    ----------
    first, second : SpreadSkillSums
        Sums built on disjoint data.

    Returns
    -------
    SpreadSkillSums
        New accumulator with added sums; the inputs are unchanged.
    """
    return merge(first, second)


def spread_skill_compute(
    sums: SpreadSkillSums, scores: Sequence[str] = ("SPREAD_SKILL",)
) -> dict[str, np.ndarray]:
    """Compute the spread/skill ratio.

    The ratio is sqrt(mean member variance, ddof=1) / RMSE of the ensemble mean, over the same
    pixels, times sqrt((m + 1) / m) for m members; a calibrated ensemble scores 1, an
    under-dispersive one less. pysteps' ``ensemble_spread`` and ``ensemble_skill`` are other
    scores.

    Parameters
    ----------
    sums : SpreadSkillSums
        Accumulated sums; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("SPREAD_SKILL",)``.

    Returns
    -------
    dict of numpy.ndarray
        ``{"SPREAD_SKILL": array}`` shaped like the sums; NaN without a valid pixel.
    """
    check_scores(scores, ("SPREAD_SKILL",))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(sums.sum_scaled_variance / sums.sum_squared_error)
    return {"SPREAD_SKILL": np.where(sums.n > 0, ratio, np.nan)}
