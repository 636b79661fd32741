"""The in-memory forecast: one nowcast as an ``xarray.DataArray``.

Every forecast method builds its output with :func:`make_forecast`, so evaluation, plotting and
export can rely on one layout (documented in ``docs/architecture.md``, "Forecast"):

- name ``rain_rate``, dims ``(lead_time, y, x)``, float32 mm/h, NaN = no data;
- coordinates ``lead_time`` (timedelta64[ns]), scalar ``forecast_reference_time``
  (datetime64[ns]), ``time`` (valid time, on ``lead_time``), ``y`` and ``x`` (metres, from the
  cube);
- attributes ``crs_wkt``, ``units``, ``standard_name``, ``long_name`` and, when known, ``method``,
  ``radar_source`` and ``institution``.
"""

from __future__ import annotations

import numpy as np
import pyproj
import xarray as xr

FORECAST_NAME = "rain_rate"
FORECAST_DIMS = ("lead_time", "y", "x")
FORECAST_ATTRS = {
    "long_name": "rain rate",
    "standard_name": "lwe_precipitation_rate",
    "units": "mm h-1",
}


def make_forecast(
    values,
    reference_time,
    timestep_minutes: int | float,
    grid_like: xr.Dataset | xr.DataArray,
    method: str | None = None,
) -> xr.DataArray:
    """Wrap forecast values in the forecast contract.

    Parameters
    ----------
    values : array_like, shape (n_lead, ny, nx)
        Rain rate in mm/h; NaN marks no data. Frame ``i`` is valid at
        ``reference_time + (i + 1) * timestep_minutes``.
    reference_time : datetime-like
        Time of the last observation the forecast starts from (the analysis time).
    timestep_minutes : int or float
        Minutes between lead times.
    grid_like : xarray.Dataset or xarray.DataArray
        Supplies ``x``, ``y`` and the CRS: a cube (``crs`` variable with ``crs_wkt``) or another
        forecast (``crs_wkt`` attribute). The cube's ``source`` and ``institution`` attributes
        are carried along for export.
    method : str, optional
        Name of the forecast method (``persistence``, ``extrapolation``, a model name, ...).

    Returns
    -------
    xarray.DataArray
        The forecast.

    Raises
    ------
    ValueError
        If the shape of ``values`` does not match the grid, or no CRS is found.
    """
    values = np.asarray(values, dtype=np.float32)
    ny, nx = grid_like.sizes["y"], grid_like.sizes["x"]
    if values.ndim != 3 or values.shape[1:] != (ny, nx):
        raise ValueError(
            f"forecast values have shape {values.shape}; expected (n_lead, {ny}, {nx})"
        )
    reference = np.datetime64(np.datetime64(reference_time), "ns")
    step = np.timedelta64(int(round(float(timestep_minutes) * 60e9)), "ns")
    lead_time = step * np.arange(1, values.shape[0] + 1)
    attrs = dict(FORECAST_ATTRS)
    attrs["crs_wkt"] = _crs_wkt(grid_like)
    if method:
        attrs["method"] = method
    if isinstance(grid_like, xr.Dataset):
        if "source" in grid_like.attrs:
            attrs["radar_source"] = grid_like.attrs["source"]
        if grid_like.attrs.get("institution"):
            attrs["institution"] = grid_like.attrs["institution"]
    else:
        for key in ("radar_source", "institution"):
            if key in grid_like.attrs:
                attrs[key] = grid_like.attrs[key]
    return xr.DataArray(
        values,
        dims=FORECAST_DIMS,
        coords={
            "lead_time": ("lead_time", lead_time, {"long_name": "forecast lead time"}),
            "forecast_reference_time": (
                (),
                reference,
                {"standard_name": "forecast_reference_time"},
            ),
            "time": ("lead_time", reference + lead_time, {"standard_name": "time"}),
            "y": grid_like["y"].variable.to_base_variable(),
            "x": grid_like["x"].variable.to_base_variable(),
        },
        name=FORECAST_NAME,
        attrs=attrs,
    )


def _crs_wkt(grid_like: xr.Dataset | xr.DataArray) -> str:
    if "crs_wkt" in grid_like.attrs:
        return grid_like.attrs["crs_wkt"]
    if "crs" in grid_like.coords or (isinstance(grid_like, xr.Dataset) and "crs" in grid_like):
        crs_attrs = grid_like["crs"].attrs
        if "crs_wkt" in crs_attrs:
            return crs_attrs["crs_wkt"]
        return pyproj.CRS.from_cf(crs_attrs).to_wkt()
    raise ValueError("grid_like has no CRS: expected a 'crs' variable or a 'crs_wkt' attribute")


def forecast_crs(forecast: xr.DataArray) -> pyproj.CRS:
    """The projection of a forecast's ``x``/``y`` grid."""
    return pyproj.CRS.from_wkt(forecast.attrs["crs_wkt"])


def lead_time_minutes(forecast: xr.DataArray) -> np.ndarray:
    """Lead times in minutes (float) of a forecast."""
    return forecast["lead_time"].values / np.timedelta64(1, "m")
