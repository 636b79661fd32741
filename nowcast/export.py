"""CF-1.8 NetCDF export of forecasts (the ``export`` stage).

One forecast becomes a file with dims ``(lead_time, y, x)``; several forecasts of one method can
share a file with an extra ``forecast_reference_time`` dimension. The layout is documented in
``docs/architecture.md`` ("Forecast NetCDF"); every file passes the CF checker (cfchecker,
CF-1.8) with no errors and no warnings.

Files are written to a temporary sibling and renamed when complete
(:func:`nowcast.storage.atomic_write_file`), so a killed export never leaves a truncated file at
the final path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr
from pydantic import Field

from nowcast import __version__
from nowcast.config import ConfigError, ExperimentConfig, StrictModel, load_experiment, stage_config
from nowcast.nowcasts.forecast import FORECAST_ATTRS, forecast_crs
from nowcast.nowcasts.runner import ForecastRun, forecast_windows
from nowcast.nowcasts.variants import base_methods, check_method_names, parse_variants
from nowcast.patches.reader import PatchStore
from nowcast.sources.cube import crs_variable, cube_path, latlon_grid
from nowcast.storage import atomic_write_file, file_sha256
from nowcast.windows import on_time_grid

VARIABLE = "rain_rate"
FILL_VALUE = np.float32(-9999.0)
COMPLEVEL = 4


class ExportConfig(StrictModel):
    """The ``export:`` section of an experiment config."""

    out_dir: str = Field("", description="where NetCDF files go; default <run_dir>/netcdf")
    multi_file: bool = Field(
        False,
        description="one file per method holding every forecast (extra forecast_reference_time "
        "dimension) instead of one file per forecast",
    )
    latlon: bool = Field(True, description="add 2-D lat/lon auxiliary coordinates")
    methods: list[str] = Field(
        default_factory=lambda: ["model"], description="nowcast methods whose forecasts to write"
    )
    checkpoint: str | None = Field(
        None, description="model checkpoint; default <run_dir>/checkpoints/best.pt"
    )
    split: str = Field("test", description="split whose full-domain windows are forecast")
    window_stride_minutes: int = Field(60, gt=0, description="minutes between forecast starts")
    max_forecasts: int | None = Field(None, ge=1, description="at most this many start times")


def forecast_to_dataset(
    forecast: xr.DataArray, provenance: dict | None = None, latlon: bool = True
) -> xr.Dataset:
    """CF-1.8 Dataset of one forecast.

    Parameters
    ----------
    forecast : xarray.DataArray
        A forecast as built by :func:`nowcast.nowcasts.forecast.make_forecast`.
    provenance : dict, optional
        See :func:`provenance_attrs`.
    latlon : bool
        Add 2-D ``lat``/``lon`` auxiliary coordinates.

    Returns
    -------
    xarray.Dataset
        Variables ``rain_rate`` (lead_time, y, x) and ``crs``; coordinates ``lead_time``
        (standard_name ``forecast_period``), ``forecast_reference_time`` (scalar), ``time``
        (valid time, on ``lead_time``), ``y``, ``x`` and optionally ``lat``, ``lon``.
    """
    return _dataset([forecast], provenance, latlon, multi=False)


def _dataset(
    forecasts: list[xr.DataArray], provenance: dict | None, latlon: bool, multi: bool
) -> xr.Dataset:
    if not forecasts:
        raise ValueError("no forecasts to export")
    first = forecasts[0]
    _check_compatible(forecasts)
    crs = forecast_crs(first)
    lead_time = first["lead_time"].values.astype("timedelta64[ns]")
    reference = np.array(
        [f["forecast_reference_time"].values for f in forecasts], dtype="datetime64[ns]"
    )
    coords = {
        "lead_time": (
            "lead_time",
            lead_time,
            {"standard_name": "forecast_period", "long_name": "forecast lead time"},
        ),
        "y": (
            "y",
            first["y"].values,
            {
                "standard_name": "projection_y_coordinate",
                "long_name": "y coordinate of projection",
                "units": "m",
                "axis": "Y",
            },
        ),
        "x": (
            "x",
            first["x"].values,
            {
                "standard_name": "projection_x_coordinate",
                "long_name": "x coordinate of projection",
                "units": "m",
                "axis": "X",
            },
        ),
    }
    reference_attrs = {
        "standard_name": "forecast_reference_time",
        "long_name": "time of the last observation the forecast starts from",
    }
    time_attrs = {"standard_name": "time", "long_name": "valid time"}
    valid_time = reference[:, None] + lead_time[None, :]
    if multi:
        dims = ("forecast_reference_time", "lead_time", "y", "x")
        coords["forecast_reference_time"] = ("forecast_reference_time", reference, reference_attrs)
        coords["time"] = (("forecast_reference_time", "lead_time"), valid_time, time_attrs)
        values = np.stack([np.asarray(f.values, dtype=np.float32) for f in forecasts])
    else:
        dims = ("lead_time", "y", "x")
        coords["forecast_reference_time"] = ((), reference[0], reference_attrs)
        coords["time"] = ("lead_time", valid_time[0], time_attrs)
        values = np.asarray(first.values, dtype=np.float32)
    if latlon:
        lat, lon = latlon_grid(crs, first["x"].values, first["y"].values)
        coords["lat"] = (("y", "x"), lat, {"standard_name": "latitude", "units": "degrees_north"})
        coords["lon"] = (("y", "x"), lon, {"standard_name": "longitude", "units": "degrees_east"})
    attrs = {**FORECAST_ATTRS, "grid_mapping": "crs"}
    ds = xr.Dataset(
        {VARIABLE: (dims, values, attrs), "crs": crs_variable(crs)},
        coords=coords,
    )
    ds.attrs = provenance_attrs(first, provenance)
    return ds


def _check_compatible(forecasts: list[xr.DataArray]) -> None:
    first = forecasts[0]
    for other in forecasts[1:]:
        for name in ("lead_time", "y", "x"):
            if not np.array_equal(first[name].values, other[name].values):
                raise ValueError(f"forecasts differ in '{name}'; they cannot share a file")
        if forecast_crs(first) != forecast_crs(other):
            raise ValueError("forecasts differ in CRS; they cannot share a file")
    references = [f["forecast_reference_time"].values for f in forecasts]
    if len(set(references)) != len(references):
        raise ValueError("two forecasts share a forecast_reference_time")


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


def _time_units(times: np.ndarray, reference: np.datetime64) -> tuple[str, str]:
    """CF units and dtype that store ``times`` exactly (whole minutes when possible)."""
    offsets = (times - reference).astype("timedelta64[ns]").astype(np.int64)
    stamp = np.datetime_as_string(reference, unit="s").replace("T", " ")
    for unit, ns in (("minutes", 60 * 10**9), ("seconds", 10**9)):
        if not np.any(offsets % ns):
            return f"{unit} since {stamp}", "int64"
    return f"nanoseconds since {stamp}", "int64"


def encoding(ds: xr.Dataset) -> dict:
    """NetCDF encoding: zlib level 4, one chunk per frame, exact integer times."""
    frame = tuple(1 if d not in ("y", "x") else ds.sizes[d] for d in ds[VARIABLE].dims)
    reference = ds["forecast_reference_time"].values.min()
    times = np.concatenate(
        [ds["time"].values.ravel(), np.ravel(ds["forecast_reference_time"].values)]
    )
    time_units, time_dtype = _time_units(times, reference)
    lead_ns = ds["lead_time"].values.astype("timedelta64[ns]").astype(np.int64)
    lead_unit = "minutes" if not np.any(lead_ns % (60 * 10**9)) else "seconds"
    enc = {
        VARIABLE: {
            "dtype": "float32",
            "zlib": True,
            "complevel": COMPLEVEL,
            "chunksizes": frame,
            "_FillValue": FILL_VALUE,
        },
        "time": {"units": time_units, "dtype": time_dtype, "_FillValue": None},
        "forecast_reference_time": {
            "units": time_units,
            "dtype": time_dtype,
            "_FillValue": None,
        },
        "lead_time": {"units": lead_unit, "dtype": "int64", "_FillValue": None},
        "x": {"_FillValue": None},
        "y": {"_FillValue": None},
    }
    for name in ("lat", "lon"):
        if name in ds:
            enc[name] = {"zlib": True, "complevel": COMPLEVEL, "_FillValue": None}
    return enc


def write_forecast_netcdf(
    forecasts: xr.DataArray | Sequence[xr.DataArray],
    path: str | Path,
    provenance: dict | None = None,
    multi: bool = False,
    latlon: bool = True,
) -> str:
    """Write one forecast, or several into one multi-forecast file, as CF-1.8 NetCDF4.

    Parameters
    ----------
    forecasts : xarray.DataArray or sequence of xarray.DataArray
        One forecast (``multi=False``), or forecasts sharing grid and lead times
        (``multi=True``).
    path : str or Path
        Final file path; written atomically (temporary sibling, then rename).
    provenance : dict, optional
        See :func:`provenance_attrs`.
    multi : bool
        Write a ``(forecast_reference_time, lead_time, y, x)`` file.
    latlon : bool
        Add 2-D ``lat``/``lon`` auxiliary coordinates.

    Returns
    -------
    str
        ``path``.
    """
    if isinstance(forecasts, xr.DataArray):
        forecasts = [forecasts]
    forecasts = list(forecasts)
    if not multi and len(forecasts) != 1:
        raise ValueError(f"{len(forecasts)} forecasts for one file: pass multi=True")
    ds = _dataset(forecasts, provenance, latlon, multi)
    enc = encoding(ds)

    def write(tmp: str) -> None:
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=enc)

    atomic_write_file(path, write)
    return str(path)


def forecast_filename(experiment: str, forecast: xr.DataArray, multi: bool = False) -> str:
    """``<experiment>_<method>[_<reference time>].nc``."""
    method = forecast.attrs.get("method", "forecast")
    if multi:
        return f"{experiment}_{method}.nc"
    reference = np.datetime_as_string(forecast["forecast_reference_time"].values, unit="m")
    return f"{experiment}_{method}_{reference.replace('-', '').replace(':', '')}Z.nc"


ForecastSource = Callable[[ExperimentConfig], Iterable[xr.DataArray]]


def experiment_forecasts(
    experiment: ExperimentConfig, settings: ExportConfig
) -> tuple[Iterator[xr.DataArray], dict]:
    """Forecasts of the configured methods on the experiment's full-domain windows.

    Windows come from the patch store (``settings.split``), thinned to one start every
    ``window_stride_minutes``; each is forecast by :func:`nowcast.nowcasts.runner.forecast_window`
    only when the iterator reaches it.

    Returns
    -------
    forecasts : iterator of xarray.DataArray
        Window by window, the forecasts of ``settings.methods`` in their order.
    provenance : dict
        ``checkpoint_sha256`` when a model makes forecasts, ``forecast_methods`` for variants.
    """
    store = PatchStore.open(experiment.patch_store)
    windows = store.windows(settings.split)
    if windows.empty:
        raise ConfigError(f"{experiment.patch_store}: no '{settings.split}' windows to forecast")
    windows = windows[on_time_grid(windows["reference_time"], settings.window_stride_minutes)]
    if settings.max_forecasts:
        windows = windows.iloc[: settings.max_forecasts]

    variants = parse_variants(experiment.forecast_methods)
    names = [name.lower() for name in settings.methods]
    check_method_names(names, variants, "export.methods")
    provenance = {}
    checkpoint = None
    if "model" in base_methods(names, variants):
        checkpoint = settings.checkpoint or f"{experiment.run_path}/checkpoints/best.pt"
        if not Path(checkpoint).exists():
            raise ConfigError(f"export.checkpoint: {checkpoint} not found; run `nowcast train`")
        provenance["checkpoint_sha256"] = file_sha256(checkpoint)
    if variants:
        provenance["forecast_methods"] = {
            name: spec.model_dump(mode="json", exclude_none=True)
            for name, spec in variants.items()
            if name in names
        }
    run = ForecastRun(
        methods=tuple(names),
        method_kwargs={},
        checkpoint=checkpoint,
        device=None,
        n_input_frames=store.n_input_frames,
        n_leadtimes=store.n_target_frames,
        timestep_minutes=store.timestep_minutes,
        variants={name: variants[name] for name in names if name in variants},
    )
    starts = (
        (cube_path(experiment.cube_root, window.source), window.reference_time)
        for window in windows.itertuples()
    )
    windows_forecast = forecast_windows(starts, run, observe=False)
    forecasts = (forecast for window in windows_forecast for forecast in window.forecasts.values())
    return forecasts, provenance


def export(
    config: str | Path | ExperimentConfig,
    forecasts: Iterable[xr.DataArray] | None = None,
    forecast_source: ForecastSource | None = None,
    provenance: dict | None = None,
) -> list[str]:
    """The ``export`` stage: write forecasts of an experiment as CF NetCDF.

    Parameters
    ----------
    config : str, Path or ExperimentConfig
        Experiment config (its ``export:`` section is an :class:`ExportConfig`).
    forecasts : iterable of xarray.DataArray, optional
        Forecasts to write.
    forecast_source : callable, optional
        Called with the experiment config when ``forecasts`` is not given; yields forecasts
        (this is where a trained model or a baseline method is plugged in).
    provenance : dict, optional
        Extra provenance (e.g. ``checkpoint_sha256``); the experiment config is always
        recorded.

    Returns
    -------
    list of str
        Written file paths.
    """
    experiment = config if isinstance(config, ExperimentConfig) else load_experiment(config)
    settings = stage_config(experiment, "export", ExportConfig)
    provenance = {"config": experiment.model_dump(mode="json"), **(provenance or {})}
    if forecasts is None:
        if forecast_source is None:
            forecasts, extra = experiment_forecasts(experiment, settings)
            provenance.update(extra)
        else:
            forecasts = forecast_source(experiment)
    out_dir = settings.out_dir or f"{experiment.run_path}/netcdf"

    paths = []
    if settings.multi_file:
        # One file holds every forecast of a method, so they are gathered before writing.
        by_method: dict[str, list[xr.DataArray]] = {}
        for forecast in forecasts:
            by_method.setdefault(forecast.attrs.get("method", "forecast"), []).append(forecast)
        for group in by_method.values():
            path = f"{out_dir}/{forecast_filename(experiment.name, group[0], multi=True)}"
            paths.append(
                write_forecast_netcdf(group, path, provenance, True, latlon=settings.latlon)
            )
    else:
        # Each forecast is written as it comes: memory holds one window, whatever their number.
        for forecast in forecasts:
            path = f"{out_dir}/{forecast_filename(experiment.name, forecast)}"
            paths.append(write_forecast_netcdf(forecast, path, provenance, latlon=settings.latlon))
    return paths
