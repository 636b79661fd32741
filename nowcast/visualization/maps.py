"""Rain-rate maps drawn in the radar's own projection (matplotlib + cartopy).

The projection comes from the cube's CRS WKT, so a field is shown on its native grid without
resampling; coastlines, borders and lat/lon gridlines are projected onto it.

Figures are plain :class:`matplotlib.figure.Figure` objects, not pyplot figures: no backend is
needed (files are written with Agg), nothing accumulates in pyplot's global state during a long
evaluation, and a notebook still displays a returned figure.
"""

from __future__ import annotations

from pathlib import Path

import cartopy.crs as ccrs
import numpy as np
import pyproj
import xarray as xr
from matplotlib import animation, colors
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch

from nowcast.nowcasts.forecast import forecast_crs, lead_time_minutes
from nowcast.visualization.coastlines import add_basemap

RAIN_RATE_BOUNDS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)
RAIN_RATE_COLORS = (
    "#b4d7ff",  # 0.1-0.5: drizzle
    "#75baff",
    "#2f8cf0",
    "#1e5fc0",
    "#2fbf4a",
    "#ffe135",
    "#ff9a1f",
    "#f0321e",
    "#a0148c",
)
RAIN_RATE_OVER = "#4b0050"
NO_DATA_COLOR = "#c8c8c8"
UNITS_LABEL = "rain rate (mm h$^{-1}$)"


def rain_rate_colormap() -> tuple[colors.ListedColormap, colors.BoundaryNorm]:
    """Discrete rain-rate colour map and norm.

    Bins are :data:`RAIN_RATE_BOUNDS` (mm/h); values below 0.1 mm/h are transparent, values
    above the last bound take :data:`RAIN_RATE_OVER` and no-data (NaN) is grey.
    """
    cmap = colors.ListedColormap(RAIN_RATE_COLORS, name="rain_rate").with_extremes(
        under="none", over=RAIN_RATE_OVER, bad=NO_DATA_COLOR
    )
    norm = colors.BoundaryNorm(RAIN_RATE_BOUNDS, cmap.N)
    return cmap, norm


def cartopy_crs(
    crs: pyproj.CRS, extent: tuple[float, float, float, float] | None = None
) -> ccrs.Projection:
    """Cartopy projection of a radar CRS.

    Parameters
    ----------
    crs : pyproj.CRS
        Projected CRS of the grid (e.g. :func:`nowcast.sources.cube.cube_crs`).
    extent : tuple of float, optional
        ``(x_min, x_max, y_min, y_max)`` of the grid in metres. A custom CRS carries no area
        of use, so cartopy cannot know where the projection is valid; the map boundary is set
        to this extent plus one domain width on each side, enough for features crossing the edge.

    Returns
    -------
    cartopy.crs.Projection

    Raises
    ------
    ValueError
        If ``extent`` is not given and the CRS has no area of use.
    """
    projection = ccrs.Projection(crs)
    if extent is not None:
        x0, x1, y0, y1 = extent
        width, height = x1 - x0, y1 - y0
        projection.bounds = (x0 - width, x1 + width, y0 - height, y1 + height)
        projection.threshold = min(width, height) / 100.0
    elif projection.bounds is None:
        raise ValueError("the CRS has no area of use: pass the grid extent")
    return projection


def grid_extent(field: xr.DataArray) -> tuple[float, float, float, float]:
    """``(x_min, x_max, y_min, y_max)`` of the cell edges of a regular grid (metres)."""
    x, y = field["x"].values, field["y"].values
    dx = abs(x[1] - x[0]) if x.size > 1 else 1.0
    dy = abs(y[1] - y[0]) if y.size > 1 else 1.0
    return (x.min() - dx / 2, x.max() + dx / 2, y.min() - dy / 2, y.max() + dy / 2)


def _field_crs(field: xr.DataArray, crs: pyproj.CRS | None) -> pyproj.CRS:
    if crs is not None:
        return crs
    if "crs_wkt" in field.attrs:
        return forecast_crs(field)
    raise ValueError("no CRS: pass crs= or give the field a 'crs_wkt' attribute")


def _map_size(extent, longest: float) -> tuple[float, float]:
    """Width and height (inches) of a map whose longer side is ``longest``."""
    aspect = (extent[3] - extent[2]) / (extent[1] - extent[0])
    return (longest, longest * aspect) if aspect <= 1 else (longest / aspect, longest)


def map_axes(fig: Figure, position, crs: pyproj.CRS, extent):
    """A GeoAxes in the radar projection, zoomed to the grid, with coastlines and gridlines."""
    projection = cartopy_crs(crs, extent)
    ax = fig.add_subplot(*position, projection=projection)
    ax.set_extent(extent, crs=projection)
    add_basemap(ax, width_m=extent[1] - extent[0])
    return ax


