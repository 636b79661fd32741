"""Figures of an evaluation: score curves, map panels in the radar projection, an animation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nowcast import visualization
from nowcast.config import ConfigError
from nowcast.evaluate.setup import EvaluateConfig, ForecastSetup, Window, WindowScores
from nowcast.nowcasts.runner import forecast_window
from nowcast.sources.cube import open_cube


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
            try:
                forecast = forecast_window(
                    open_cube(window.cube_path), window.reference_time, setup
                )
            except KeyError:
                raise ConfigError(
                    f"evaluate.map_times: the cube of '{source}' lacks the frames of a forecast "
                    f"from {pd.Timestamp(window.reference_time)}"
                ) from None
            observed, forecasts = forecast.observed, forecast.forecasts
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
