"""Shared machinery of the additive score accumulators (merge, start axis, resampling).

Every verification object in this package is a dataclass whose *additive fields* are numpy arrays
of sums and counts. Because everything is a plain sum, two partial results (from two Dask workers,
two spatial tiles or two sets of forecast start times) merge by addition, and a bootstrap
resample is a weighted sum over a leading start axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar, TypeVar

import numpy as np

AccumulatorT = TypeVar("AccumulatorT", bound="ScoreAccumulator")


@dataclasses.dataclass(eq=False)
class ScoreAccumulator:
    """Base class: coordinates plus additive arrays shaped ``leading + score dims``.

    ``leading`` is ``()`` for a pooled accumulator, ``(n_starts,)`` for one kept per forecast
    start time, and ``(n_boot,)`` for bootstrap replicates.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), the coordinate of the first score dimension.
    """

    lead_times: np.ndarray

    dims: ClassVar[tuple[str, ...]] = ("lead_time",)
    coordinate_fields: ClassVar[tuple[str, ...]] = ("lead_times",)
    additive_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def score_shape(self) -> tuple[int, ...]:
        """Shape of the score dimensions (without any leading start axis)."""
        return tuple(len(getattr(self, name)) for name in self.coordinate_fields)

    @property
    def n_starts(self) -> int | None:
        """Length of the leading start axis, or None for a pooled accumulator."""
        shape = getattr(self, self.additive_fields[0]).shape
        return shape[0] if len(shape) > len(self.dims) else None

    def coords(self) -> dict[str, np.ndarray]:
        """Return the score coordinates keyed by dimension name (``lead_time``, ...)."""
        return {
            dim: getattr(self, name)
            for dim, name in zip(self.dims, self.coordinate_fields, strict=True)
        }


def as_coordinate(values, dtype=float) -> np.ndarray:
    """Return ``values`` as a 1-D array, raising ValueError when empty or not 1-D."""
    array = np.atleast_1d(np.asarray(values, dtype=dtype))
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence, got shape {array.shape}")
    return array


def leading_shape(n_starts: int | None) -> tuple[int, ...]:
    """Return ``()`` for a pooled accumulator and ``(n_starts,)`` for a per-start one."""
    if n_starts is None:
        return ()
    if n_starts < 1:
        raise ValueError(f"n_starts must be positive, got {n_starts}")
    return (int(n_starts),)


def as_stack(forecast, observation, n_leadtimes: int) -> tuple[np.ndarray, np.ndarray]:
    """Check and return a forecast/observation pair as numpy stacks.

    Parameters
    ----------
    forecast, observation : array_like
        Arrays of shape (n_leadtimes, y, x) or (n_starts, n_leadtimes, y, x); xarray objects are
        accepted and turned into their values.
    n_leadtimes : int
        Expected length of the lead-time axis.

    Returns
    -------
    tuple of numpy.ndarray
        The forecast and the observation.
    """
    forecast = np.asarray(forecast)
    observation = np.asarray(observation)
    if forecast.shape != observation.shape:
        raise ValueError(
            f"forecast and observation shapes differ: {forecast.shape} != {observation.shape}"
        )
    if forecast.ndim not in (3, 4) or forecast.shape[-3] != n_leadtimes or forecast.size == 0:
        raise ValueError(
            f"expected arrays shaped ([n_starts,] n_leadtimes={n_leadtimes}, y, x), "
            f"got {forecast.shape}"
        )
    return forecast, observation


def as_float_pair(forecast: np.ndarray, observation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both arrays in their common floating dtype (float64 for integer input).

    One dtype for both keeps every threshold comparison of a pair consistent.
    """
    dtype = np.result_type(forecast.dtype, observation.dtype)
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    return forecast.astype(dtype, copy=False), observation.astype(dtype, copy=False)


def add_into(accumulator: ScoreAccumulator, name: str, values: np.ndarray) -> None:
    """Add ``values`` to the additive field ``name`` in place.

    ``values`` may carry a start axis that the accumulator does not keep; it is summed out.
    """
    target = getattr(accumulator, name)
    extra = values.ndim - target.ndim
    if extra > 0:
        values = values.sum(axis=tuple(range(extra)))
    if values.shape != target.shape:
        raise ValueError(
            f"cannot accumulate values shaped {values.shape} into {name} shaped {target.shape}; "
            "a per-start accumulator needs input with the same number of start times"
        )
    target += values


