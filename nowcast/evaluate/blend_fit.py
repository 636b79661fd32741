"""Fit the per-lead blend weights of a forecast-method variant on the validation windows.

For a variant ``w_k * base + (1 - w_k) * other`` (see :mod:`nowcast.nowcasts.variants`) the
weight of lead ``k`` that minimises the squared error over the windows of a split is the
least-squares solution ``w_k = sum((o - s)(m - s)) / sum((m - s)^2)`` (``m`` base, ``s`` other,
``o`` observation, summed over the pixels where all three have data), clipped to [0, 1]. Only
these two sums per lead are kept per window, so the fit streams over any number of windows.

Selection happens on validation windows, never on the test block: the default split is ``val``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nowcast import storage
from nowcast.config import ConfigError, ExperimentConfig, load_experiment, stage_config
from nowcast.evaluate.scoring import cube_windows, plan_windows, store_windows
from nowcast.evaluate.setup import EvaluateConfig
from nowcast.evaluate.stage import resolve_methods
from nowcast.nowcasts.runner import ForecastRun, forecast_windows
from nowcast.nowcasts.variants import parse_variants


def blend_sums(base: np.ndarray, other: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Per lead ``[sum((o - s)(m - s)), sum((m - s)^2)]`` on the pixels where all have data."""
    valid = np.isfinite(base) & np.isfinite(other) & np.isfinite(observed)
    spread = np.where(valid, base - other, 0.0)
    gain = np.where(valid, observed - other, 0.0)
    axes = tuple(range(1, base.ndim))
    return np.stack([(gain * spread).sum(axis=axes), (spread * spread).sum(axis=axes)], axis=1)


def weights_from_sums(sums: np.ndarray) -> list[float]:
    """Least-squares weights of the base per lead, clipped to [0, 1] (1 where undetermined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], 1.0)
    return [round(float(w), 3) for w in np.clip(weights, 0.0, 1.0)]


def fit_blend_weights(
    config: str | Path | ExperimentConfig, variant: str, split: str = "val"
) -> list[float]:
    """Fit the blend weights of ``variant`` on the windows of ``split``.

    Parameters
    ----------
    config : str, Path or ExperimentConfig
        Experiment whose ``forecast_methods`` declares ``variant`` with a ``blend``.
    variant : str
        Variant name.
    split : str, optional
        Split whose windows are used, by default ``val``.

    Returns
    -------
    list of float
        One weight of the base method per lead time.

    Raises
    ------
    ConfigError
        If the variant has no blend, or the split has no windows.
    """
    experiment = config if isinstance(config, ExperimentConfig) else load_experiment(config)
    spec = parse_variants(experiment.forecast_methods).get(variant.lower())
    if spec is None or spec.blend is None:
        raise ConfigError(f"forecast_methods.{variant}: no such variant with a blend to fit")
    eval_config = stage_config(experiment, "evaluate", EvaluateConfig)
    eval_config = eval_config.model_copy(update={"split": split, "methods": None})
    if storage.exists(experiment.patch_store):
        table, info = store_windows(experiment.patch_store, split)
    else:
        table, info = cube_windows(experiment, split)
    if table.empty:
        raise ConfigError(f"fit blend weights: no windows in split '{split}'")
    names = (spec.method, spec.blend.method)
    methods_config = eval_config.model_copy(update={"methods": list(names)})
    _, checkpoint = resolve_methods(experiment, methods_config)
    run = ForecastRun(
        methods=names,
        method_kwargs={k.lower(): v for k, v in eval_config.method_kwargs.items()},
        checkpoint=checkpoint,
        device=eval_config.device,
        n_input_frames=info["n_input_frames"],
        n_leadtimes=eval_config.n_leadtimes or info["n_target_frames"],
        timestep_minutes=info["timestep_minutes"],
    )
    window_step = eval_config.window_stride or max(1, round(30 / info["timestep_minutes"]))
    sums = np.zeros((run.n_leadtimes, 2))
    windows = plan_windows(table, window_step, eval_config.max_windows)
    for forecast in forecast_windows(((w.cube_path, w.reference_time) for w in windows), run):
        values = forecast.forecasts
        sums += blend_sums(
            values[names[0]].values, values[names[1]].values, forecast.observed.values
        )
    return weights_from_sums(sums)
