"""Probabilistic scores of an evaluation: ensembles, one-member forecasts and probabilities.

A run is probabilistic when a method's forecast of a window has more than one member (the CF
``realization`` dimension, :mod:`nowcast.nowcasts.forecast`) or is a probability forecast
(:data:`~nowcast.evaluate.setup.PROBABILITY_METHODS`). Then, besides the deterministic tables
(where an ensemble enters as its ensemble mean), each window also streams into the families of
:mod:`nowcast.verification`:

- an ensemble (more than one member): CRPS, pooled CRPS, spread/skill, rank histogram,
  reliability diagram, ROC curve, Brier score, power spectra and the median over members of
  each member's CSI (:data:`ENSEMBLE_FAMILIES`);
- a deterministic forecast, a one-member ensemble: CRPS (its MAE), pooled CRPS, Brier score
  of its 0/1 probabilities and ``MEMBER_CSI`` (its CSI) (:data:`ONE_MEMBER_FAMILIES`);
- a probability forecast (``lagrangian_probability``): the Brier score only, the reference of
  each method's Brier skill score (``BSS``).

Every family of a window is scored on the window's one mask, the pixels where the observation,
every member of every forecast and every probability are finite, the mask of the deterministic
tables too: a deterministic method's CRPS equals its MAE in ``metrics.csv``. The rank
histogram's ties are broken by a generator seeded per window and method
(:func:`tie_generator`), so reruns agree whatever the Dask schedule.

Per-window accumulators are stacked along a start axis as the deterministic ones are
(:func:`stack_ensemble`), and :func:`ensemble_metrics_table` and :func:`ensemble_curves_table`
give ``ensemble_metrics.csv`` (the columns of ``metrics.csv``, start-time bootstrap intervals)
and ``ensemble_curves.csv`` (:data:`ENSEMBLE_CURVE_COLUMNS`). Two scores of that table pair a
method with a reference, resampling both with the same start times: ``BSS`` against the first
probability method, and ``CRPS_DIFF``, CRPS(method) - CRPS(reference) in mm/h, against the
reference ensemble of :func:`crps_difference_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from nowcast.evaluate.setup import (
    ALL_SOURCES,
    POOLING_SCALES,
    PROBABILITY_METHODS,
    PROBABILITY_THRESHOLDS,
    Window,
    WindowScores,
)
from nowcast.evaluate.tables import METRIC_COLUMNS, interval_frame
from nowcast.nowcasts.forecast import ensemble_size, members
from nowcast.nowcasts.probability import THRESHOLD
from nowcast.nowcasts.seeds import window_seed
from nowcast.nowcasts.steps import FAILED_ATTR
from nowcast.verification._accumulator import (
    ScoreAccumulator,
    as_coordinate,
    concat_starts,
    sum_starts,
)
from nowcast.verification.bootstrap import bootstrap_ci, bootstrap_difference
from nowcast.verification.brier import BrierSums, brier_accum_probability, brier_init
from nowcast.verification.ensemble import crps_compute
from nowcast.verification.interface import (
    CURVE_COLUMNS,
    curves_to_frame,
    ensemble_accumulators,
)
from nowcast.verification.interface import get_method as score_family
from nowcast.verification.rankhist import rankhist_accum, rankhist_init

#: Families of an ensemble of two or more members, in the order of the tables.
ENSEMBLE_FAMILIES = (
    "crps",
    "crps_pooled",
    "spread_skill",
    "rankhist",
    "roc",
    "brier",
    "reldiag",
    "rapsd",
    "member_csi",
)
#: Families of a deterministic forecast (one member): CRPS = MAE, pooled MAE, 0/1 Brier score,
#: and its CSI as ``MEMBER_CSI``.
ONE_MEMBER_FAMILIES = ("crps", "crps_pooled", "brier", "member_csi")
#: Summary scores per family in ``ensemble_metrics.csv``; ``BSS`` and ``CRPS_DIFF`` are added
#: per method.
SUMMARY_SCORES = {
    "crps": ("CRPS",),
    "crps_pooled": ("CRPS_POOLED",),
    "spread_skill": ("SPREAD_SKILL",),
    "rankhist": ("RANK_KL",),
    "roc": ("ROC_AREA",),
    "brier": ("BRIER",),
    "member_csi": ("MEMBER_CSI",),
}
CURVE_FAMILIES = ("rankhist", "reldiag", "roc", "rapsd")
#: Columns of ``ensemble_curves.csv`` (see :func:`nowcast.verification.curves_to_frame`).
ENSEMBLE_CURVE_COLUMNS = ("method", "source") + CURVE_COLUMNS[1:]
ENSEMBLE_METRICS_FILE = "ensemble_metrics.csv"
ENSEMBLE_CURVES_FILE = "ensemble_curves.csv"


# forecasts of one window


def is_probability(name: str, forecast: xr.DataArray) -> bool:
    """Whether a forecast gives exceedance probabilities rather than rain."""
    return name in PROBABILITY_METHODS or THRESHOLD in forecast.dims


def rain_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """The methods that forecast rain (all but :data:`PROBABILITY_METHODS`), in order."""
    return tuple(name for name in methods if name not in PROBABILITY_METHODS)


def split_forecasts(
    forecasts: Mapping[str, xr.DataArray],
) -> tuple[dict[str, xr.DataArray], dict[str, xr.DataArray]]:
    """Rain forecasts (deterministic or ensemble) and probability forecasts, in order."""
    rain, probabilities = {}, {}
    for name, forecast in forecasts.items():
        (probabilities if is_probability(name, forecast) else rain)[name] = forecast
    return rain, probabilities


def probability_valid(probabilities: Mapping[str, xr.DataArray]) -> np.ndarray | bool:
    """Pixels (lead_time, y, x) where every probability forecast has data (True if none)."""
    valid: np.ndarray | bool = True
    for probability in probabilities.values():
        valid = valid & np.isfinite(probability.values).all(axis=0)
    return valid


def is_probabilistic(
    rain: Mapping[str, xr.DataArray], probabilities: Mapping[str, xr.DataArray]
) -> bool:
    """Whether a window's forecasts need the probabilistic families."""
    return bool(probabilities) or any(ensemble_size(f) > 1 for f in rain.values())


