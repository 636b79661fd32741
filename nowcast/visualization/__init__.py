"""Maps in the radar projection, forecast panels and animations, and score plots (also of
ensembles: CRPS, rank histograms, reliability, ROC, spectra, probability maps)."""

from nowcast.visualization.coastlines import Basemap, basemap
from nowcast.visualization.ensemble_plots import (
    plot_crps_vs_lead_time,
    plot_power_spectra,
    plot_probability_maps,
    plot_rank_histograms,
    plot_reliability_diagrams,
    plot_roc_curves,
)
from nowcast.visualization.maps import (
    animate_forecast,
    cartopy_crs,
    map_axes,
    plot_forecast_panels,
    plot_rain_rate,
    rain_rate_colormap,
)
from nowcast.visualization.plots import (
    method_styles,
    plot_continuous_scores,
    plot_score_vs_lead_time,
)

__all__ = [
    "Basemap",
    "animate_forecast",
    "basemap",
    "cartopy_crs",
    "map_axes",
    "method_styles",
    "plot_continuous_scores",
    "plot_crps_vs_lead_time",
    "plot_forecast_panels",
    "plot_power_spectra",
    "plot_probability_maps",
    "plot_rain_rate",
    "plot_rank_histograms",
    "plot_reliability_diagrams",
    "plot_roc_curves",
    "plot_score_vs_lead_time",
    "rain_rate_colormap",
]