def _gridlines(ax, left: bool = True, bottom: bool = True, fontsize: float = 8) -> None:
    gl = ax.gridlines(
        draw_labels=True,
        linewidth=0.4,
        color="0.35",
        alpha=0.6,
        linestyle="--",
        x_inline=False,
        y_inline=False,
    )
    gl.n_steps = 30  # points per gridline: plenty for a radar-sized map, and faster to draw
    gl.top_labels = False
    gl.right_labels = False
    gl.left_labels = left
    gl.bottom_labels = bottom
    gl.xlabel_style = {"size": fontsize}
    gl.ylabel_style = {"size": fontsize}


def draw_field(ax, field: xr.DataArray, extent, cmap=None, norm=None) -> AxesImage:
    """Draw a (y, x) field on a map axes, rows the right way up, NaN in the colormap's bad
    colour; rain-rate colours unless ``cmap`` and ``norm`` are given."""
    if cmap is None:
        cmap, norm = rain_rate_colormap()
    values = np.ma.masked_invalid(np.asarray(field.values, dtype=np.float32))
    y = field["y"].values
    origin = "upper" if y.size > 1 and y[0] > y[-1] else "lower"
    return ax.imshow(
        values,
        origin=origin,
        extent=extent,
        transform=ax.projection,
        cmap=cmap,
        norm=norm,
        interpolation="nearest",
        zorder=1,
    )


def _colorbar(fig, mappable, axes, no_data: bool = False, **kwargs):
    cbar = fig.colorbar(
        mappable, ax=axes, ticks=RAIN_RATE_BOUNDS, extend="max", label=UNITS_LABEL, **kwargs
    )
    cbar.ax.set_yticklabels([f"{b:g}" for b in RAIN_RATE_BOUNDS])
    if no_data:
        cbar.ax.legend(
            handles=[Patch(facecolor=NO_DATA_COLOR, edgecolor="0.4", label="no data")],
            loc="upper left",
            bbox_to_anchor=(-0.2, -0.01),
            frameon=False,
            fontsize=9,
            handlelength=1.0,
            handleheight=1.0,
        )
    return cbar


def _has_no_data(*fields) -> bool:
    return any(f is not None and bool(np.isnan(np.asarray(f.values)).any()) for f in fields)


def plot_rain_rate(
    ax=None,
    field: xr.DataArray | None = None,
    crs: pyproj.CRS | None = None,
    title: str = "",
    colorbar: bool = True,
    path: str | Path | None = None,
):
    """Map of one rain-rate field in its radar projection.

    Parameters
    ----------
    ax : cartopy GeoAxes, optional
        Axes to draw on, in the projection :func:`cartopy_crs` of ``crs`` (as made by
        :func:`map_axes`, which also draws coastlines). A new figure is made if None.
    field : xarray.DataArray, dims (y, x)
        Rain rate in mm/h (NaN = no data) with ``x``/``y`` in metres.
    crs : pyproj.CRS, optional
        Grid CRS; default from ``field.attrs['crs_wkt']``.
    title : str
        Axes title.
    colorbar : bool
        Add a colour bar labelled with the units.
    path : str or Path, optional
        Save the figure (PNG, ...) here.

    Returns
    -------
    cartopy GeoAxes
    """
    if field is None:
        raise ValueError("plot_rain_rate needs a field")
    crs = _field_crs(field, crs)
    extent = grid_extent(field)
    if ax is None:
        width, height = _map_size(extent, longest=6.0)
        fig = Figure(figsize=(width + 1.9, height + 0.7), layout="constrained")
        ax = map_axes(fig, (1, 1, 1), crs, extent)
    else:
        fig = ax.figure
        ax.set_extent(extent, crs=ax.projection)
    image = draw_field(ax, field, extent)
    _gridlines(ax)
    if title:
        ax.set_title(title, fontsize=11)
    if colorbar:
        _colorbar(fig, image, ax, no_data=_has_no_data(field), shrink=0.9)
    if path is not None:
        fig.savefig(path, dpi=120)
    return ax


def _select_lead(field: xr.DataArray, minutes: float, reference) -> xr.DataArray | None:
    """The frame of ``field`` at a lead time (forecast-like) or valid time (cube-like)."""
    if "lead_time" in field.dims:
        match = np.isclose(lead_time_minutes(field), minutes)
        return field.isel(lead_time=int(np.argmax(match))) if match.any() else None
    if "time" in field.dims:
        valid = np.datetime64(reference) + np.timedelta64(int(round(minutes * 60)), "s")
        match = field["time"].values == valid
        return field.isel(time=int(np.argmax(match))) if match.any() else None
    raise ValueError(f"expected a 'lead_time' or 'time' dimension, got {field.dims}")


