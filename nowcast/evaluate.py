"""Evaluate stage: every forecast method on the same full-domain windows, scored with bootstrap CIs.

For each evaluation window of a split (listed by the patch store on its ``window`` dimension, or
derived from the cubes with the experiment's ``patches`` settings when there is no store yet),
the input frames and the observations are read from the cube and every method
(:mod:`nowcast.nowcasts`) forecasts from the same inputs. All methods of a window are scored on
one mask: the pixels where the observation and every forecast are finite. The scores are
streamed through the accumulators of :mod:`nowcast.verification`, one set per window (forecast
start), so that the pooled scores get percentile-bootstrap confidence intervals over start times
and the difference between two methods a paired interval.

Windows are independent: a Dask ``client.map`` scores them in parallel, each task returning
small accumulators (sums and counts) that are stacked along a start axis afterwards. A trained
model is loaded once per worker process and runs inside the tasks (on CUDA when the worker sees
a GPU). Map panels and the animation are drawn in the main process for a few chosen windows.

Outputs go to ``<run_dir>/evaluation/``, written in a temporary folder renamed into place when
complete: ``metrics.csv`` and ``metrics.json`` (tidy scores, see :data:`METRIC_COLUMNS`),
``differences.csv`` (one method minus each other, :data:`DIFFERENCE_COLUMNS`), ``report.md`` and
``figures/``. With ``score_patches`` also ``patch_metrics.csv``: the same scores on the store's
patches of the split (each patch one start).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from pydantic import Field, field_validator, model_validator

from nowcast import __version__, storage
from nowcast import nowcasts as forecast_methods
from nowcast import windows as window_rules
from nowcast.config import ConfigError, StrictModel
from nowcast.experiment import ExperimentConfig, load_experiment, stage_config
from nowcast.forecast import make_forecast
from nowcast.io.cube import cube_path, open_cube
from nowcast.nowcasts.extrapolation import N_MOTION_FRAMES, motion_field
from nowcast.nowcasts.variants import (
    base_methods,
    check_method_names,
    forecast_variants,
    parse_variants,
)
from nowcast.parallel import dask_client, show_progress
from nowcast.verification import (
    ScoreAccumulator,
    bootstrap_ci,
    bootstrap_difference,
    concat_starts,
    scores_to_frame,
    sum_starts,
)
from nowcast.verification import get_method as score_family
from nowcast.windows import select_windows  # noqa: F401  (public: evaluate's thinning rule)

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
#: ``source`` of the rows pooled over all sources (only written with several sources).
ALL_SOURCES = "all"
EVALUATION_DIR = "evaluation"
#: Rain rate (mm/h) that picks the rainiest window for the default map panels.
MAP_RAIN_THRESHOLD = 1.0
SPLITS = ("train", "val", "test")


class EvaluateConfig(StrictModel):
    """The ``evaluate:`` section of an experiment config."""

    methods: list[str] | None = Field(
        None,
        description="forecast methods (nowcast.nowcasts); default persistence, extrapolation "
        "and model when the checkpoint exists",
    )
    method_kwargs: dict[str, dict] = Field(
        default_factory=dict, description="extra keyword arguments per method, e.g. sprog"
    )
    checkpoint: str | None = Field(
        None, description="model checkpoint; default <run_dir>/checkpoints/best.pt"
    )
    device: str | None = Field(None, description="model device; default CUDA if available")
    split: str = Field("test", description="split whose windows are evaluated")
    n_leadtimes: int | None = Field(
        None, ge=1, description="lead times; default the store's n_target_frames"
    )
    window_stride: int | None = Field(
        None,
        ge=1,
        description="evaluate every k-th window of a source; default k = 30 min / timestep",
    )
    max_windows: int | None = Field(
        None, ge=1, description="at most this many windows per source, evenly spread"
    )
    thresholds: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
        min_length=1,
        description="rain rates (mm/h) of the categorical scores and the FSS",
    )
    fss_scales: list[int] = Field(
        default_factory=lambda: [1, 5, 10, 20],
        min_length=1,
        description="FSS window sizes in pixels (BoM 500 m: 0.5, 2.5, 5, 10 km)",
    )
    report_threshold: float = Field(1.0, description="threshold of the report tables (mm/h)")
    n_bootstrap: int = Field(1000, ge=1, description="bootstrap resamples of the start times")
    confidence: float = Field(0.95, gt=0, lt=1, description="coverage of the intervals")
    seed: int = 0
    compare: str | None = Field(
        None,
        description="method compared with every other one in differences.csv; default model "
        "when evaluated, else the last method",
    )
    figures: bool = Field(True, description="draw score curves, map panels and an animation")
    map_times: list[datetime] | None = Field(
        None, description="reference times of the map panels; default the rainiest window"
    )
    map_lead_times: list[int] = Field(
        default_factory=lambda: [10, 30, 60], description="lead times (minutes) of the map panels"
    )
    animate: bool = Field(True, description="write an animated GIF of one forecast")
    score_patches: bool = Field(False, description="also score the store's patches of the split")
    max_patches: int = Field(512, ge=1, description="patches scored with score_patches")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("methods must not be empty")
        # Registered names or the experiment's forecast_methods; evaluate() checks which.
        names = [name.lower() for name in value]
        if len(set(names)) != len(names):
            raise ValueError(f"methods are listed twice: {value}")
        return names

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str) -> str:
        if value not in SPLITS:
            raise ValueError(f"unknown split '{value}'; expected one of {', '.join(SPLITS)}")
        return value

    @field_validator("thresholds", "fss_scales")
    @classmethod
    def _positive_sorted(cls, value: list) -> list:
        if any(v <= 0 for v in value):
            raise ValueError("values must be positive")
        return sorted(set(value))

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        if self.report_threshold not in self.thresholds:
            raise ValueError(
                f"report_threshold {self.report_threshold} is not in thresholds {self.thresholds}"
            )
        if self.methods is not None and self.compare is not None:
            if self.compare.lower() not in self.methods:
                raise ValueError(f"compare '{self.compare}' is not in methods {self.methods}")
        return self


@dataclasses.dataclass(frozen=True)
class Window:
    """One full-domain forecast start: the source, its cube and the reference time."""

    source: str
    cube_path: str
    reference_time: np.datetime64


@dataclasses.dataclass(frozen=True)
class ForecastSetup:
    """Everything a window task needs besides the window (small, sent to every task)."""

    methods: tuple[str, ...]
    method_kwargs: dict
    checkpoint: str | None
    device: str | None
    n_input_frames: int
    n_leadtimes: int
    timestep_minutes: int
    thresholds: tuple[float, ...]
    scales: tuple[int, ...]
    #: Forecast-method variants among ``methods`` (name to MethodSpec).
    variants: dict = dataclasses.field(default_factory=dict)

    @property
    def lead_times(self) -> np.ndarray:
        """Lead times in minutes."""
        return self.timestep_minutes * np.arange(1, self.n_leadtimes + 1, dtype=float)


@dataclasses.dataclass
class WindowScores:
    """Scores of one window: per method and score family, a pooled accumulator.

    ``wet_fraction`` is the share of valid observed pixels at or above
    :data:`MAP_RAIN_THRESHOLD` over the lead times, ``valid_fraction`` the share of valid ones.
    """

    window: Window
    accumulators: dict[str, dict[str, ScoreAccumulator]]
    wet_fraction: float
    valid_fraction: float


# --------------------------------------------------------------------------------------------
# windows


def store_windows(path: str, split: str) -> tuple[pd.DataFrame, dict]:
    """Windows of a split from the patch store, and the store's frame settings.

    Returns
    -------
    tuple
        A table (source, cube_path, reference_time) and ``{"n_input_frames", "n_target_frames",
        "timestep_minutes", "normalization"}``.
    """
    from nowcast.patch_store import PatchStore

    store = PatchStore.open(path)
    table = store.windows(split)
    table["source"] = table["source"].astype(str)
    table["reference_time"] = table["reference_time"].astype("datetime64[ns]")
    info = {
        "n_input_frames": store.n_input_frames,
        "n_target_frames": store.n_target_frames,
        "timestep_minutes": store.timestep_minutes,
        "normalization": store.normalization,
    }
    return table[["source", "cube_path", "reference_time"]], info


def cube_windows(experiment: ExperimentConfig, split: str) -> tuple[pd.DataFrame, dict]:
    """Windows of a split derived from the cubes, as ``nowcast patches`` would list them.

    Uses the experiment's ``patches`` section (frame counts, resampling, split blocks, buffer)
    and :mod:`nowcast.windows`, which the patch builder uses too, so the windows are those the
    store would hold.
    """
    from nowcast.patches import PatchesConfig

    patches_config = stage_config(experiment, "patches", PatchesConfig)
    timelines = []
    for source in experiment.sources:
        path = cube_path(experiment.cube_root, source)
        timelines.append(
            window_rules.Timeline.from_cube(
                source, path, open_cube(path), patches_config.resample_minutes
            )
        )
    n_input, n_target = window_rules.frame_counts(
        timelines, patches_config.n_input_frames, patches_config.n_target_frames
    )
    tables = []
    for timeline in timelines:
        labels = window_rules.split_labels(timeline, patches_config)
        listed = window_rules.list_windows(timeline, labels, n_input, n_target)
        tables.append(listed[listed["split"] == split])
    info = {
        "n_input_frames": n_input,
        "n_target_frames": n_target,
        "timestep_minutes": int(timelines[0].timestep),
        "normalization": None,
    }
    table = pd.concat(tables, ignore_index=True)
    return table[["source", "cube_path", "reference_time"]], info


def plan_windows(table: pd.DataFrame, stride: int, max_windows: int | None) -> list[Window]:
    """Windows to evaluate, per source in time order, thinned by ``stride`` and ``max_windows``."""
    windows = []
    for source, group in table.groupby("source", sort=False):
        group = group.sort_values("reference_time")
        times = group["reference_time"].to_numpy(dtype="datetime64[ns]")
        for index in window_rules.select_windows(times, stride, max_windows):
            windows.append(Window(source, group["cube_path"].iloc[index], times[index]))
    return windows


# --------------------------------------------------------------------------------------------
# forecasts and scores of one window


@functools.lru_cache(maxsize=4)
def _model_method(checkpoint: str, device: str | None, modified: float):
    # One model per process and checkpoint version (``modified`` is the file's mtime).
    return forecast_methods.get_method("model")(checkpoint=checkpoint, device=device)


def run_methods(inputs: xr.DataArray, setup: ForecastSetup) -> dict[str, xr.DataArray]:
    """Forecast with every method of ``setup`` from the same inputs.

    The Lucas-Kanade motion field is estimated once and shared by ``extrapolation`` and
    ``sprog`` (unless their ``method_kwargs`` choose another motion method). Variants
    (``setup.variants``, :mod:`nowcast.nowcasts.variants`) are built from their bases'
    forecasts, which run once even when several variants share them.

    Parameters
    ----------
    inputs : xarray.DataArray
        Input frames (time, y, x), see :func:`nowcast.nowcasts.cube_inputs`.
    setup : ForecastSetup
        Methods, their keyword arguments and the number of lead times.

    Returns
    -------
    dict of xarray.DataArray
        Method name to Forecast.
    """
    velocity = None
    forecasts = {}
    for name in base_methods(setup.methods, setup.variants):
        kwargs = dict(setup.method_kwargs.get(name, {}))
        if name == "model":
            modified = os.path.getmtime(setup.checkpoint)
            method = _model_method(setup.checkpoint, setup.device, modified)
        else:
            method = forecast_methods.get_method(name)
        # One LK field per window, shared by every method that advects (a Lagrangian model too).
        advects = name in ("extrapolation", "sprog") or getattr(method, "frame", "") == "lagrangian"
        if advects and "motion_method" not in kwargs:
            if velocity is None:
                velocity = motion_field(np.asarray(inputs.values))
            kwargs.setdefault("velocity", velocity)
        forecasts[name] = method(inputs, setup.n_leadtimes, **kwargs)
    return forecast_variants(setup.methods, setup.variants, forecasts, inputs)


def observed_frames(
    cube: xr.Dataset, reference_time, n_leadtimes: int, timestep_minutes: int
) -> xr.DataArray:
    """The observations at the lead times of a forecast, in the Forecast layout.

    Returns
    -------
    xarray.DataArray
        Rain rate (lead_time, y, x) with the method attribute ``observed``.
    """
    times = window_rules.valid_times(reference_time, n_leadtimes, timestep_minutes)
    indices = window_rules.cube_time_indices(cube, times, "observations")
    values = cube["rain_rate"].isel(time=indices).compute(scheduler="synchronous")
    return make_forecast(
        values.values, pd.Timestamp(reference_time), timestep_minutes, cube, method="observed"
    )


def accumulate_scores(
    forecasts: dict[str, np.ndarray],
    observed: np.ndarray,
    lead_times,
    thresholds,
    scales,
) -> dict[str, dict[str, ScoreAccumulator]]:
    """Score several forecasts of one start on their common mask.

    Parameters
    ----------
    forecasts : dict of numpy.ndarray
        Method name to forecast (n_leadtimes, y, x) in mm/h.
    observed : numpy.ndarray
        Observations (n_leadtimes, y, x).
    lead_times : sequence of float
        Lead times in minutes.
    thresholds : sequence of float
        Thresholds (mm/h) of the categorical scores and the FSS.
    scales : sequence of int
        FSS window sizes (pixels).

    Returns
    -------
    dict
        Method name to ``{"det_cat", "det_cont", "fss"}`` pooled accumulators. Only pixels where
        the observation and every forecast are finite count (for the FSS the others are
        non-events in every field alike). Also the :data:`MASKED_FAMILIES`: ``*_allobs`` on
        every valid observation, and ``dry_area`` when ``extrapolation`` is among the forecasts.
    """
    observed_raw = observed
    valid = np.isfinite(observed)
    for values in forecasts.values():
        valid &= np.isfinite(values)
    observed = np.where(valid, observed, np.nan)
    coordinates = {
        "det_cat": (lead_times, thresholds),
        "det_cont": (lead_times,),
        "fss": (lead_times, thresholds, scales),
    }
    observed_all = np.where(np.isfinite(observed_raw), observed_raw, np.nan)
    dry = None
    if "extrapolation" in forecasts:
        lk = forecasts["extrapolation"]
        dry = valid & (observed_raw < DRY_RAIN) & (lk < DRY_RAIN)
    scores = {}
    for name, raw in forecasts.items():
        values = np.where(valid, raw, np.nan)
        scores[name] = {}
        for family_name, coords in coordinates.items():
            family = score_family(family_name)
            scores[name][family_name] = family.accum(family.init(*coords), values, observed)
        # pysteps' convention: no data in a forecast is no rain where there is an observation.
        filled = np.where(np.isfinite(raw), raw, 0.0)
        for key, coords in (
            ("det_cat_allobs", coordinates["det_cat"]),
            ("det_cont_allobs", coordinates["det_cont"]),
        ):
            family = score_family(MASKED_FAMILIES[key][0])
            scores[name][key] = family.accum(family.init(*coords), filled, observed_all)
        if dry is not None:
            family = score_family("det_cat")
            scores[name]["dry_area"] = family.accum(
                family.init(lead_times, (FALSE_ALARM_RAIN,)),
                np.where(dry, raw, np.nan),
                np.where(dry, observed_raw, np.nan),
            )
    return scores


def score_window(window: Window, setup: ForecastSetup) -> WindowScores:
    """Forecast and score one window with every method (a Dask task).

    Parameters
    ----------
    window : Window
        Source, cube and reference time.
    setup : ForecastSetup
        Methods, frame counts, thresholds and scales.

    Returns
    -------
    WindowScores
        Pooled accumulators per method and family, and the window's observed wet fraction.
    """
    cube = open_cube(window.cube_path)
    inputs = forecast_methods.cube_inputs(
        cube, window.reference_time, setup.n_input_frames, setup.timestep_minutes
    )
    observed = observed_frames(
        cube, window.reference_time, setup.n_leadtimes, setup.timestep_minutes
    ).values
    forecasts = run_methods(inputs, setup)
    accumulators = accumulate_scores(
        {name: forecast.values for name, forecast in forecasts.items()},
        observed,
        setup.lead_times,
        setup.thresholds,
        setup.scales,
    )
    finite = np.isfinite(observed)
    n_valid = int(finite.sum())
    wet = int(np.count_nonzero(observed[finite] >= MAP_RAIN_THRESHOLD))
    return WindowScores(window, accumulators, wet / max(n_valid, 1), n_valid / observed.size)


# --------------------------------------------------------------------------------------------
# tables


def _compute_function(family_name: str):
    if family_name in MASKED_FAMILIES:
        name, scores, _ = MASKED_FAMILIES[family_name]
        return functools.partial(score_family(name).compute, scores=scores)
    return functools.partial(score_family(family_name).compute, scores=FAMILY_SCORES[family_name])


def _score_name(family_name: str, score: str) -> str:
    if family_name == "dry_area":
        return "DRY_FA"
    return score + MASKED_FAMILIES.get(family_name, ("", (), ""))[2]


def _interval_frame(per_start: ScoreAccumulator, intervals: dict) -> pd.DataFrame:
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
                table = _interval_frame(accumulator, intervals)
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
                table = _interval_frame(methods[compare][family_name], intervals)
                table["score"] = [_score_name(family_name, n) for n in table["score"]]
                frames.append(table.assign(method=compare, baseline=baseline, source=source))
    if not frames:
        return pd.DataFrame(columns=list(DIFFERENCE_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(DIFFERENCE_COLUMNS)]


# --------------------------------------------------------------------------------------------
# report


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(row: pd.Series, digits: str) -> str:
    if not np.isfinite(row["value"]):
        return "n/a"
    return f"{row['value']:{digits}} [{row['ci_low']:{digits}}, {row['ci_high']:{digits}}]"


def _lead_table(table: pd.DataFrame, columns: list[str], column_key: str, digits: str) -> str:
    rows = []
    for lead_time in sorted(table["lead_time"].unique()):
        at_lead = table[table["lead_time"] == lead_time]
        row = [f"{lead_time:g}"]
        for column in columns:
            match = at_lead[at_lead[column_key] == column]
            row.append(_cell(match.iloc[0], digits) if len(match) else "n/a")
        rows.append(row)
    return _markdown_table(["lead time (min)", *columns], rows)


def _select(table: pd.DataFrame, score: str, threshold=None, scale=None) -> pd.DataFrame:
    chosen = table[table["score"] == score]
    if threshold is not None:
        chosen = chosen[np.isclose(chosen["threshold"], threshold)]
    if scale is not None:
        chosen = chosen[chosen["scale"] == scale]
    return chosen


def report_text(
    experiment: ExperimentConfig,
    config: EvaluateConfig,
    metrics: pd.DataFrame,
    differences: pd.DataFrame,
    summary: dict,
    figures: dict[str, list[str]],
) -> str:
    """The Markdown report: setup, score tables with intervals, and figure links."""
    threshold = config.report_threshold
    methods = summary["methods"]
    lines = [
        f"# Evaluation of experiment `{experiment.name}`",
        "",
        (
            f"Catalog source `{summary['zero_shot']['source']}` (zero-shot)"
            if summary.get("zero_shot")
            else f"Split `{config.split}`"
        )
        + f"; methods: {', '.join(methods)}"
        + (f" (checkpoint `{summary['checkpoint']}`)" if summary.get("checkpoint") else "")
        + ".",
        f"Lead times {summary['lead_times'][0]:g} to {summary['lead_times'][-1]:g} min every "
        f"{summary['timestep_minutes']} min, from {summary['n_input_frames']} input frames.",
        "Scores are pooled over all forecast starts and scored on the pixels where the "
        "observation and every forecast have data. Brackets: "
        f"{config.confidence:.0%} percentile-bootstrap intervals over start times "
        f"({config.n_bootstrap} resamples); differences use paired resamples.",
        "",
    ]
    variants = summary.get("forecast_methods") or {}
    if variants:
        lines += ["Forecast-method variants (`forecast_methods`):", ""]
        lines += [f"- `{name}`: `{json.dumps(spec)}`" for name, spec in variants.items()]
        lines.append("")
    for source, info in summary["sources"].items():
        at_source = metrics[metrics["source"] == source]
        lines += [
            f"## Source `{source}`",
            "",
            f"{info['n_windows']} windows (reference times {info['first']} to {info['last']}, "
            f"one start every {summary['window_stride'] * summary['timestep_minutes']} min); "
            f"pixel {info['pixel_size_m']:g} m.",
            "",
            f"### CSI at {threshold:g} mm/h",
            "",
            _lead_table(_select(at_source, "CSI", threshold), methods, "method", ".3f"),
            "",
            "### MSE (mm² h⁻²)",
            "",
            _lead_table(_select(at_source, "MSE"), methods, "method", ".3g"),
            "",
        ]
        pixel_km = info["pixel_size_m"] / 1000.0
        scale_rows = []
        lead_times = sorted(at_source["lead_time"].unique())
        fss_lead = 30.0 if 30.0 in lead_times else lead_times[-1]
        fss = _select(at_source, "FSS", threshold)
        fss = fss[fss["lead_time"] == fss_lead]
        for scale in config.fss_scales:
            row = [f"{scale} ({scale * pixel_km:g} km)"]
            for method in methods:
                match = fss[(fss["scale"] == scale) & (fss["method"] == method)]
                row.append(_cell(match.iloc[0], ".3f") if len(match) else "n/a")
            scale_rows.append(row)
        lines += [
            f"### FSS at {threshold:g} mm/h, lead time {fss_lead:g} min",
            "",
            _markdown_table(["scale (pixels)", *methods], scale_rows),
            "",
        ]
        at_diff = differences[differences["source"] == source]
        if len(at_diff):
            compare = at_diff["method"].iloc[0]
            baselines = list(dict.fromkeys(at_diff["baseline"]))
            for score, score_threshold, digits in (("CSI", threshold, ".3f"), ("MSE", None, ".3g")):
                chosen = _select(at_diff, score, score_threshold)
                label = f"{score} at {threshold:g} mm/h" if score_threshold else score
                lines += [
                    f"### {compare} minus baseline: {label}",
                    "",
                    _lead_table(chosen, baselines, "baseline", digits),
                    "",
                ]
        if figures.get(source):
            lines += ["### Figures", ""]
            lines += [f"![{Path(f).stem}]({f})" for f in figures[source]]
            lines.append("")
    lines += [
        "Files: `metrics.csv` / `metrics.json` (all scores, thresholds and scales), "
        "`differences.csv`.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# figures


def _time_label(time) -> str:
    return pd.Timestamp(time).strftime("%Y%m%d%H%M")


def draw_figures(
    folder: Path,
    metrics: pd.DataFrame,
    config: EvaluateConfig,
    setup: ForecastSetup,
    windows: list[Window],
    results: list[WindowScores],
    animation_method: str,
) -> dict[str, list[str]]:
    """Score curves, map panels and an animation per source; paths relative to ``folder``."""
    from nowcast import visualization

    figure_dir = folder / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[str]] = {}
    for source in dict.fromkeys(w.source for w in windows):
        at_source = metrics[metrics["source"] == source]
        paths = [
            f"figures/csi_vs_lead_time_{source}.png",
            f"figures/mse_mae_{source}.png",
            f"figures/fss_vs_lead_time_{source}.png",
        ]
        visualization.plot_score_vs_lead_time(at_source, "CSI", folder / paths[0])
        visualization.plot_continuous_scores(at_source, ["MSE", "MAE"], folder / paths[1])
        # FSS at the report threshold only: one panel per scale.
        fss = at_source[np.isclose(at_source["threshold"], config.report_threshold)]
        visualization.plot_score_vs_lead_time(fss, "FSS", folder / paths[2])
        for window in map_windows(config, windows, results, source):
            cube = open_cube(window.cube_path)
            try:
                inputs = forecast_methods.cube_inputs(
                    cube, window.reference_time, setup.n_input_frames, setup.timestep_minutes
                )
                observed = observed_frames(
                    cube, window.reference_time, setup.n_leadtimes, setup.timestep_minutes
                )
            except KeyError:
                raise ConfigError(
                    f"evaluate.map_times: the cube of '{source}' lacks the frames of a forecast "
                    f"from {pd.Timestamp(window.reference_time)}"
                ) from None
            forecasts = run_methods(inputs, setup)
            label = _time_label(window.reference_time)
            lead_times = [t for t in config.map_lead_times if t in setup.lead_times]
            panel = f"figures/maps_{source}_{label}.png"
            visualization.plot_forecast_panels(
                observed, forecasts, lead_times or [float(setup.lead_times[-1])], folder / panel
            )
            paths.append(panel)
            if config.animate and not any(p.endswith(".gif") for p in paths):
                gif = f"figures/forecast_{animation_method}_{source}_{label}.gif"
                visualization.animate_forecast(forecasts[animation_method], observed, folder / gif)
                paths.append(gif)
        figures[source] = paths
    return figures


def map_windows(
    config: EvaluateConfig, windows: list[Window], results: list[WindowScores], source: str
) -> list[Window]:
    """Windows of ``source`` drawn as map panels: ``map_times``, else the rainiest one."""
    at_source = [r for r in results if r.window.source == source]
    if config.map_times is None:
        rainiest = max(at_source, key=lambda r: r.wet_fraction)
        return [rainiest.window]
    cube = at_source[0].window.cube_path
    return [Window(source, cube, np.datetime64(t, "ns")) for t in config.map_times]


# --------------------------------------------------------------------------------------------
# patches


def score_store_patches(
    store: str, config: EvaluateConfig, setup: ForecastSetup
) -> dict[str, dict[str, dict[str, ScoreAccumulator]]]:
    """Per-patch accumulators of the store's patches of the split (in this process).

    Patches are transformed back to rain rate (no-data from the masks) and every method forecasts
    on the patch alone, as the network saw it in training; each patch counts as one start. At
    most ``max_patches``, evenly spread over the split's patches.
    """
    from nowcast.patch_store import PatchStore

    store = PatchStore.open(store)
    transform, params = store.transform()

    def rain_rate(values, mask) -> np.ndarray:
        values = transform.inverse(np.asarray(values, dtype=np.float32), params)
        return np.where(np.asarray(mask), values, np.nan).astype(np.float32)

    in_split = store.samples(config.split)["sample"].to_numpy()
    if in_split.size == 0:
        raise ConfigError(f"the patch store has no patches in split '{config.split}'")
    chosen = in_split[
        np.unique(np.linspace(0, in_split.size - 1, config.max_patches).round().astype(int))
    ]
    cubes = {source: open_cube(path) for source, path in store.cube_paths.items()}
    n_input = setup.n_input_frames
    results = []
    for index in chosen:
        sample = store.sample(int(index))
        cube = cubes[str(sample["source"].values)]
        size = sample.sizes["y"]
        y0, x0 = int(sample["y0"]), int(sample["x0"])
        crop = cube.isel(y=slice(y0, y0 + size), x=slice(x0, x0 + size))

        reference = np.datetime64(sample["reference_time"].values, "ns")
        inputs = xr.DataArray(
            rain_rate(sample["inputs"].values, sample["input_mask"].values),
            dims=("time", "y", "x"),
            coords={
                "time": window_rules.input_times(reference, n_input, setup.timestep_minutes),
                "y": crop["y"],
                "x": crop["x"],
            },
            attrs={"crs_wkt": cube["crs"].attrs["crs_wkt"]},
        )
        observed = rain_rate(sample["targets"].values, sample["target_mask"].values)
        forecasts = run_methods(inputs, setup)
        accumulators = accumulate_scores(
            {name: f.values for name, f in forecasts.items()},
            observed[: setup.n_leadtimes],
            setup.lead_times,
            setup.thresholds,
            setup.scales,
        )
        window = Window(str(sample["source"].values), "", reference)
        results.append(WindowScores(window, accumulators, 0.0, 1.0))
    return stack_starts(results, setup.methods)


# --------------------------------------------------------------------------------------------
# the stage


def _experiment(config: str | Path | ExperimentConfig) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    return load_experiment(config)


def resolve_methods(
    experiment: ExperimentConfig, config: EvaluateConfig, variants: dict | None = None
) -> tuple[tuple[str, ...], str | None]:
    """The methods to run and the checkpoint path (None when no method needs the model).

    Raises
    ------
    ConfigError
        If a method is neither registered nor in ``variants`` (the experiment's
        ``forecast_methods``), or the model is needed and the checkpoint does not exist.
    """
    variants = variants or {}
    checkpoint = config.checkpoint or str(Path(experiment.run_path) / "checkpoints" / "best.pt")
    if config.methods is None:
        methods = ["persistence", "extrapolation"]
        if Path(checkpoint).is_file():
            methods.append("model")
    else:
        methods = list(config.methods)
    check_method_names(methods, variants, "evaluate.methods")
    if "model" not in base_methods(methods, variants):
        return tuple(methods), None
    if not Path(checkpoint).is_file():
        raise ConfigError(
            f"evaluate: method 'model' needs the checkpoint {checkpoint}; run `nowcast train` "
            "or set evaluate.checkpoint"
        )
    return tuple(methods), checkpoint


def _check_model(checkpoint: str, info: dict, n_leadtimes: int) -> None:
    from nowcast.checkpoint import load_checkpoint

    meta = load_checkpoint(checkpoint)
    problems = []
    if int(meta["timestep_minutes"]) != info["timestep_minutes"]:
        problems.append(
            f"timestep {meta['timestep_minutes']} min != windows' {info['timestep_minutes']} min"
        )
    if int(meta["n_input_frames"]) > info["n_input_frames"]:
        problems.append(
            f"needs {meta['n_input_frames']} input frames, windows have {info['n_input_frames']}"
        )
    if int(meta["n_target_frames"]) < n_leadtimes:
        problems.append(f"predicts {meta['n_target_frames']} lead times, {n_leadtimes} asked")
    if problems:
        raise ConfigError(f"evaluate: checkpoint {checkpoint} does not fit: {'; '.join(problems)}")


def _pixel_size(cube_path_: str) -> float:
    x = open_cube(cube_path_)["x"].values
    return float(abs(x[1] - x[0])) if x.size > 1 else float("nan")


def _records(table: pd.DataFrame) -> list[dict]:
    return json.loads(table.to_json(orient="records", double_precision=15))


def evaluate(
    config: str | Path | ExperimentConfig,
    scheduler: str | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Run the evaluate stage of an experiment.

    Parameters
    ----------
    config : str, Path or ExperimentConfig
        Experiment config file or a loaded config.
    scheduler : str, optional
        Dask scheduler address, ``"threads"``, or None for a local cluster.
    progress : bool, optional
        Show a progress bar over the windows.

    Returns
    -------
    dict of str
        Paths of the outputs: ``folder``, ``metrics_csv``, ``metrics_json``, ``differences_csv``,
        ``report``, ``figures`` (list) and, with ``score_patches``, ``patch_metrics_csv``.

    Raises
    ------
    ConfigError
        For an invalid section, a missing cube or checkpoint, or a split without windows.
    """
    experiment = _experiment(config)
    eval_config = stage_config(experiment, "evaluate", EvaluateConfig)
    store = experiment.patch_store
    if storage.exists(store):
        table, info = store_windows(store, eval_config.split)
    else:
        table, info = cube_windows(experiment, eval_config.split)
        store = None
    plan = plan_evaluation(experiment, eval_config, table, info, store=store)
    return score_and_write(plan, scheduler=scheduler, progress=progress)


