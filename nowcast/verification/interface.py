"""Score-family registry (pysteps ``get_method`` style) and tidy score tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from nowcast.verification._accumulator import ScoreAccumulator
from nowcast.verification.detcat import (
    contingency_accum,
    contingency_compute,
    contingency_init,
    contingency_merge,
)
from nowcast.verification.detcont import (
    continuous_accum,
    continuous_compute,
    continuous_init,
    continuous_merge,
)
from nowcast.verification.spatial import fss_accum, fss_compute, fss_init, fss_merge

#: Columns of the tidy score table, in order.
SCORE_COLUMNS = ("method", "lead_time", "threshold", "scale", "score", "value")


class ScoreFamily(NamedTuple):
    """The four streaming functions of one score family.

    Attributes
    ----------
    init : callable
        ``init(lead_times, [thresholds, [scales,]] n_starts=None) -> accumulator``.
    accum : callable
        ``accum(accumulator, forecast, observation) -> accumulator`` (in place).
    merge : callable
        ``merge(first, second) -> accumulator``.
    compute : callable
        ``compute(accumulator, scores=...) -> dict of arrays``.
    """

    init: Callable[..., ScoreAccumulator]
    accum: Callable[..., ScoreAccumulator]
    merge: Callable[[ScoreAccumulator, ScoreAccumulator], ScoreAccumulator]
    compute: Callable[..., dict[str, np.ndarray]]


_FAMILIES = {
    "det_cat": ScoreFamily(
        contingency_init, contingency_accum, contingency_merge, contingency_compute
    ),
    "det_cont": ScoreFamily(
        continuous_init, continuous_accum, continuous_merge, continuous_compute
    ),
    "fss": ScoreFamily(fss_init, fss_accum, fss_merge, fss_compute),
}


def get_method(name: str) -> ScoreFamily:
    """Return the streaming functions of a score family.

    Parameters
    ----------
    name : str
        ``"det_cat"`` (contingency-table scores), ``"det_cont"`` (continuous scores) or
        ``"fss"`` (fractions skill score); case-insensitive.

    Returns
    -------
    ScoreFamily
        Named tuple ``(init, accum, merge, compute)``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the registered names.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _FAMILIES:
        raise ValueError(
            f"unknown score family {name!r}; registered: {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[key]


def scores_to_frame(
    accumulator: ScoreAccumulator, scores: dict[str, np.ndarray], method: str | None = None
) -> pd.DataFrame:
    """Turn computed scores into a tidy table.

    Parameters
    ----------
    accumulator : ScoreAccumulator
        Pooled accumulator the scores were computed from (it provides the coordinates).
    scores : dict of numpy.ndarray
        Output of the family's ``compute``, each array shaped like the accumulator's scores.
    method : str, optional
        Forecast method name for the ``method`` column.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SCORE_COLUMNS`; ``threshold`` / ``scale`` are NaN for families without
        that dimension.
    """
    coords = accumulator.coords()
    index = pd.MultiIndex.from_product(list(coords.values()), names=list(coords))
    frames = []
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != accumulator.score_shape:
            raise ValueError(
                f"score {name} has shape {values.shape}, expected {accumulator.score_shape}"
            )
        frame = index.to_frame(index=False)
        frame["score"] = name
        frame["value"] = values.ravel()
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    for column in ("threshold", "scale"):
        if column not in table:
            table[column] = np.nan
    table["method"] = method
    return table[list(SCORE_COLUMNS)]


def _lead_times_from(forecast) -> np.ndarray:
    """Lead times in minutes from an xarray forecast's ``lead_time`` coordinate."""
    coords = getattr(forecast, "coords", None)
    if coords is None or "lead_time" not in coords:
        raise ValueError("lead_times not given and the forecast has no lead_time coordinate")
    lead_time = np.asarray(coords["lead_time"].values)
    if np.issubdtype(lead_time.dtype, np.timedelta64):
        return lead_time / np.timedelta64(1, "m")
    return lead_time.astype(np.float64)


def score_forecasts(
    forecast,
    observation,
    thresholds: Sequence[float],
    scales: Sequence[int],
    lead_times: Sequence[float] | None = None,
    method: str | None = None,
    families: Sequence[str] = ("det_cat", "det_cont", "fss"),
) -> pd.DataFrame:
    """Verify a forecast stack with several score families in one call.

    Parameters
    ----------
    forecast, observation : array_like or xarray.DataArray
        Arrays (n_leadtimes, y, x) or (n_starts, n_leadtimes, y, x) in mm/h; a start axis is
        pooled.
    thresholds : sequence of float
        Rain-rate thresholds for the categorical scores and the FSS.
    scales : sequence of int
        FSS window sizes in pixels.
    lead_times : sequence of float, optional
        Lead times in minutes; by default taken from the forecast's ``lead_time`` coordinate
        (timedelta or minutes).
    method : str, optional
        Forecast method name for the ``method`` column.
    families : sequence of str, optional
        Score families to compute, by default all of ``det_cat``, ``det_cont`` and ``fss``.

    Returns
    -------
    pandas.DataFrame
        Tidy table with columns :data:`SCORE_COLUMNS`.
    """
    if lead_times is None:
        lead_times = _lead_times_from(forecast)
    coordinates = {
        "det_cat": (lead_times, thresholds),
        "det_cont": (lead_times,),
        "fss": (lead_times, thresholds, scales),
    }
    forecast = np.asarray(forecast)
    observation = np.asarray(observation)
    frames = []
    for name in families:
        family = get_method(name)
        accumulator = family.accum(family.init(*coordinates[name.lower()]), forecast, observation)
        frames.append(scores_to_frame(accumulator, family.compute(accumulator), method))
    return pd.concat(frames, ignore_index=True)
