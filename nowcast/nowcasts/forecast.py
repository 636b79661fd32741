"""The in-memory forecast: one nowcast as an ``xarray.DataArray``.

Every forecast method builds its output with :func:`make_forecast`, so evaluation, plotting and
export can rely on one layout (documented in ``docs/architecture.md``, "Forecast"):

- name ``rain_rate``, dims ``(lead_time, y, x)``, float32 mm/h, NaN = no data;
- coordinates ``lead_time`` (timedelta64[ns]), scalar ``forecast_reference_time``
  (datetime64[ns]), ``time`` (valid time, on ``lead_time``), ``y`` and ``x`` (metres, from the
  cube);
- attributes ``crs_wkt``, ``units``, ``standard_name``, ``long_name`` and, when known, ``method``,
  ``radar_source`` and ``institution``.

An ensemble forecast (:func:`make_ensemble_forecast`) has a leading ``realization`` dimension
(CF ``realization``, integer coordinate ``0 .. m - 1``): dims ``(realization, lead_time, y, x)``.
A deterministic forecast is a one-member ensemble: :func:`members` gives every forecast in the
ensemble layout and :func:`ensemble_mean` every forecast in the deterministic one.
"""

from __future__ import annotations

import numpy as np
import pyproj
import xarray as xr

FORECAST_NAME = "rain_rate"
FORECAST_DIMS = ("lead_time", "y", "x")
#: The member dimension of an ensemble forecast (CF ``realization``).
REALIZATION = "realization"
ENSEMBLE_DIMS = (REALIZATION, *FORECAST_DIMS)
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


def make_ensemble_forecast(
    values,
    reference_time,
    timestep_minutes: int | float,
    grid_like: xr.Dataset | xr.DataArray,
    method: str | None = None,
) -> xr.DataArray:
    """Wrap ensemble values in the forecast contract, with a leading ``realization`` dimension.

    Parameters
    ----------
    values : array_like, shape (n_members, n_lead, ny, nx)
        Rain rate in mm/h of each member; NaN marks no data.
    reference_time, timestep_minutes, grid_like, method
        As for :func:`make_forecast`.

    Returns
    -------
    xarray.DataArray
        The forecast, dims ``(realization, lead_time, y, x)``, ``realization`` = 0 .. m - 1.

    Raises
    ------
    ValueError
        If ``values`` is not 4-dimensional on the grid, or no CRS is found.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 4 or values.shape[0] < 1:
        raise ValueError(
            f"ensemble values have shape {values.shape}; expected (n_members, n_lead, ny, nx)"
        )
    # The coordinates and attributes of one member, shared by all of them.
    first = make_forecast(values[0], reference_time, timestep_minutes, grid_like, method)
    return xr.DataArray(
        values,
        dims=ENSEMBLE_DIMS,
        coords={**first.coords, REALIZATION: _realization(values.shape[0])},
        name=FORECAST_NAME,
        attrs=first.attrs,
    )


def _realization(n_members: int) -> xr.Variable:
    return xr.Variable(
        REALIZATION,
        np.arange(n_members, dtype=np.int32),
        {"standard_name": "realization", "long_name": "ensemble member"},
    )


def is_ensemble(forecast: xr.DataArray) -> bool:
    """Whether a forecast has the ``realization`` dimension (even of one member)."""
    return REALIZATION in forecast.dims


def ensemble_size(forecast: xr.DataArray) -> int:
    """Number of members of a forecast: 1 for a deterministic one."""
    return int(forecast.sizes.get(REALIZATION, 1))


def members(forecast: xr.DataArray) -> xr.DataArray:
    """A forecast in the ensemble layout ``(realization, lead_time, y, x)``.

    A deterministic forecast becomes a one-member ensemble (a view, ``realization`` = [0]); an
    ensemble is returned with its dimensions in the contract's order.

    Parameters
    ----------
    forecast : xarray.DataArray
        Deterministic ``(lead_time, y, x)`` or ensemble ``(realization, lead_time, y, x)``.

    Returns
    -------
    xarray.DataArray
    """
    if not is_ensemble(forecast):
        forecast = forecast.expand_dims(REALIZATION).assign_coords({REALIZATION: _realization(1)})
    return forecast.transpose(*ENSEMBLE_DIMS)


def ensemble_mean(forecast: xr.DataArray) -> xr.DataArray:
    """The mean over members, a deterministic forecast ``(lead_time, y, x)``.

    A pixel is no data (NaN) where any member is: the mean of fewer members would be another
    forecast. A deterministic forecast is returned as it is.

    Parameters
    ----------
    forecast : xarray.DataArray
        Deterministic or ensemble forecast.

    Returns
    -------
    xarray.DataArray
        With the forecast's attributes and ``attrs["ensemble_size"]`` for an ensemble.
    """
    if not is_ensemble(forecast):
        return forecast
    mean = forecast.mean(REALIZATION, skipna=False, keep_attrs=True).astype(np.float32)
    mean.attrs["ensemble_size"] = ensemble_size(forecast)
    return mean.transpose(*FORECAST_DIMS)
