"""Figures of an evaluation: score curves, map panels in the radar projection, an animation."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from nowcast import visualization
from nowcast.config import ConfigError
from nowcast.evaluate.ensemble import ProbabilisticTables, split_forecasts
from nowcast.evaluate.setup import (
    PROBABILITY_THRESHOLDS,
    EvaluateConfig,
    ForecastSetup,
    Window,
    WindowScores,
)
from nowcast.nowcasts.forecast import ensemble_mean, ensemble_size
from nowcast.nowcasts.runner import forecast_window
from nowcast.sources.cube import open_cube
from nowcast.visualization.ensemble_plots import (
    plot_crps_vs_lead_time,
    plot_power_spectra,
    plot_probability_maps,
    plot_rank_histograms,
    plot_reliability_diagrams,
    plot_roc_curves,
)

#: Thresholds (mm/h) of the probability maps.
MAP_THRESHOLDS = (1.0, 10.0)


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
    probabilistic: ProbabilisticTables | None = None,
) -> dict[str, list[str]]:
    """Score curves, map panels and an animation per source; paths relative to ``folder``.

    With ``probabilistic`` also the probabilistic figures (:func:`probabilistic_figures`) and,
    for the first map window, each ensemble's probability maps beside two members and the
    observation. An ensemble is drawn as its ensemble mean in the map panels and animation.
    """
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
        if probabilistic is not None:
            paths += probabilistic_figures(folder, probabilistic, source)
        for index, window in enumerate(map_windows(config, windows, results, source)):
            try:
                forecast = forecast_window(
                    open_cube(window.cube_path), window.reference_time, setup
                )
            except KeyError:
                raise ConfigError(
                    f"evaluate.map_times: the cube of '{source}' lacks the frames of a forecast "
                    f"from {pd.Timestamp(window.reference_time)}"
                ) from None
            observed = forecast.observed
            rain, _ = split_forecasts(forecast.forecasts)
            forecasts = {name: ensemble_mean(values) for name, values in rain.items()}
            label = _time_label(window.reference_time)
            lead_times = [t for t in config.map_lead_times if t in setup.lead_times]
            lead_times = lead_times or [float(setup.lead_times[-1])]
            panel = f"figures/maps_{source}_{label}.png"
            visualization.plot_forecast_panels(observed, forecasts, lead_times, folder / panel)
            paths.append(panel)
            if probabilistic is not None and index == 0:
                for name in (name for name, f in rain.items() if ensemble_size(f) > 1):
                    maps = f"figures/probability_maps_{name}_{source}_{label}.png"
                    plot_probability_maps(
                        observed, rain[name], lead_times, MAP_THRESHOLDS, path=folder / maps
                    )
                    paths.append(maps)
            if config.animate and not any(p.endswith(".gif") for p in paths):
                gif = f"figures/forecast_{animation_method}_{source}_{label}.gif"
                visualization.animate_forecast(forecasts[animation_method], observed, folder / gif)
                paths.append(gif)
        figures[source] = paths
    return figures


def probabilistic_figures(
    folder: Path, probabilistic: ProbabilisticTables, source: str
) -> list[str]:
    """CRPS against lead time, rank histograms, reliability diagrams, ROC curves and spectra.

    Returns
    -------
    list of str
        Paths relative to ``folder``; a figure without rows (no ensemble method) is left out.
    """
    metrics = probabilistic.metrics[probabilistic.metrics["source"] == source]
    curves = probabilistic.curves[probabilistic.curves["source"] == source]
    thresholds = PROBABILITY_THRESHOLDS
    drawn = []
    plots = [
        ("crps_vs_lead_time", "CRPS" in set(metrics["score"]), plot_crps_vs_lead_time, metrics),
    ]
    for name, curve, plot in (
        ("rank_histograms", "RANK_HISTOGRAM", plot_rank_histograms),
        ("reliability", "RELIABILITY", partial(plot_reliability_diagrams, thresholds=thresholds)),
        ("roc", "ROC", partial(plot_roc_curves, thresholds=thresholds)),
        ("power_spectra", "RAPSD_FORECAST", plot_power_spectra),
    ):
        plots.append((name, curve in set(curves["curve"]), plot, curves))
    for name, present, plot, table in plots:
        if present:
            path = f"figures/{name}_{source}.png"
            plot(table, path=folder / path)
            drawn.append(path)
    return drawn


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