def plot_forecast_panels(
    observed: xr.DataArray | None,
    forecasts: dict[str, xr.DataArray],
    lead_times_minutes=(10, 30, 60),
    path: str | Path | None = None,
):
    """Grid of maps: one row for the observation and one per method, one column per lead time.

    Parameters
    ----------
    observed : xarray.DataArray or None
        Observed rain rate on ``lead_time`` (aligned like a forecast) or on ``time`` (a cube
        slice; frames are picked by valid time).
    forecasts : dict of str to xarray.DataArray
        Forecasts by method name, all from the same reference time and grid.
    lead_times_minutes : sequence of float
        Columns; lead times none of the forecasts has are left out.
    path : str or Path, optional
        Save the figure here.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not forecasts:
        raise ValueError("plot_forecast_panels needs at least one forecast")
    first = next(iter(forecasts.values()))
    reference = first["forecast_reference_time"].values
    available = set(np.round(lead_time_minutes(first), 6))
    leads = [m for m in lead_times_minutes if round(float(m), 6) in available]
    if not leads:
        raise ValueError(
            f"none of the lead times {list(lead_times_minutes)} min is in the forecasts "
            f"({sorted(available)} min)"
        )
    rows = ([("observed", observed)] if observed is not None else []) + list(forecasts.items())
    crs = forecast_crs(first)
    extent = grid_extent(first)
    width, height = _map_size(extent, longest=3.2)
    fig = Figure(
        figsize=(width * len(leads) + 1.9, (height + 0.15) * len(rows) + 0.8),
        layout="constrained",
    )
    image, no_data = None, False
    axes = []
    for row, (name, field) in enumerate(rows):
        for col, minutes in enumerate(leads):
            ax = map_axes(fig, (len(rows), len(leads), row * len(leads) + col + 1), crs, extent)
            axes.append(ax)
            frame = _select_lead(field, minutes, reference)
            if frame is None:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
            else:
                image = draw_field(ax, frame, extent)
                no_data = no_data or _has_no_data(frame)
            _gridlines(ax, left=col == 0, bottom=row == len(rows) - 1, fontsize=7)
            if row == 0:
                valid = np.datetime64(reference) + np.timedelta64(int(minutes * 60), "s")
                ax.set_title(f"+{minutes:g} min (valid {_hhmm(valid)} UTC)", fontsize=10)
            if col == 0:
                ax.text(
                    -0.2,
                    0.5,
                    name,
                    transform=ax.transAxes,
                    rotation=90,
                    ha="center",
                    va="center",
                    fontsize=11,
                    fontweight="bold",
                )
    fig.suptitle(f"Nowcasts from {_iso(reference)} UTC", fontsize=12)
    if image is not None:
        _colorbar(fig, image, axes, no_data=no_data, shrink=0.8, aspect=30)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def animate_forecast(
    forecast: xr.DataArray,
    observed: xr.DataArray | None = None,
    path: str | Path = "forecast.gif",
    fps: float = 2.0,
):
    """GIF of a forecast, one frame per lead time, with the observation alongside if given.

    Parameters
    ----------
    forecast : xarray.DataArray
        The forecast (dims lead_time, y, x).
    observed : xarray.DataArray, optional
        Observation on ``lead_time`` or ``time`` (see :func:`plot_forecast_panels`).
    path : str or Path
        Output GIF.
    fps : float
        Frames per second.

    Returns
    -------
    str
        ``path``.
    """
    crs = forecast_crs(forecast)
    extent = grid_extent(forecast)
    reference = forecast["forecast_reference_time"].values
    leads = lead_time_minutes(forecast)
    method = forecast.attrs.get("method", "forecast")
    panels = [(method, forecast)] + ([("observed", observed)] if observed is not None else [])
    width, height = _map_size(extent, longest=4.2)
    fig = Figure(figsize=(width * len(panels) + 1.9, height + 1.1), layout="constrained")
    blank = np.full((forecast.sizes["y"], forecast.sizes["x"]), np.nan, dtype=np.float32)
    images, axes = [], []
    for i in range(len(panels)):
        ax = map_axes(fig, (1, len(panels), i + 1), crs, extent)
        _gridlines(ax, left=i == 0, fontsize=7)
        image = draw_field(ax, forecast.isel(lead_time=0), extent)
        images.append(image)
        axes.append(ax)
    _colorbar(fig, images[0], axes, no_data=_has_no_data(forecast), shrink=0.85)

    def update(index: int):
        minutes = leads[index]
        valid = np.datetime64(reference) + np.timedelta64(int(round(minutes * 60)), "s")
        for (name, field), image, ax in zip(panels, images, axes, strict=True):
            frame = _select_lead(field, minutes, reference)
            values = blank if frame is None else np.asarray(frame.values, dtype=np.float32)
            image.set_data(np.ma.masked_invalid(values))
            ax.set_title(f"{name}  +{minutes:g} min  ({_hhmm(valid)} UTC)", fontsize=10)

    # Lay the figure out once: constrained layout and cartopy's gridline labels are the costly
    # part of a draw, and only the images and titles change between frames.
    update(0)
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    writer = animation.PillowWriter(fps=fps)
    with writer.saving(fig, str(path), dpi=fig.dpi):
        for index in range(len(leads)):
            update(index)
            writer.grab_frame()
    return str(path)


def _hhmm(time) -> str:
    return np.datetime_as_string(np.datetime64(time, "m"))[-5:]


def _iso(time) -> str:
    return np.datetime_as_string(np.datetime64(time, "m")).replace("T", " ")