@dataclasses.dataclass
class EvaluationPlan:
    """What :func:`score_and_write` scores and where it writes (see :func:`plan_evaluation`).

    ``summary`` is the run metadata of ``metrics.json`` (``sources`` is filled after scoring);
    ``notes`` are report lines put under the title; ``store`` is the patch store, if any.
    """

    experiment: ExperimentConfig
    config: EvaluateConfig
    windows: list[Window]
    setup: ForecastSetup
    compare: str
    summary: dict
    folder: Path
    store: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def plan_evaluation(
    experiment: ExperimentConfig,
    eval_config: EvaluateConfig,
    table: pd.DataFrame,
    info: dict,
    *,
    store: str | None = None,
    windows_from: str | None = None,
    folder: str | Path | None = None,
) -> EvaluationPlan:
    """Check the methods and the checkpoint against the windows, and plan the forecasts.

    Parameters
    ----------
    experiment : ExperimentConfig
        Names the run (report title) and gives the default checkpoint and variants.
    eval_config : EvaluateConfig
        The evaluate settings.
    table : pandas.DataFrame
        Windows (source, cube_path, reference_time), as :func:`store_windows` lists them.
    info : dict
        ``n_input_frames``, ``n_target_frames`` and ``timestep_minutes`` of the windows.
    store : str, optional
        The patch store the windows come from (None: from the cubes).
    windows_from : str, optional
        Where the windows come from, for ``metrics.json``; default ``patch store`` or ``cubes``.
    folder : str or Path, optional
        Output folder; default ``<run_dir>/evaluation``.

    Returns
    -------
    EvaluationPlan

    Raises
    ------
    ConfigError
        For a split without windows, too many lead times, a missing or unfit checkpoint.
    """
    if table.empty:
        raise ConfigError(f"evaluate: no windows in split '{eval_config.split}'")
    variants = parse_variants(experiment.forecast_methods)
    methods, checkpoint = resolve_methods(experiment, eval_config, variants)
    n_leadtimes = eval_config.n_leadtimes or info["n_target_frames"]
    if n_leadtimes > info["n_target_frames"]:
        raise ConfigError(
            f"evaluate.n_leadtimes={n_leadtimes} exceeds the windows' {info['n_target_frames']} "
            "target frames"
        )
    advecting = {"extrapolation", "sprog"} & set(base_methods(methods, variants))
    if advecting and info["n_input_frames"] < N_MOTION_FRAMES:
        raise ConfigError(f"extrapolation needs {N_MOTION_FRAMES} input frames")
    if checkpoint is not None:
        _check_model(checkpoint, info, n_leadtimes)
    compare = (eval_config.compare or ("model" if "model" in methods else methods[-1])).lower()
    if compare not in methods:
        raise ConfigError(f"evaluate.compare '{compare}' is not among the methods {list(methods)}")
    stride = eval_config.window_stride or max(1, round(30 / info["timestep_minutes"]))
    windows = plan_windows(table, stride, eval_config.max_windows)
    setup = ForecastSetup(
        methods=methods,
        method_kwargs={k.lower(): v for k, v in eval_config.method_kwargs.items()},
        variants={name: variants[name] for name in methods if name in variants},
        checkpoint=checkpoint,
        device=eval_config.device,
        n_input_frames=info["n_input_frames"],
        n_leadtimes=n_leadtimes,
        timestep_minutes=info["timestep_minutes"],
        thresholds=tuple(eval_config.thresholds),
        scales=tuple(eval_config.fss_scales),
    )

    summary = {
        "experiment": experiment.name,
        "split": eval_config.split,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "nowcast_version": __version__,
        "methods": list(methods),
        "forecast_methods": {
            name: spec.model_dump(mode="json", exclude_none=True)
            for name, spec in setup.variants.items()
        },
        "compare": compare,
        "checkpoint": checkpoint,
        "windows_from": windows_from or ("patch store" if store else "cubes"),
        "n_input_frames": setup.n_input_frames,
        "timestep_minutes": setup.timestep_minutes,
        "lead_times": setup.lead_times.tolist(),
        "window_stride": stride,
        "sources": {},
        "config": json.loads(eval_config.model_dump_json()),
    }
    folder = Path(folder) if folder is not None else Path(experiment.run_path) / EVALUATION_DIR
    return EvaluationPlan(experiment, eval_config, windows, setup, compare, summary, folder, store)


