"""The evaluate stage's configuration and records: the ``evaluate:`` section, windows, setups."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import numpy as np
from pydantic import Field, field_validator, model_validator

from nowcast.config import StrictModel
from nowcast.nowcasts.runner import ForecastRun
from nowcast.verification._accumulator import ScoreAccumulator

#: ``source`` of the rows pooled over all sources (only written with several sources).
ALL_SOURCES = "all"
EVALUATION_DIR = "evaluation"
#: Rain rate (mm/h) that picks the rainiest window for the default map panels.
MAP_RAIN_THRESHOLD = 1.0
SPLITS = ("train", "val", "test")
#: Ensemble methods and the keyword argument that sets their number of members
#: (``EvaluateConfig.members``).
MEMBER_KWARGS = {"steps": "n_ens_members", "ensemble": "n_members", "model_steps": "n_ens_members"}
#: Methods whose forecast is exceedance probabilities (threshold, lead_time, y, x), not rain:
#: scored by the Brier score only, as the reference of the Brier skill score.
PROBABILITY_METHODS = ("lagrangian_probability",)
#: Rain rates (mm/h) of the reliability diagrams, ROC curves and Brier scores (events ``>=``).
PROBABILITY_THRESHOLDS = (1.0, 5.0, 10.0)
#: Block sizes (pixels) of the pooled CRPS.
POOLING_SCALES = (1, 4, 16)


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
    members: int = Field(
        20,
        ge=1,
        description="members of the ensemble methods (steps' and model_steps' n_ens_members, "
        "the learned ensemble's n_members) unless method_kwargs sets them",
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForecastSetup(ForecastRun):
    """Everything a window task needs besides the window (small, sent to every task): the
    forecasts to make (:class:`~nowcast.nowcasts.runner.ForecastRun`) and how to score them.

    ``seed`` seeds the rank histogram's tie-breaking draws of each window (with the window's
    source and reference time), so that reruns agree whatever the Dask schedule.
    """

    thresholds: tuple[float, ...]
    scales: tuple[int, ...]
    seed: int = 0


@dataclasses.dataclass
class WindowScores:
    """Scores of one window: per method and score family, a pooled accumulator.

    ``wet_fraction`` is the share of valid observed pixels at or above
    :data:`MAP_RAIN_THRESHOLD` over the lead times, ``valid_fraction`` the share of valid ones.
    ``ensemble`` holds the probabilistic families per method (empty when no method of the run is
    an ensemble or a probability forecast, see :mod:`nowcast.evaluate.ensemble`); ``failures``
    names the methods whose forecast of this window is a stand-in (STEPS' ``steps_failed``).
    """

    window: Window
    accumulators: dict[str, dict[str, ScoreAccumulator]]
    wet_fraction: float
    valid_fraction: float
    ensemble: dict[str, dict[str, ScoreAccumulator]] = dataclasses.field(default_factory=dict)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
