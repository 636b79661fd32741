"""Score-family registry (pysteps ``get_method`` style), tidy score tables and tidy curves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from nowcast.verification._accumulator import ScoreAccumulator
from nowcast.verification.brier import brier_accum, brier_compute, brier_init, brier_merge
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
from nowcast.verification.ensemble import (
    DEFAULT_SCALES,
    as_ensemble,
    crps_accum,
    crps_compute,
    crps_init,
    crps_merge,
    crps_pooled_accum,
    crps_pooled_compute,
    crps_pooled_init,
    spread_skill_accum,
    spread_skill_compute,
    spread_skill_init,
    spread_skill_merge,
)
from nowcast.verification.member_csi import (
    member_csi_accum,
    member_csi_compute,
    member_csi_init,
    member_csi_merge,
)
from nowcast.verification.probabilistic import (
    DEFAULT_THRESHOLDS,
    reldiag_accum,
    reldiag_compute,
    reldiag_curves,
    reldiag_init,
    reldiag_merge,
    roc_accum,
    roc_compute,
    roc_curves,
    roc_init,
    roc_merge,
)
from nowcast.verification.rankhist import (
    rankhist_accum,
    rankhist_compute,
    rankhist_curves,
    rankhist_init,
    rankhist_merge,
)
from nowcast.verification.spatial import fss_accum, fss_compute, fss_init, fss_merge
from nowcast.verification.spectra import (
    rapsd_accum,
    rapsd_compute,
    rapsd_curves,
    rapsd_init,
    rapsd_merge,
)

#: Columns of the tidy score table, in order.
SCORE_COLUMNS = ("method", "lead_time", "threshold", "scale", "score", "value")
#: Columns of the tidy curve table, in order; see :func:`curves_to_frame`.
CURVE_COLUMNS = ("method", "lead_time", "threshold", "curve", "point", "x", "y", "n")
#: Ensemble families with summary scores (:func:`score_ensemble`) and with curves
#: (:func:`ensemble_curves`).
ENSEMBLE_SCORE_FAMILIES = ("crps", "crps_pooled", "rankhist", "roc", "brier", "spread_skill")
ENSEMBLE_CURVE_FAMILIES = ("rankhist", "reldiag", "roc", "rapsd")


class ScoreFamily(NamedTuple):
    """The four streaming functions of one score family, and its curves.

    Attributes
    ----------
    init : callable
        ``init(lead_times, [...,] n_starts=None) -> accumulator``; the coordinates after the lead
        times are the family's, in the order of :data:`INIT_ARGUMENTS`.
    accum : callable
        ``accum(accumulator, forecast, observation) -> accumulator`` (in place). Deterministic
        families take forecasts ``([n_starts,] n_leadtimes, y, x)``, ensemble families
        ``([n_starts,] n_members, n_leadtimes, y, x)``.
    merge : callable
        ``merge(first, second) -> accumulator``.
    compute : callable
        ``compute(accumulator, scores=...) -> dict of arrays``.
    curves : callable or None
        ``curves(accumulator) -> {curve: {"x", "y", "n"}}`` for :func:`curves_to_frame`, for
        families whose result is a curve (rank histogram, reliability, ROC, spectra).
    """

    init: Callable[..., ScoreAccumulator]
    accum: Callable[..., ScoreAccumulator]
    merge: Callable[[ScoreAccumulator, ScoreAccumulator], ScoreAccumulator]
    compute: Callable[..., dict[str, np.ndarray]]
    curves: Callable[[ScoreAccumulator], dict[str, dict[str, np.ndarray]]] | None = None


_FAMILIES = {
    "det_cat": ScoreFamily(
        contingency_init, contingency_accum, contingency_merge, contingency_compute
    ),
    "det_cont": ScoreFamily(
        continuous_init, continuous_accum, continuous_merge, continuous_compute
    ),
    "fss": ScoreFamily(fss_init, fss_accum, fss_merge, fss_compute),
    "crps": ScoreFamily(crps_init, crps_accum, crps_merge, crps_compute),
    "crps_pooled": ScoreFamily(
        crps_pooled_init, crps_pooled_accum, crps_merge, crps_pooled_compute
    ),
    "spread_skill": ScoreFamily(
        spread_skill_init, spread_skill_accum, spread_skill_merge, spread_skill_compute
    ),
    "rankhist": ScoreFamily(
        rankhist_init, rankhist_accum, rankhist_merge, rankhist_compute, rankhist_curves
    ),
    "reldiag": ScoreFamily(
        reldiag_init, reldiag_accum, reldiag_merge, reldiag_compute, reldiag_curves
    ),
    "roc": ScoreFamily(roc_init, roc_accum, roc_merge, roc_compute, roc_curves),
    "brier": ScoreFamily(brier_init, brier_accum, brier_merge, brier_compute),
    "rapsd": ScoreFamily(rapsd_init, rapsd_accum, rapsd_merge, rapsd_compute, rapsd_curves),
    "member_csi": ScoreFamily(
        member_csi_init, member_csi_accum, member_csi_merge, member_csi_compute
    ),
}

#: What each family's ``init`` takes after the lead times (names of :func:`score_ensemble`'s
#: arguments; ``n_members`` and ``shape`` come from the forecast).
INIT_ARGUMENTS = {
    "det_cat": ("thresholds",),
    "det_cont": (),
    "fss": ("thresholds", "scales"),
    "crps": (),
    "crps_pooled": ("scales",),
    "spread_skill": (),
    "rankhist": ("n_members",),
    "reldiag": ("thresholds",),
    "roc": ("n_members", "thresholds"),
    "brier": ("thresholds",),
    "rapsd": ("shape", "pixel_size"),
    "member_csi": ("n_members", "thresholds"),
}


def get_method(name: str) -> ScoreFamily:
    """Return the streaming functions of a score family.

    Parameters
    ----------
    name : str
        Case-insensitive. Deterministic: ``"det_cat"`` (contingency-table scores),
        ``"det_cont"`` (continuous scores), ``"fss"`` (fractions skill score). Ensemble:
        ``"crps"``, ``"crps_pooled"``, ``"spread_skill"``, ``"rankhist"`` (rank histogram and
        its KL divergence), ``"reldiag"`` (reliability diagram), ``"roc"``, ``"brier"``,
        ``"rapsd"`` (power spectra) and ``"member_csi"`` (median over members of each
        member's CSI).

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
        Output of the family's ``compute``. Each array is shaped like the accumulator's scores
        or like their first dimensions (the ROC area has no probability-threshold axis, the
        rank-histogram divergence no rank axis); only ``lead_time``, ``threshold`` and
        ``scale`` dimensions can become columns.
    method : str, optional
        Forecast method name for the ``method`` column.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SCORE_COLUMNS`; ``threshold`` / ``scale`` are NaN for scores without
        that dimension.
    """
    coords = accumulator.coords()
    frames = []
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        dims = list(coords)[: values.ndim]
        if (
            values.ndim == 0
            or values.shape != accumulator.score_shape[: values.ndim]
            or not set(dims) <= set(SCORE_COLUMNS)
        ):
            raise ValueError(
                f"score {name} has shape {values.shape}, expected {accumulator.score_shape} "
                "or its leading part over lead_time, threshold and scale"
            )
        index = pd.MultiIndex.from_product([coords[dim] for dim in dims], names=dims)
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


def curves_to_frame(
    accumulator: ScoreAccumulator,
    curves: dict[str, dict[str, np.ndarray]],
    method: str | None = None,
) -> pd.DataFrame:
    """Turn curves (rank histogram, reliability diagram, ROC curve, spectra) into a tidy table.

    Parameters
    ----------
    accumulator : ScoreAccumulator
        Pooled accumulator the curves come from; its last dimension runs along the curve.
    curves : dict
        Output of the family's ``curves`` function: curve name to ``{"x", "y", "n"}``, arrays
        shaped like the accumulator's scores.
    method : str, optional
        Forecast method name for the ``method`` column.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CURVE_COLUMNS`, one row per point. ``point`` is the coordinate along the
        curve; ``x``, ``y`` and ``n`` per curve:

        ==================  =====================  ===========================  ==============
        curve               point                  x / y                        n
        ==================  =====================  ===========================  ==============
        RANK_HISTOGRAM      rank                   rank / relative frequency    count
        RELIABILITY         probability-bin centre mean forecast probability /  samples in bin
                                                   observed frequency
        ROC                 probability threshold  POFD / POD                   samples
        RAPSD_FORECAST,     wavelength             wavelength / power           frames
        RAPSD_OBSERVED
        ==================  =====================  ===========================  ==============

        ``threshold`` is NaN for curves without thresholds.
    """
    coords = accumulator.coords()
    index = pd.MultiIndex.from_product(list(coords.values()), names=list(coords))
    point = list(coords)[-1]
    frames = []
    for name, parts in curves.items():
        frame = index.to_frame(index=False).rename(columns={point: "point"})
        frame["curve"] = name
        for column in ("x", "y", "n"):
            values = np.asarray(parts[column], dtype=np.float64)
            if values.shape != accumulator.score_shape:
                raise ValueError(
                    f"curve {name} {column} has shape {values.shape}, "
                    f"expected {accumulator.score_shape}"
                )
            frame[column] = values.ravel()
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    if "threshold" not in table:
        table["threshold"] = np.nan
    table["method"] = method
    return table[list(CURVE_COLUMNS)]


def ensemble_accumulators(
    forecast,
    observation,
    families: Sequence[str],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    scales: Sequence[int] = DEFAULT_SCALES,
    lead_times: Sequence[float] | None = None,
    pixel_size: float = 1.0,
) -> dict[str, ScoreAccumulator]:
    """Accumulate an ensemble stack into the accumulators of several families.

    Parameters
    ----------
    forecast : array_like or xarray.DataArray
        Ensemble (n_members, n_leadtimes, y, x) or (n_starts, n_members, n_leadtimes, y, x) in
        mm/h; a start axis is pooled.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x) in mm/h.
    families : sequence of str
        Ensemble score families (:func:`get_method`).
    thresholds : sequence of float, optional
        Event thresholds (mm/h) of ``reldiag``, ``roc``, ``brier`` and ``member_csi``; by
        default 1, 5 and 10.
    scales : sequence of int, optional
        Pooling sizes of ``crps_pooled`` (pixels); by default 1, 4 and 16.
    lead_times : sequence of float, optional
        Lead times in minutes; by default the forecast's ``lead_time`` coordinate.
    pixel_size : float, optional
        Pixel spacing of ``rapsd``'s wavelengths (e.g. km), by default 1 (pixels).

    Returns
    -------
    dict of ScoreAccumulator
        Family name (lower case) to its pooled accumulator.
    """
    if lead_times is None:
        lead_times = _lead_times_from(forecast)
    forecast, observation = as_ensemble(forecast, observation, len(lead_times))
    arguments = {
        "thresholds": thresholds,
        "scales": scales,
        "n_members": forecast.shape[-4],
        "shape": forecast.shape[-2:],
        "pixel_size": pixel_size,
    }
    accumulators = {}
    for name in families:
        key = name.lower()
        family = get_method(key)
        init_arguments = [arguments[argument] for argument in INIT_ARGUMENTS[key]]
        accumulator = family.init(lead_times, *init_arguments)
        accumulators[key] = family.accum(accumulator, forecast, observation)
    return accumulators


def score_ensemble(
    forecast,
    observation,
    method: str | None = None,
    families: Sequence[str] = ENSEMBLE_SCORE_FAMILIES,
    **options,
) -> pd.DataFrame:
    """Verify an ensemble stack with several score families in one call.

    Parameters
    ----------
    forecast, observation : array_like or xarray.DataArray
        As for :func:`ensemble_accumulators`. A deterministic forecast enters as a one-member
        ensemble (``forecast[None]``), whose CRPS is its MAE; ``spread_skill`` needs two
        members.
    method : str, optional
        Forecast method name for the ``method`` column.
    families : sequence of str, optional
        By default :data:`ENSEMBLE_SCORE_FAMILIES`: CRPS, CRPS_POOLED (``scale`` column),
        RANK_KL, ROC_AREA and BRIER (``threshold`` column) and SPREAD_SKILL.
    **options
        ``thresholds``, ``scales``, ``lead_times``, ``pixel_size`` of
        :func:`ensemble_accumulators`.

    Returns
    -------
    pandas.DataFrame
        Tidy table with columns :data:`SCORE_COLUMNS`.
    """
    accumulators = ensemble_accumulators(forecast, observation, families, **options)
    frames = [
        scores_to_frame(accumulator, get_method(name).compute(accumulator), method)
        for name, accumulator in accumulators.items()
    ]
    return pd.concat(frames, ignore_index=True)


def ensemble_curves(
    forecast,
    observation,
    method: str | None = None,
    families: Sequence[str] = ENSEMBLE_CURVE_FAMILIES,
    **options,
) -> pd.DataFrame:
    """Rank histograms, reliability diagrams, ROC curves and spectra of an ensemble stack.

    Parameters
    ----------
    forecast, observation : array_like or xarray.DataArray
        As for :func:`ensemble_accumulators`.
    method : str, optional
        Forecast method name for the ``method`` column.
    families : sequence of str, optional
        Families with curves, by default :data:`ENSEMBLE_CURVE_FAMILIES`.
    **options
        ``thresholds``, ``scales``, ``lead_times``, ``pixel_size`` of
        :func:`ensemble_accumulators`.

    Returns
    -------
    pandas.DataFrame
        Tidy table with columns :data:`CURVE_COLUMNS` (see :func:`curves_to_frame`).
    """
    for name in families:
        if get_method(name).curves is None:
            raise ValueError(
                f"score family {name!r} has no curves; with curves: "
                f"{', '.join(ENSEMBLE_CURVE_FAMILIES)}"
            )
    accumulators = ensemble_accumulators(forecast, observation, families, **options)
    frames = [
        curves_to_frame(accumulator, get_method(name).curves(accumulator), method)
        for name, accumulator in accumulators.items()
    ]
    return pd.concat(frames, ignore_index=True)