def score_and_write(
    plan: EvaluationPlan, scheduler: str | None = None, progress: bool = True
) -> dict[str, str]:
    """Score the plan's windows on Dask and write the outputs into ``plan.folder`` atomically.

    Returns
    -------
    dict of str
        As :func:`evaluate` returns.
    """
    experiment, eval_config, store = plan.experiment, plan.config, plan.store
    windows, setup, compare = plan.windows, plan.setup, plan.compare
    methods = setup.methods
    with dask_client(scheduler) as client:
        futures = client.map(score_window, windows, setup=setup, pure=False)
        if progress:
            show_progress(futures)
        results = client.gather(futures)

    per_start = stack_starts(results, methods)
    bootstrap = (eval_config.n_bootstrap, eval_config.confidence, eval_config.seed)
    metrics = metrics_table(per_start, *bootstrap)
    differences = differences_table(per_start, compare, *bootstrap)
    summary = plan.summary
    for source in dict.fromkeys(w.source for w in windows):
        at_source = [r for r in results if r.window.source == source]
        times = [r.window.reference_time for r in at_source]
        path = at_source[0].window.cube_path
        summary["sources"][source] = {
            "cube": path,
            "pixel_size_m": _pixel_size(path),
            "n_windows": len(times),
            "first": pd.Timestamp(times[0]).isoformat(),
            "last": pd.Timestamp(times[-1]).isoformat(),
            "reference_times": [pd.Timestamp(t).isoformat() for t in times],
            "wet_fraction": [r.wet_fraction for r in at_source],
            "valid_fraction": [r.valid_fraction for r in at_source],
        }

    patch_metrics = None
    if eval_config.score_patches:
        if store is None:
            raise ConfigError("evaluate.score_patches needs the patch store; run `nowcast patches`")
        patch_metrics = metrics_table(score_store_patches(store, eval_config, setup), *bootstrap)

    final = plan.folder
    animation_method = compare
    with storage.atomic_path(final) as tmp:
        folder = Path(tmp)
        folder.mkdir(parents=True)
        figures = {}
        if eval_config.figures:
            figures = draw_figures(
                folder, metrics, eval_config, setup, windows, results, animation_method
            )
        metrics.to_csv(folder / "metrics.csv", index=False)
        differences.to_csv(folder / "differences.csv", index=False)
        payload = {
            **summary,
            "columns": list(METRIC_COLUMNS),
            "metrics": _records(metrics),
            "differences": _records(differences),
        }
        (folder / "metrics.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
        if patch_metrics is not None:
            patch_metrics.to_csv(folder / "patch_metrics.csv", index=False)
        report = report_text(experiment, eval_config, metrics, differences, summary, figures)
        if plan.notes:
            title, _, rest = report.partition("\n")
            report = "\n".join([title, "", *plan.notes, rest])
        (folder / "report.md").write_text(report)
    outputs = {
        "folder": str(final),
        "metrics_csv": str(final / "metrics.csv"),
        "metrics_json": str(final / "metrics.json"),
        "differences_csv": str(final / "differences.csv"),
        "report": str(final / "report.md"),
        "figures": [str(final / f) for paths in figures.values() for f in paths],
    }
    if patch_metrics is not None:
        outputs["patch_metrics_csv"] = str(final / "patch_metrics.csv")
    return outputs