def tie_generator(seed: int, window: Window, method: str) -> np.random.Generator:
    """The rank histogram's tie-breaking draws of one window and method.

    Seeded from the run's seed, the window (source, reference time) and the method, so that a
    window gives the same histogram whichever worker scores it and in whatever order.
    """
    return np.random.default_rng(
        window_seed(seed, f"{window.source}/{method}", window.reference_time)
    )


def accumulate_ensemble_scores(
    rain: Mapping[str, xr.DataArray],
    probabilities: Mapping[str, xr.DataArray],
    observed: np.ndarray,
    valid: np.ndarray,
    lead_times: Sequence[float],
    pixel_size_km: float,
    random_states: Mapping[str, np.random.Generator],
) -> dict[str, dict[str, ScoreAccumulator]]:
    """Score one window's forecasts with the probabilistic families on one mask.

    Parameters
    ----------
    rain : mapping of str to xarray.DataArray
        Deterministic (lead_time, y, x) or ensemble (realization, lead_time, y, x) forecasts.
    probabilities : mapping of str to xarray.DataArray
        Probability forecasts (threshold, lead_time, y, x).
    observed : numpy.ndarray
        Observations (lead_time, y, x) in mm/h.
    valid : numpy.ndarray
        The window's mask (lead_time, y, x); the observation counts only inside it.
    lead_times : sequence of float
        Lead times in minutes.
    pixel_size_km : float
        Pixel size, the unit of the spectra's wavelengths.
    random_states : mapping of str to numpy.random.Generator
        Tie-breaking draws of the rank histogram per ensemble method.

    Returns
    -------
    dict
        Method name to family name to pooled accumulator.
    """
    observed = np.where(valid, observed, np.nan).astype(np.float32)
    options = {
        "thresholds": PROBABILITY_THRESHOLDS,
        "scales": POOLING_SCALES,
        "lead_times": lead_times,
        "pixel_size": pixel_size_km,
    }
    scores: dict[str, dict[str, ScoreAccumulator]] = {}
    for name, forecast in rain.items():
        values = members(forecast).values
        n_members = values.shape[0]
        families = ENSEMBLE_FAMILIES if n_members > 1 else ONE_MEMBER_FAMILIES
        streamed = [family for family in families if family != "rankhist"]
        accumulators = ensemble_accumulators(values, observed, streamed, **options)
        if "rankhist" in families:
            histogram = rankhist_init(lead_times, n_members)
            accumulators["rankhist"] = rankhist_accum(
                histogram, values, observed, random_state=random_states[name]
            )
        scores[name] = {family: accumulators[family] for family in families}
    for name, probability in probabilities.items():
        thresholds = probability[THRESHOLD].values
        brier = brier_init(lead_times, thresholds)
        scores[name] = {"brier": brier_accum_probability(brier, probability.values, observed)}
    return scores


