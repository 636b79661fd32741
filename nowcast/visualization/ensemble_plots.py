"""Figures of probabilistic verification: CRPS, rank histograms, reliability, ROC, spectra, maps.

The score plots read the tidy tables of an evaluation: ``ensemble_metrics.csv`` (the columns of
``metrics.csv``: ``method``, ``lead_time``, ``threshold``, ``scale``, ``score``, ``value``,
``ci_low``, ``ci_high``) and ``ensemble_curves.csv`` (``method``, ``lead_time``,
``threshold``, ``curve``, ``point``, ``x``, ``y``, ``n``; see
:func:`nowcast.verification.curves_to_frame`). The probability maps draw an ensemble forecast
(realization, lead_time, y, x) in the radar projection beside the observation.

Every function returns a :class:`matplotlib.figure.Figure` and saves it when given a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib import colormaps, colors, ticker
from matplotlib.figure import Figure

from nowcast.nowcasts.forecast import forecast_crs, members
from nowcast.nowcasts.probability import exceedance_probability
from nowcast.visualization.maps import (
    NO_DATA_COLOR,
    _colorbar,
    _gridlines,
    _has_no_data,
    _iso,
    _map_size,
    _select_lead,
    draw_field,
    grid_extent,
    map_axes,
)
from nowcast.visualization.plots import _draw_lines, _method_order, _save, method_styles

#: Lead times (minutes) of the rank histograms, reliability diagrams, ROC curves and spectra.
CURVE_LEAD_TIMES = (10, 30, 60)
#: Probability bins of the maps.
PROBABILITY_BOUNDS = (0.05, 0.2, 0.4, 0.6, 0.8, 1.0 + 1e-9)


def curve_lead_times(table: pd.DataFrame, wanted: Sequence[float] = CURVE_LEAD_TIMES) -> list:
    """The ``wanted`` lead times the table has; else its first, middle and last."""
    available = sorted(table["lead_time"].unique())
    if not available:
        return []
    chosen = [t for t in available if any(np.isclose(t, w) for w in wanted)]
    if chosen:
        return chosen
    return sorted({available[0], available[len(available) // 2], available[-1]})


def _curves(table: pd.DataFrame, curve: str) -> pd.DataFrame:
    chosen = table[table["curve"] == curve]
    if chosen.empty:
        known = ", ".join(sorted(table["curve"].unique()))
        raise ValueError(f"no '{curve}' rows in the curve table; curves: {known or 'none'}")
    return chosen


def _legend(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=9, title="method")


def plot_crps_vs_lead_time(metrics: pd.DataFrame, path: str | Path | None = None) -> Figure:
    """CRPS, pooled CRPS and the spread/skill ratio against lead time, with bootstrap bands.

    Parameters
    ----------
    metrics : pandas.DataFrame
        ``ensemble_metrics.csv`` of one source. A deterministic method's CRPS is its MAE.
    path : str or Path, optional
        Save the figure here.

    Returns
    -------
    matplotlib.figure.Figure
        Panels: CRPS, CRPS of k x k block means for each k > 1, and the spread/skill ratio
        when an ensemble was scored.
    """
    crps = metrics[metrics["score"] == "CRPS"]
    if crps.empty:
        raise ValueError("no CRPS rows in the metrics table")
    pooled = metrics[(metrics["score"] == "CRPS_POOLED") & (metrics["scale"] > 1)]
    panels = [("CRPS (mm/h)", crps)]
    panels += [
        (f"CRPS of {k:g} × {k:g} block means (mm/h)", pooled[pooled["scale"] == k])
        for k in sorted(pooled["scale"].unique())
    ]
    spread = metrics[metrics["score"] == "SPREAD_SKILL"]
    if not spread.empty:
        panels.append(("spread/skill ratio", spread))
    styles = method_styles(metrics["method"].unique())
    fig = Figure(figsize=(4.2 * len(panels) + 1.6, 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, rows) in zip(axes.flat, panels, strict=True):
        _draw_lines(ax, rows, styles)
        ax.set_title(title, fontsize=11)
        if title.startswith("spread"):
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    _legend(fig, axes.flat[0])
    fig.suptitle(
        "Probabilistic scores against lead time (deterministic methods: MAE; shaded: bootstrap "
        "interval)",
        fontsize=11,
    )
    return _save(fig, path)


def plot_rank_histograms(
    curves: pd.DataFrame,
    lead_times: Sequence[float] = CURVE_LEAD_TIMES,
    path: str | Path | None = None,
) -> Figure:
    """Rank histograms, one panel per lead time, bars per ensemble method.

    A flat histogram (dotted line) is a calibrated ensemble; a U shape is under-dispersive.
    """
    table = _curves(curves, "RANK_HISTOGRAM")
    leads = curve_lead_times(table, lead_times)
    methods = _method_order(table["method"].unique())
    styles = method_styles(methods)
    fig = Figure(figsize=(4.0 * len(leads) + 1.6, 3.4), layout="constrained")
    axes = fig.subplots(1, len(leads), squeeze=False, sharey=True)
    width = 0.8 / len(methods)
    for ax, lead_time in zip(axes.flat, leads, strict=True):
        for i, method in enumerate(methods):
            rows = table[(table["method"] == method) & np.isclose(table["lead_time"], lead_time)]
            rows = rows.sort_values("point")
            ranks = rows["x"].to_numpy(dtype=float)
            ax.bar(
                ranks - 0.4 + width * (i + 0.5),
                rows["y"],
                width=width,
                color=styles[method]["color"],
                label=method,
            )
            ax.axhline(1.0 / len(ranks), color=styles[method]["color"], linestyle=":")
        ax.set_title(f"+{lead_time:g} min", fontsize=11)
        ax.set_xlabel("rank of the observation")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("relative frequency")
    _legend(fig, axes.flat[0])
    fig.suptitle("Rank histograms (dotted: flat)", fontsize=11)
    return _save(fig, path)


def _curve_grid(
    table: pd.DataFrame,
    thresholds: Sequence[float],
    lead_times: Sequence[float],
    labels: tuple[str, str],
    title: str,
) -> tuple[Figure, list]:
    """Rows of lead times, columns of thresholds; one line per method; a dashed diagonal."""
    leads = curve_lead_times(table, lead_times)
    chosen = [t for t in thresholds if np.isclose(table["threshold"], t).any()]
    if not chosen:
        raise ValueError(f"none of the thresholds {list(thresholds)} mm/h is in the curve table")
    styles = method_styles(table["method"].unique())
    fig = Figure(figsize=(3.3 * len(chosen) + 1.6, 3.1 * len(leads) + 0.4), layout="constrained")
    axes = fig.subplots(len(leads), len(chosen), squeeze=False, sharex=True, sharey=True)
    for row, lead_time in enumerate(leads):
        for col, threshold in enumerate(chosen):
            ax = axes[row, col]
            at = table[np.isclose(table["lead_time"], lead_time)]
            at = at[np.isclose(at["threshold"], threshold)]
            for method in _method_order(at["method"].unique()):
                rows = at[at["method"] == method].sort_values("x")
                rows = rows[np.isfinite(rows["x"]) & np.isfinite(rows["y"])]
                style = styles[method]
                ax.plot(rows["x"], rows["y"], marker="o", markersize=3, label=method, **style)
            ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"≥ {threshold:g} mm/h, +{lead_time:g} min", fontsize=10)
            if row == len(leads) - 1:
                ax.set_xlabel(labels[0])
            if col == 0:
                ax.set_ylabel(labels[1])
    _legend(fig, axes.flat[0])
    fig.suptitle(title, fontsize=11)
    return fig, leads


def plot_reliability_diagrams(
    curves: pd.DataFrame,
    thresholds: Sequence[float] = (1.0, 5.0, 10.0),
    lead_times: Sequence[float] = CURVE_LEAD_TIMES,
    path: str | Path | None = None,
) -> Figure:
    """Reliability diagrams: observed frequency against forecast probability, per threshold."""
    fig, _ = _curve_grid(
        _curves(curves, "RELIABILITY"),
        thresholds,
        lead_times,
        ("forecast probability", "observed frequency"),
        "Reliability diagrams (dashed: perfect reliability)",
    )
    return _save(fig, path)


def plot_roc_curves(
    curves: pd.DataFrame,
    thresholds: Sequence[float] = (1.0, 5.0, 10.0),
    lead_times: Sequence[float] = CURVE_LEAD_TIMES,
    path: str | Path | None = None,
) -> Figure:
    """ROC curves: probability of detection against probability of false detection."""
    fig, _ = _curve_grid(
        _curves(curves, "ROC"),
        thresholds,
        lead_times,
        ("POFD", "POD"),
        "ROC curves (dashed: no skill)",
    )
    return _save(fig, path)


def plot_power_spectra(
    curves: pd.DataFrame,
    lead_times: Sequence[float] = CURVE_LEAD_TIMES,
    unit: str = "km",
    path: str | Path | None = None,
) -> Figure:
    """Mean member power spectra (RAPSD) of each ensemble against the observation's.

    A forecast below the observation at short wavelengths is blurred.
    """
    forecast = _curves(curves, "RAPSD_FORECAST")
    observed = _curves(curves, "RAPSD_OBSERVED")
    leads = curve_lead_times(forecast, lead_times)
    styles = method_styles(list(forecast["method"].unique()) + ["observed"])
    fig = Figure(figsize=(4.0 * len(leads) + 1.6, 3.6), layout="constrained")
    axes = fig.subplots(1, len(leads), squeeze=False, sharey=True)

    def line(ax, rows: pd.DataFrame, label: str) -> None:
        rows = rows[np.isfinite(rows["x"]) & (rows["x"] > 0) & (rows["y"] > 0)]
        rows = rows.sort_values("x")
        ax.plot(rows["x"], rows["y"], label=label, **styles[label])

    for ax, lead_time in zip(axes.flat, leads, strict=True):
        at = forecast[np.isclose(forecast["lead_time"], lead_time)]
        for method in _method_order(at["method"].unique()):
            line(ax, at[at["method"] == method], method)
        truth = observed[np.isclose(observed["lead_time"], lead_time)]
        # The observation's spectrum is the same for every method (one mask per window).
        line(ax, truth[truth["method"] == truth["method"].iloc[0]], "observed")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.invert_xaxis()
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"+{lead_time:g} min", fontsize=11)
        ax.set_xlabel(f"wavelength ({unit})")
    axes[0, 0].set_ylabel("power")
    _legend(fig, axes.flat[0])
    fig.suptitle("Radially averaged power spectra: mean over members vs observed", fontsize=11)
    return _save(fig, path)


def probability_colormap() -> tuple[colors.ListedColormap, colors.BoundaryNorm]:
    """Discrete probability colours; below 5 % transparent, no data grey."""
    base = colormaps["YlOrRd"].resampled(len(PROBABILITY_BOUNDS) - 1)
    cmap = colors.ListedColormap(base(np.arange(base.N)), name="probability").with_extremes(
        under="none", bad=NO_DATA_COLOR
    )
    return cmap, colors.BoundaryNorm(PROBABILITY_BOUNDS, cmap.N)


def plot_probability_panels(
    probability: xr.DataArray, lead_times: Sequence[int], threshold: float
) -> Figure:
    """One row of maps of P(rain rate >= ``threshold``) at ``lead_times`` (minutes).

    Parameters
    ----------
    probability : xarray.DataArray
        Exceedance probabilities (lead_time, y, x) of one threshold, with the forecast's
        coordinates and CRS (:func:`nowcast.nowcasts.probability.exceedance_probability`).
    lead_times : sequence of int
        Lead times shown, one panel each.
    threshold : float
        The threshold (mm/h), for the title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    extent, crs = grid_extent(probability), forecast_crs(probability)
    aspect = (extent[3] - extent[2]) / (extent[1] - extent[0])
    n = len(lead_times)
    figure = Figure(figsize=(3.2 * n + 1.6, 3.2 * aspect + 1.0), layout="constrained")
    axes, image = [], None
    for column, minutes in enumerate(lead_times):
        ax = map_axes(figure, (1, n, column + 1), crs, extent)
        frame = _select_lead(probability, minutes, None)
        image = draw_field(ax, frame, extent, *probability_colormap())
        ax.set_title(f"+{minutes} min", fontsize=10)
        axes.append(ax)
    reference = pd.Timestamp(probability["forecast_reference_time"].values)
    size = probability.attrs.get("ensemble_size", "")
    figure.suptitle(
        f"P(rain rate >= {threshold:g} mm/h), {size} members, from {reference:%Y-%m-%d %H:%M} UTC",
        fontsize=11,
    )
    figure.colorbar(image, ax=axes, label="probability", shrink=0.8)
    return figure


