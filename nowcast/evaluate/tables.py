"""Score tables: per-start accumulators stacked, pooled scores with bootstrap intervals."""

from __future__ import annotations

import functools

import pandas as pd

from nowcast.evaluate.setup import ALL_SOURCES, WindowScores
from nowcast.verification._accumulator import ScoreAccumulator, concat_starts, sum_starts
from nowcast.verification.bootstrap import bootstrap_ci, bootstrap_difference
from nowcast.verification.interface import get_method as score_family
from nowcast.verification.interface import scores_to_frame

#: Scores reported per family (pysteps names).
FAMILY_SCORES = {
    "det_cat": ("CSI", "POD", "FAR", "HSS", "ETS", "BIAS"),
    "det_cont": ("MSE", "MAE", "BMSE"),
    "fss": ("FSS",),
}
#: Score families on other masks: key -> (pysteps family, scores, suffix of the score names).
#: ``*_allobs``: every pixel with a valid observation, a method's no-data counted as no rain
#: (as pysteps' own verification counts it). ``dry_area``: the pixels where the observation and
#: the extrapolation (LK) forecast are both below :data:`DRY_RAIN`; its false-alarm rate
#: (pysteps ``FA`` = false alarms / observed non-events) at
#: :data:`FALSE_ALARM_RAIN` is the share of them a method wets (``DRY_FA`` in the tables).
MASKED_FAMILIES = {
    "det_cat_allobs": ("det_cat", ("CSI", "BIAS"), "_ALLOBS"),
    "det_cont_allobs": ("det_cont", ("MSE",), "_ALLOBS"),
    "dry_area": ("det_cat", ("FA",), ""),
}
DRY_RAIN = 0.1
FALSE_ALARM_RAIN = 0.5
#: Columns of ``metrics.csv`` / ``metrics.json``.
METRIC_COLUMNS = (
    "method",
    "source",
    "lead_time",
    "threshold",
    "scale",
    "score",
    "value",
    "ci_low",
    "ci_high",
    "n_starts",
)
#: Columns of ``differences.csv``: ``value`` is ``method`` minus ``baseline``.
DIFFERENCE_COLUMNS = ("method", "baseline") + METRIC_COLUMNS[1:]


def _compute_function(family_name: str):
    if family_name in MASKED_FAMILIES:
        name, scores, _ = MASKED_FAMILIES[family_name]
        return functools.partial(score_family(name).compute, scores=scores)
    return functools.partial(score_family(family_name).compute, scores=FAMILY_SCORES[family_name])


def _score_name(family_name: str, score: str) -> str:
    if family_name == "dry_area":
        return "DRY_FA"
    return score + MASKED_FAMILIES.get(family_name, ("", (), ""))[2]


def interval_frame(per_start: ScoreAccumulator, intervals: dict) -> pd.DataFrame:
    """Pooled scores with their intervals: the columns of ``metrics.csv`` but ``method``."""
    pooled = sum_starts(per_start)
    frames = [
        scores_to_frame(pooled, {name: getattr(ci, part) for name, ci in intervals.items()})
        for part in ("estimate", "lower", "upper")
    ]
    table = frames[0].drop(columns="method")
    table["ci_low"] = frames[1]["value"].to_numpy()
    table["ci_high"] = frames[2]["value"].to_numpy()
    table["n_starts"] = per_start.n_starts
    return table


def stack_starts(
    results: list[WindowScores], methods: tuple[str, ...]
) -> dict[str, dict[str, dict[str, ScoreAccumulator]]]:
    """Per-start accumulators: source (and :data:`ALL_SOURCES` with several) -> method -> family.

    Starts are in the order of ``results``, the same for every method, as the paired bootstrap
    needs.
    """
    groups: dict[str, list[WindowScores]] = {}
    for result in results:
        groups.setdefault(result.window.source, []).append(result)
    if len(groups) > 1:
        groups[ALL_SOURCES] = list(results)
    return {
        source: {
            method: {
                family: concat_starts([r.accumulators[method][family] for r in group])
                for family in group[0].accumulators[method]
            }
            for method in methods
        }
        for source, group in groups.items()
    }


def metrics_table(per_start: dict, n_bootstrap: int, confidence: float, seed: int) -> pd.DataFrame:
    """The tidy metrics table (:data:`METRIC_COLUMNS`) with bootstrap intervals."""
    frames = []
    for source, methods in per_start.items():
        for method, families in methods.items():
            for family_name, accumulator in families.items():
                intervals = bootstrap_ci(
                    accumulator, _compute_function(family_name), n_bootstrap, confidence, seed
                )
                table = interval_frame(accumulator, intervals)
                table["score"] = [_score_name(family_name, n) for n in table["score"]]
                frames.append(table.assign(method=method, source=source))
    return pd.concat(frames, ignore_index=True)[list(METRIC_COLUMNS)]


def differences_table(
    per_start: dict, compare: str, n_bootstrap: int, confidence: float, seed: int
) -> pd.DataFrame:
    """``compare`` minus every other method, with paired bootstrap intervals."""
    frames = []
    for source, methods in per_start.items():
        for baseline in methods:
            if baseline == compare:
                continue
            for family_name in methods[compare]:
                intervals = bootstrap_difference(
                    methods[compare][family_name],
                    methods[baseline][family_name],
                    _compute_function(family_name),
                    n_bootstrap,
                    confidence,
                    seed,
                )
                table = interval_frame(methods[compare][family_name], intervals)
                table["score"] = [_score_name(family_name, n) for n in table["score"]]
                frames.append(table.assign(method=compare, baseline=baseline, source=source))
    if not frames:
        return pd.DataFrame(columns=list(DIFFERENCE_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(DIFFERENCE_COLUMNS)]