def window_failures(forecasts: Mapping[str, xr.DataArray]) -> dict[str, str]:
    """Methods whose forecast of the window is a stand-in, with the reason (``steps_failed``)."""
    return {
        name: str(forecast.attrs[FAILED_ATTR])
        for name, forecast in forecasts.items()
        if FAILED_ATTR in forecast.attrs
    }


# tables


@dataclasses.dataclass(eq=False)
class BrierSkillSums(ScoreAccumulator):
    """Brier-score sums of a method and of the reference, per lead time and threshold.

    Attributes
    ----------
    lead_times, thresholds : numpy.ndarray
        Coordinates (minutes, mm/h).
    sum_squared_error, n : numpy.ndarray
        The method's sums, shaped ([n_starts,] n_leadtimes, n_thresholds).
    reference_squared_error, reference_n : numpy.ndarray
        The reference's sums, same shape; kept together so that the bootstrap resamples both
        with the same start times.
    """

    thresholds: np.ndarray
    sum_squared_error: np.ndarray
    n: np.ndarray
    reference_squared_error: np.ndarray
    reference_n: np.ndarray

    dims = ("lead_time", "threshold")
    coordinate_fields = ("lead_times", "thresholds")
    additive_fields = ("sum_squared_error", "n", "reference_squared_error", "reference_n")


def brier_skill_sums(method: BrierSums, reference: BrierSums) -> BrierSkillSums | None:
    """Pair a method's Brier sums with the reference's on their shared thresholds.

    Returns
    -------
    BrierSkillSums or None
        None when the lead times differ or no threshold is shared.
    """
    if not np.array_equal(method.lead_times, reference.lead_times):
        return None
    pairs = [
        (i, j)
        for i, threshold in enumerate(method.thresholds)
        for j, other in enumerate(reference.thresholds)
        if np.isclose(threshold, other)
    ]
    if not pairs:
        return None
    ours, theirs = (list(index) for index in zip(*pairs, strict=True))
    return BrierSkillSums(
        method.lead_times,
        as_coordinate(method.thresholds[ours]),
        method.sum_squared_error[..., ours],
        method.n[..., ours],
        reference.sum_squared_error[..., theirs],
        reference.n[..., theirs],
    )


def brier_skill_compute(sums: BrierSkillSums, scores: Sequence[str] = ("BSS",)) -> dict:
    """``BSS`` = 1 - BS / BS_reference: 1 is perfect, 0 no better than the reference."""
    with np.errstate(divide="ignore", invalid="ignore"):
        score = sums.sum_squared_error / sums.n
        reference = sums.reference_squared_error / sums.reference_n
        return {"BSS": 1.0 - score / reference}