def plot_probability_maps(
    observed: xr.DataArray,
    forecast: xr.DataArray,
    lead_times_minutes: Sequence[float] = (30,),
    thresholds: Sequence[float] = (1.0, 10.0),
    shown_members: Sequence[int] = (0, 1),
    path: str | Path | None = None,
) -> Figure:
    """Maps of exceedance probabilities beside two members and the observation.

    Parameters
    ----------
    observed : xarray.DataArray
        Observed rain rate on ``lead_time`` (as a forecast) or ``time``.
    forecast : xarray.DataArray
        Ensemble (realization, lead_time, y, x) in mm/h.
    lead_times_minutes : sequence of float
        Rows; lead times the forecast lacks are left out.
    thresholds : sequence of float
        Thresholds (mm/h) of the probability columns (events ``>=``).
    shown_members : sequence of int
        Members drawn (those the ensemble has).
    path : str or Path, optional
        Save the figure here.

    Returns
    -------
    matplotlib.figure.Figure
    """
    ensemble = members(forecast)
    probability = exceedance_probability(ensemble, thresholds)
    reference = ensemble["forecast_reference_time"].values
    leads = [m for m in lead_times_minutes if _select_lead(ensemble, m, reference) is not None]
    if not leads:
        raise ValueError(f"none of the lead times {list(lead_times_minutes)} min is forecast")
    shown = [m for m in shown_members if m < ensemble.sizes["realization"]]
    columns = [("observed", observed, False)]
    columns += [(f"member {m}", ensemble.isel(realization=m), False) for m in shown]
    columns += [
        (f"P(≥ {t:g} mm/h)", probability.isel(threshold=i), True) for i, t in enumerate(thresholds)
    ]
    crs = forecast_crs(ensemble)
    extent = grid_extent(ensemble)
    width, height = _map_size(extent, longest=3.0)
    fig = Figure(
        figsize=(width * len(columns) + 3.2, (height + 0.2) * len(leads) + 0.8),
        layout="constrained",
    )
    rain_axes, probability_axes, rain_image, probability_image = [], [], None, None
    for row, minutes in enumerate(leads):
        for col, (name, field, is_probability) in enumerate(columns):
            position = (len(leads), len(columns), row * len(columns) + col + 1)
            ax = map_axes(fig, position, crs, extent)
            frame = _select_lead(field, minutes, reference)
            if frame is None:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
            elif is_probability:
                probability_image = draw_field(ax, frame, extent, *probability_colormap())
                probability_axes.append(ax)
            else:
                rain_image = draw_field(ax, frame, extent)
                rain_axes.append(ax)
            _gridlines(ax, left=col == 0, bottom=row == len(leads) - 1, fontsize=7)
            ax.set_title(f"{name}, +{minutes:g} min", fontsize=9)
    if rain_image is not None:
        _colorbar(fig, rain_image, rain_axes, no_data=_has_no_data(ensemble), shrink=0.8)
    if probability_image is not None:
        bar = fig.colorbar(probability_image, ax=probability_axes, shrink=0.8, label="probability")
        bar.set_ticks(PROBABILITY_BOUNDS[:-1] + (1.0,))
    method = ensemble.attrs.get("method", "ensemble")
    fig.suptitle(f"{method} from {_iso(reference)} UTC: members and probabilities", fontsize=11)
    return _save(fig, path)
