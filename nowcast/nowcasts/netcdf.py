"""The forecast NetCDF: one forecast as a file that CF tools and pysteps both read.

A file holds one forecast (one reference time): ``precip_intensity`` (float32 mm/h), dims
``(lead_time, y, x)``, or ``(realization, lead_time, y, x)`` for an ensemble, which adds its
exceedance probabilities at 1, 5 and 10 mm/h as a further variable (``exceedance_probability``,
dims ``(threshold, lead_time, y, x)``). The layout is in ``docs/architecture.md`` ("Forecast
NetCDF"). It is CF-1.8 (cfchecker: no errors, no warnings) and it is what pysteps 1.21.5's
``pysteps.io.nowcast_importers.import_netcdf_pysteps`` reads:

- the variable is named ``precip_intensity``, one of the names that reader knows;
- ``time`` (the valid time) is in seconds since the forecast reference time: the reader divides
  it by 60 for the lead times in minutes and decodes it for the valid timestamps;
- rows run north to south (the reader sets ``yorigin = "upper"`` whatever the file holds), so a
  south-up forecast is flipped on write, ``y`` with it;
- the grid mapping of a polar-stereographic grid is named ``polar_stereographic``, the only
  projection the reader parses, with ``latitude_of_projection_origin`` that the reader needs
  (and CF asks for) and pyproj leaves out. Other grid mappings keep the name ``crs``.

Files are written to a temporary sibling and renamed when complete
(:func:`nowcast.storage.atomic_write_file`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import dask
import numpy as np
import pyproj
import xarray as xr

from nowcast import __version__
from nowcast.nowcasts.forecast import (
    FORECAST_ATTRS,
    REALIZATION,
    ensemble_size,
    forecast_crs,
    is_ensemble,
    members,
)
from nowcast.nowcasts.probability import (
    PROBABILITY_NAME,
    THRESHOLD,
    THRESHOLDS,
    exceedance_probability,
)
from nowcast.sources.cube import crs_variable, latlon_grid
from nowcast.storage import atomic_write_file

#: The forecast's variable: the name pysteps' NetCDF reader takes for a rain rate in mm/h.
VARIABLE = "precip_intensity"
#: The grid-mapping variable of a polar-stereographic grid (the one pysteps' reader parses).
POLAR_STEREOGRAPHIC = "polar_stereographic"
#: The grid-mapping variable of any other grid.
GRID_MAPPING = "crs"
#: Stored type of ``precip_intensity`` (and of the 2-D lat/lon, as :func:`latlon_grid` makes
#: them).
STORED_DTYPE = np.dtype("float32")
FILL_VALUE = np.float32(-9999.0)
COMPLEVEL = 4
#: Allowance per file for what the array sizes leave out: HDF5 headers and the attributes (the
#: experiment config among them).
FILE_OVERHEAD_BYTES = 64 * 1024


def grid_mapping(crs: pyproj.CRS) -> tuple[str, xr.DataArray]:
    """The CF grid-mapping variable of a CRS and its name in the file.

    Parameters
    ----------
    crs : pyproj.CRS
        The forecast's CRS.

    Returns
    -------
    name : str
        ``polar_stereographic`` for a polar-stereographic CRS, else ``crs``.
    variable : xarray.DataArray
        ``pyproj.CRS.to_cf()`` attributes plus ``crs_wkt``; a polar-stereographic one also has
        ``latitude_of_projection_origin`` (+90 or -90, the pole on the standard parallel's side).
    """
    variable = crs_variable(crs)
    attrs = variable.attrs
    if attrs.get("grid_mapping_name") != POLAR_STEREOGRAPHIC:
        return GRID_MAPPING, variable
    if "latitude_of_projection_origin" not in attrs:
        # pyproj writes none for variant B (standard_parallel); pysteps' reader needs one.
        attrs["latitude_of_projection_origin"] = float(
            np.copysign(90.0, attrs["standard_parallel"])
        )
    return POLAR_STEREOGRAPHIC, variable


def forecast_to_dataset(
    forecast: xr.DataArray,
    provenance: dict | None = None,
    latlon: bool = True,
    probabilities: xr.DataArray | None = None,
) -> xr.Dataset:
    """CF-1.8 Dataset of one forecast, rows north to south.

    Parameters
    ----------
    forecast : xarray.DataArray
        A forecast as built by :func:`nowcast.nowcasts.forecast.make_forecast` (or
        ``make_ensemble_forecast``).
    provenance : dict, optional
        See :func:`provenance_attrs`.
    latlon : bool
        Add 2-D ``lat``/``lon`` auxiliary coordinates.
    probabilities : xarray.DataArray, optional
        An ensemble's exceedance probabilities, by default ``exceedance_probability(forecast)``.

    Returns
    -------
    xarray.Dataset
        Variables ``precip_intensity`` (lead_time, y, x) and the grid mapping (see
        :func:`grid_mapping`); coordinates ``lead_time`` (standard_name ``forecast_period``),
        ``forecast_reference_time`` (scalar), ``time`` (valid time, on ``lead_time``), ``y``
        (descending), ``x`` and optionally ``lat``, ``lon``. An ensemble has
        ``precip_intensity`` (realization, lead_time, y, x) and ``exceedance_probability``
        (threshold, lead_time, y, x).
    """
    ensemble = is_ensemble(forecast)
    if ensemble:
        forecast = members(forecast)
        if probabilities is None:
            probabilities = exceedance_probability(forecast, THRESHOLDS)
    y = forecast["y"].values
    if y.size > 1 and y[0] < y[-1]:  # south-up: pysteps reads the first row as the north edge
        north_up = {"y": slice(None, None, -1)}
        forecast = forecast.isel(north_up)
        probabilities = None if probabilities is None else probabilities.isel(north_up)
    crs = forecast_crs(forecast)
    dims = ("lead_time", "y", "x")
    coords = _coords(forecast, crs, latlon)
    mapping, variable = grid_mapping(crs)
    variables = {mapping: variable}
    grid = {"grid_mapping": mapping}
    if ensemble:
        coords[REALIZATION] = forecast[REALIZATION].variable.to_base_variable()
        coords[REALIZATION].attrs["units"] = "1"  # the CF standard name's canonical units
        coords[THRESHOLD] = probabilities[THRESHOLD].variable.to_base_variable()
        # long_name and units "1": CF has no standard name for a probability.
        attrs_p = {key: probabilities.attrs[key] for key in ("long_name", "units")}
        values = np.asarray(probabilities.transpose(THRESHOLD, *dims).values, dtype=np.float32)
        variables[PROBABILITY_NAME] = ((THRESHOLD, *dims), values, {**attrs_p, **grid})
        dims = (REALIZATION, *dims)
    values = _frames(forecast.transpose(*dims).values, lazy=ensemble)
    variables[VARIABLE] = (dims, values, {**FORECAST_ATTRS, **grid})
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs = provenance_attrs(forecast, provenance)
    return ds


def _coords(forecast: xr.DataArray, crs: pyproj.CRS, latlon: bool) -> dict:
    """Lead time, reference and valid times, projected and (``latlon``) geographic axes."""
    lead_time = forecast["lead_time"].values.astype("timedelta64[ns]")
    reference = np.datetime64(forecast["forecast_reference_time"].values, "ns")
    coords = {
        "lead_time": (
            "lead_time",
            lead_time,
            {"standard_name": "forecast_period", "long_name": "forecast lead time"},
        ),
        "forecast_reference_time": (
            (),
            reference,
            {
                "standard_name": "forecast_reference_time",
                "long_name": "time of the last observation the forecast starts from",
            },
        ),
        "time": (
            "lead_time",
            reference + lead_time,
            {"standard_name": "time", "long_name": "valid time"},
        ),
    }
    for axis in ("y", "x"):  # projected metres
        name = f"projection_{axis}_coordinate"
        attrs = {"standard_name": name, "long_name": f"{axis} coordinate of projection"}
        coords[axis] = (axis, forecast[axis].values, {**attrs, "units": "m", "axis": axis.upper()})
    if latlon:
        lat, lon = latlon_grid(crs, forecast["x"].values, forecast["y"].values)
        coords["lat"] = (("y", "x"), lat, {"standard_name": "latitude", "units": "degrees_north"})
        coords["lon"] = (("y", "x"), lon, {"standard_name": "longitude", "units": "degrees_east"})
    return coords


def _frames(values: np.ndarray, lazy: bool):
    """Float32 values; ``lazy``: one frame per Dask chunk, read from the array itself, so NetCDF
    encoding (NaN to the fill value) copies a frame at a time, not the ensemble
    (``dask.array.from_array`` would copy an ndarray)."""
    array = np.asarray(values, dtype=np.float32)
    if not lazy:
        return array
    import dask.array  # only here: a deterministic predict starts up without it

    chunks = (1,) * (array.ndim - 2) + array.shape[-2:]
    meta = np.empty((0,) * array.ndim, dtype=np.float32)
    return dask.array.from_array(_Frames(array), chunks=chunks, name=False, meta=meta)


class _Frames:
    """An ndarray seen through indexing only: ``from_array`` copies what has ``copy``."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        return self.array[key]


def provenance_attrs(forecast: xr.DataArray, provenance: dict | None = None) -> dict:
    """Global attributes: CF/ACDD description and provenance.

    Parameters
    ----------
    forecast : xarray.DataArray
        Supplies defaults: ``method``, ``radar_source``, ``institution`` attributes.
    provenance : dict, optional
        Recognised keys (all optional): ``title``, ``institution``, ``method``, ``source``
        (radar source name), ``checkpoint_sha256`` (model checkpoint digest), ``config``
        (experiment config: a mapping, written as JSON, or a string). Any other key is written
        as an attribute too (non-strings as JSON).

    Returns
    -------
    dict
        ``Conventions``, ``title``, ``institution``, ``source``, ``history``, ``date_created``,
        ``nowcast_version``, ``nowcast_method``, ``radar_source`` and, when given,
        ``model_checkpoint_sha256`` and ``config``.
    """
    provenance = dict(provenance or {})
    method = provenance.pop("method", forecast.attrs.get("method", "unknown"))
    radar = provenance.pop("source", forecast.attrs.get("radar_source", "unknown"))
    institution = provenance.pop("institution", forecast.attrs.get("institution", ""))
    title = provenance.pop("title", f"Precipitation nowcast ({method}) for radar '{radar}'")
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    attrs = {
        "Conventions": "CF-1.8",
        "title": title,
        "institution": institution or "unknown",
        "source": f"nowcast {__version__}, method '{method}', from radar source '{radar}'",
        "history": f"{created} nowcast export",
        "date_created": created,
        "nowcast_version": __version__,
        "nowcast_method": method,
        "radar_source": radar,
    }
    checkpoint = provenance.pop("checkpoint_sha256", None)
    if checkpoint:
        attrs["model_checkpoint_sha256"] = checkpoint
    config = provenance.pop("config", None)
    if config is not None:
        attrs["config"] = config if isinstance(config, str) else json.dumps(config, default=str)
    for key, value in provenance.items():
        attrs[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return attrs


def _seconds_since(reference: np.datetime64, times: np.ndarray) -> tuple[str, str]:
    """CF units ``seconds since <reference>`` and the dtype that stores ``times`` exactly
    (int64 for whole seconds, else float64)."""
    stamp = np.datetime64(reference, "s")
    offsets = (times - stamp).astype("timedelta64[ns]").astype(np.int64)
    text = np.datetime_as_string(stamp, unit="s").replace("T", " ")
    return f"seconds since {text}", "int64" if not np.any(offsets % 10**9) else "float64"


def encoding(ds: xr.Dataset) -> dict:
    """NetCDF encoding: zlib level 4, one chunk per frame, times in seconds since the reference
    time (as pysteps reads them), exact."""
    reference = ds["forecast_reference_time"].values
    times = np.append(ds["time"].values, reference)
    time_units, time_dtype = _seconds_since(reference, times)
    lead_ns = ds["lead_time"].values.astype("timedelta64[ns]").astype(np.int64)
    lead_unit = "minutes" if not np.any(lead_ns % (60 * 10**9)) else "seconds"
    fixed = {"_FillValue": None}  # coordinates: no fill value
    enc = {name: dict(fixed) for name in ("x", "y", REALIZATION, THRESHOLD) if name in ds}
    enc["lead_time"] = {"units": lead_unit, "dtype": "int64", **fixed}
    for name in ("time", "forecast_reference_time"):
        enc[name] = {"units": time_units, "dtype": time_dtype, **fixed}
    for name in (VARIABLE, PROBABILITY_NAME):
        if name in ds:
            enc[name] = {
                "dtype": STORED_DTYPE.name,
                "zlib": True,
                "complevel": COMPLEVEL,
                "chunksizes": tuple(ds.sizes[d] if d in ("y", "x") else 1 for d in ds[name].dims),
                "_FillValue": FILL_VALUE,
            }
    for name in ("lat", "lon"):
        if name in ds:
            enc[name] = {"zlib": True, "complevel": COMPLEVEL, **fixed}
    return enc


def write_forecast_netcdf(
    forecast: xr.DataArray,
    path: str | Path,
    provenance: dict | None = None,
    latlon: bool = True,
    atomic: bool = True,
    probabilities: xr.DataArray | None = None,
) -> str:
    """Write one forecast as CF-1.8 NetCDF4 that pysteps' ``import_netcdf_pysteps`` reads.

    Parameters
    ----------
    forecast : xarray.DataArray
        One forecast, deterministic or ensemble (see :func:`forecast_to_dataset`).
    path : str or Path
        Final file path; written atomically (temporary sibling, then rename) unless ``atomic``
        is False.
    provenance : dict, optional
        See :func:`provenance_attrs`.
    latlon : bool
        Add 2-D ``lat``/``lon`` auxiliary coordinates.
    atomic : bool
        False writes at ``path`` directly: for a file inside a folder that is itself written
        atomically (:func:`nowcast.export.export`), where a disk error is then reported for that
        folder.
    probabilities : xarray.DataArray, optional
        An ensemble's exceedance probabilities, by default ``exceedance_probability(forecast)``.

    Returns
    -------
    str
        ``path``.
    """
    ds = forecast_to_dataset(forecast, provenance, latlon, probabilities)
    enc = encoding(ds)

    def write(tmp: str) -> None:
        # An ensemble's members are a Dask array (see _frames): written here, in this thread.
        with dask.config.set(scheduler="synchronous"):
            ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=enc)

    if atomic:
        atomic_write_file(path, write)
    else:
        write(str(path))
    return str(path)


def netcdf_bytes(forecast: xr.DataArray, latlon: bool = True) -> int:
    """Uncompressed size of the NetCDF file of ``forecast``.

    The ``precip_intensity`` values (every member of an ensemble) and an ensemble's exceedance
    probabilities at their stored dtype (:data:`STORED_DTYPE`), the coordinates (``y``, ``x``,
    lead and valid times, members and thresholds, the 2-D ``lat``/``lon`` when ``latlon``) and
    :data:`FILE_OVERHEAD_BYTES`. zlib makes the file smaller (much smaller where it is dry), so
    this is an upper bound for the free-space checks before a write.
    """
    n_lead, ny, nx = (forecast.sizes[d] for d in ("lead_time", "y", "x"))
    ensemble = is_ensemble(forecast)
    n_members, n_thresholds = ensemble_size(forecast), len(THRESHOLDS) * ensemble
    values = (n_members + n_thresholds) * n_lead * ny * nx * STORED_DTYPE.itemsize
    coords = 8 * (ny + nx + n_lead + (n_lead + 1) + n_thresholds)
    coords += 4 * n_members * ensemble  # int32 realization
    if latlon:
        coords += 2 * ny * nx * STORED_DTYPE.itemsize
    return values + coords + FILE_OVERHEAD_BYTES