def stack_ensemble(results: list[WindowScores]) -> dict[str, dict[str, dict]]:
    """Per-start probabilistic accumulators: source (and :data:`ALL_SOURCES`) -> method -> family.

    Windows without probabilistic scores are left out. A family that does not pool over
    sources (spectra of grids of different shapes) is left out of :data:`ALL_SOURCES`.
    """
    scored = [result for result in results if result.ensemble]
    groups: dict[str, list[WindowScores]] = {}
    for result in scored:
        groups.setdefault(result.window.source, []).append(result)
    if len(groups) > 1:
        groups[ALL_SOURCES] = scored
    stacked: dict[str, dict[str, dict[str, ScoreAccumulator]]] = {}
    for source, group in groups.items():
        stacked[source] = {}
        for method, families in group[0].ensemble.items():
            stacked[source][method] = {}
            for family in families:
                try:
                    parts = [r.ensemble[method][family] for r in group]
                    stacked[source][method][family] = concat_starts(parts)
                except ValueError:
                    if source != ALL_SOURCES:
                        raise
    return stacked


def _bootstrap_frame(per_start, compute, bootstrap: tuple) -> pd.DataFrame:
    return interval_frame(per_start, bootstrap_ci(per_start, compute, *bootstrap))


def crps_difference_reference(methods: Mapping[str, Mapping], compare: str | None) -> str | None:
    """The reference ensemble of ``CRPS_DIFF``: ``compare`` if it is an ensemble, else the
    first ensemble method (two or more members) in the methods' order; None without one."""
    ensembles = [name for name, families in methods.items() if "rankhist" in families]
    if compare is not None and compare.lower() in ensembles:
        return compare.lower()
    return ensembles[0] if ensembles else None


def crps_difference_frame(method: Mapping, reference: Mapping, bootstrap: tuple):
    """``CRPS_DIFF`` of a method against the reference, the paired start-time bootstrap.

    Returns
    -------
    pandas.DataFrame or None
        The rows without ``method`` and ``source``; None when either has no CRPS or their lead
        times differ.
    """
    if "crps" not in method or "crps" not in reference:
        return None
    ours, theirs = method["crps"], reference["crps"]
    if not np.array_equal(ours.lead_times, theirs.lead_times):
        return None
    intervals = bootstrap_difference(ours, theirs, crps_compute, *bootstrap)
    return interval_frame(ours, {"CRPS_DIFF": intervals["CRPS"]})


def method_frames(
    method: str, methods: Mapping[str, Mapping], references: tuple, bootstrap: tuple
) -> list[pd.DataFrame]:
    """One method's rows of ``ensemble_metrics.csv`` (without ``method`` and ``source``).

    ``references`` are the probability method of ``BSS`` and the ensemble of ``CRPS_DIFF``
    (either None).
    """
    families, (brier_reference, crps_reference) = methods[method], references
    frames = []
    for family, scores in SUMMARY_SCORES.items():
        if family in families:
            compute = functools.partial(score_family(family).compute, scores=scores)
            frames.append(_bootstrap_frame(families[family], compute, bootstrap))
    if brier_reference not in (None, method) and "brier" in families:
        paired = brier_skill_sums(families["brier"], methods[brier_reference]["brier"])
        if paired is not None:
            frames.append(_bootstrap_frame(paired, brier_skill_compute, bootstrap))
    if crps_reference not in (None, method):
        difference = crps_difference_frame(families, methods[crps_reference], bootstrap)
        if difference is not None:
            frames.append(difference)
    return frames