def check_compatible(first: ScoreAccumulator, second: ScoreAccumulator) -> None:
    """Raise ValueError unless two accumulators have the same type and coordinates."""
    if type(first) is not type(second):
        raise ValueError(f"cannot merge {type(first).__name__} with {type(second).__name__}")
    for name in first.coordinate_fields:
        if not np.array_equal(getattr(first, name), getattr(second, name)):
            raise ValueError(f"cannot merge: {name} differ")


def merge(first: AccumulatorT, second: AccumulatorT) -> AccumulatorT:
    """Return a new accumulator holding the sums of two accumulators.

    Parameters
    ----------
    first, second : ScoreAccumulator
        Accumulators of the same type and coordinates (and the same leading shape).

    Returns
    -------
    ScoreAccumulator
        The merged accumulator; the inputs are left unchanged.
    """
    check_compatible(first, second)
    sums = {}
    for name in first.additive_fields:
        a, b = getattr(first, name), getattr(second, name)
        if a.shape != b.shape:
            raise ValueError(f"cannot merge: {name} shapes differ, {a.shape} != {b.shape}")
        sums[name] = a + b
    return dataclasses.replace(first, **sums)


def concat_starts(accumulators: Sequence[AccumulatorT]) -> AccumulatorT:
    """Stack accumulators along a leading start axis.

    Parameters
    ----------
    accumulators : sequence of ScoreAccumulator
        Pooled accumulators (one per start time) or per-start accumulators, all with the same
        coordinates.

    Returns
    -------
    ScoreAccumulator
        A per-start accumulator whose start axis lists the inputs' starts in order.
    """
    if len(accumulators) == 0:
        raise ValueError("need at least one accumulator")
    first = accumulators[0]
    for other in accumulators[1:]:
        check_compatible(first, other)
    stacked = {}
    for name in first.additive_fields:
        parts = [getattr(acc, name) for acc in accumulators]
        parts = [
            part[None] if acc.n_starts is None else part
            for acc, part in zip(accumulators, parts, strict=True)
        ]
        stacked[name] = np.concatenate(parts, axis=0)
    return dataclasses.replace(first, **stacked)


def sum_starts(accumulator: AccumulatorT) -> AccumulatorT:
    """Pool a per-start accumulator over its start axis (a pooled one is returned as a copy)."""
    if accumulator.n_starts is None:
        return dataclasses.replace(
            accumulator, **{n: getattr(accumulator, n).copy() for n in accumulator.additive_fields}
        )
    return dataclasses.replace(
        accumulator, **{n: getattr(accumulator, n).sum(axis=0) for n in accumulator.additive_fields}
    )


def weighted_starts(accumulator: AccumulatorT, weights: np.ndarray) -> AccumulatorT:
    """Return accumulators that are weighted sums over the start axis.

    Parameters
    ----------
    accumulator : ScoreAccumulator
        Per-start accumulator with ``n_starts`` starts.
    weights : numpy.ndarray
        Array (n_samples, n_starts); row ``i`` gives how often each start counts in sample ``i``.

    Returns
    -------
    ScoreAccumulator
        Accumulator whose leading axis has length n_samples, in float64. Integer counts stay exact
        up to 2**53, far above any radar pixel count.
    """
    n_starts = accumulator.n_starts
    if n_starts is None:
        raise ValueError("weighted_starts needs a per-start accumulator (leading start axis)")
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != n_starts:
        raise ValueError(f"weights must be shaped (n_samples, {n_starts}), got {weights.shape}")
    # One matrix product per field replaces n_samples separate index-and-sum passes.
    resampled = {}
    for name in accumulator.additive_fields:
        field = getattr(accumulator, name)
        flat = field.reshape(n_starts, -1).astype(np.float64)
        resampled[name] = (weights @ flat).reshape((weights.shape[0],) + field.shape[1:])
    return dataclasses.replace(accumulator, **resampled)