def ensemble_metrics_table(
    per_start: dict,
    n_bootstrap: int,
    confidence: float,
    seed: int,
    compare: str | None = None,
) -> pd.DataFrame:
    """The tidy probabilistic scores (the columns of ``metrics.csv``) with bootstrap intervals.

    Scores: ``CRPS``, ``CRPS_POOLED`` (``scale`` in pixels), ``SPREAD_SKILL``, ``RANK_KL``,
    ``ROC_AREA``, ``BRIER`` and ``MEMBER_CSI`` (``threshold`` in mm/h) as each method has
    them, ``BSS`` against the first probability method when one was scored, and ``CRPS_DIFF``
    of every other rain method against :func:`crps_difference_reference` (``compare`` if it is
    an ensemble) when an ensemble was scored.
    """
    bootstrap = (n_bootstrap, confidence, seed)
    frames = []
    for source, methods in per_start.items():
        references = (
            next((m for m in methods if m in PROBABILITY_METHODS), None),
            crps_difference_reference(methods, compare),
        )
        for method in methods:
            for table in method_frames(method, methods, references, bootstrap):
                frames.append(table.assign(method=method, source=source))
    if not frames:
        return pd.DataFrame(columns=list(METRIC_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(METRIC_COLUMNS)]


def ensemble_curves_table(per_start: dict) -> pd.DataFrame:
    """Rank histograms, reliability diagrams, ROC curves and spectra of the pooled starts."""
    frames = []
    for source, methods in per_start.items():
        for method, families in methods.items():
            for family in CURVE_FAMILIES:
                if family not in families:
                    continue
                pooled = sum_starts(families[family])
                curves = score_family(family).curves(pooled)
                frames.append(curves_to_frame(pooled, curves, method).assign(source=source))
    if not frames:
        return pd.DataFrame(columns=list(ENSEMBLE_CURVE_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(ENSEMBLE_CURVE_COLUMNS)]


@dataclasses.dataclass
class ProbabilisticTables:
    """The probabilistic results of a run (see :func:`probabilistic_tables`).

    Attributes
    ----------
    per_start : dict
        Per-start accumulators, as :func:`stack_ensemble` returns them.
    metrics, curves : pandas.DataFrame
        ``ensemble_metrics.csv`` and ``ensemble_curves.csv``.
    members : dict of str to int
        Members of each rain method (1 for a deterministic one).
    reference : str or None
        The probability method of the Brier skill score.
    crps_reference : str or None
        The ensemble method of ``CRPS_DIFF``.
    """

    per_start: dict
    metrics: pd.DataFrame
    curves: pd.DataFrame
    members: dict[str, int]
    reference: str | None
    crps_reference: str | None = None

    def summary(self) -> dict:
        """What ``metrics.json`` records of the probabilistic scores."""
        return {
            "members": self.members,
            "thresholds": list(PROBABILITY_THRESHOLDS),
            "pooling_scales": list(POOLING_SCALES),
            "brier_skill_reference": self.reference,
            "crps_difference_reference": self.crps_reference,
            "files": [ENSEMBLE_METRICS_FILE, ENSEMBLE_CURVES_FILE],
        }


def probabilistic_tables(
    results: list[WindowScores],
    n_bootstrap: int,
    confidence: float,
    seed: int,
    compare: str | None = None,
) -> ProbabilisticTables | None:
    """Stack the windows' probabilistic accumulators and tabulate them; None without any.

    ``compare`` (the evaluation's ``compare`` method) is the reference of ``CRPS_DIFF`` when it
    is an ensemble; otherwise, or when not given, the first ensemble method is
    (:func:`crps_difference_reference`).
    """
    per_start = stack_ensemble(results)
    if not per_start:
        return None
    first = next(iter(per_start.values()))
    members = {
        method: int(families["rankhist"].ranks.size - 1) if "rankhist" in families else 1
        for method, families in first.items()
        if method not in PROBABILITY_METHODS
    }
    reference = next((method for method in first if method in PROBABILITY_METHODS), None)
    return ProbabilisticTables(
        per_start,
        ensemble_metrics_table(per_start, n_bootstrap, confidence, seed, compare),
        ensemble_curves_table(per_start),
        members,
        reference,
        crps_difference_reference(first, compare),
    )


def failed_windows(results: list[WindowScores]) -> list[dict]:
    """Windows a method could not forecast: source, reference time, method and reason."""
    return [
        {
            "source": result.window.source,
            "reference_time": pd.Timestamp(result.window.reference_time).isoformat(),
            "method": method,
            "reason": reason,
        }
        for result in results
        for method, reason in result.failures.items()
    ]


__all__ = [
    "ENSEMBLE_CURVE_COLUMNS",
    "ENSEMBLE_FAMILIES",
    "ONE_MEMBER_FAMILIES",
    "BrierSkillSums",
    "ProbabilisticTables",
    "accumulate_ensemble_scores",
    "crps_difference_reference",
    "ensemble_curves_table",
    "ensemble_metrics_table",
    "failed_windows",
    "probabilistic_tables",
    "rain_methods",
    "split_forecasts",
    "stack_ensemble",
]
