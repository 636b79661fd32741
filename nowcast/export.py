"""CF-1.8 NetCDF export of forecasts (the ``export`` stage).

One forecast becomes a file with dims ``(lead_time, y, x)``; several forecasts of one method can
share a file with an extra ``forecast_reference_time`` dimension. The layout is documented in
``docs/architecture.md`` ("Forecast NetCDF"); every file passes the CF checker (cfchecker,
CF-1.8) with no errors and no warnings.

Files are written to a temporary sibling and renamed when complete
(:func:`nowcast.storage.atomic_write_file`), so a killed export never leaves a truncated file at
the final path. The ``export`` stage treats its folder as one artifact: it holds
``<folder>.lock`` for the run, writes every file into a temporary sibling folder and renames
that into place once all are written, so the folder at the final path is always a complete set
(the previous one until the new one is done).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr
from pydantic import Field

from nowcast import __version__, storage
from nowcast.config import ConfigError, ExperimentConfig, StrictModel, load_experiment, stage_config
from nowcast.nowcasts.forecast import FORECAST_ATTRS, forecast_crs
from nowcast.nowcasts.runner import ForecastRun, forecast_windows
from nowcast.nowcasts.variants import base_methods, check_method_names, parse_variants
from nowcast.patches.reader import PatchStore
from nowcast.sources.cube import crs_variable, cube_path, latlon_grid
from nowcast.storage import atomic_path, atomic_write_file, exclusive_lock, file_sha256
from nowcast.windows import on_time_grid

VARIABLE = "rain_rate"
#: Stored type of ``rain_rate`` (and of the 2-D lat/lon, as :func:`latlon_grid` makes them).
STORED_DTYPE = np.dtype("float32")
FILL_VALUE = np.float32(-9999.0)
COMPLEVEL = 4
#: Allowance per file for what the array sizes leave out: HDF5 headers and the attributes (the
#: experiment config among them).
FILE_OVERHEAD_BYTES = 64 * 1024


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
            "dtype": STORED_DTYPE.name,
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
    atomic: bool = True,
) -> str:
    """Write one forecast, or several into one multi-forecast file, as CF-1.8 NetCDF4.

    Parameters
    ----------
    forecasts : xarray.DataArray or sequence of xarray.DataArray
        One forecast (``multi=False``), or forecasts sharing grid and lead times
        (``multi=True``).
    path : str or Path
        Final file path; written atomically (temporary sibling, then rename) unless ``atomic``
        is False.
    provenance : dict, optional
        See :func:`provenance_attrs`.
    multi : bool
        Write a ``(forecast_reference_time, lead_time, y, x)`` file.
    latlon : bool
        Add 2-D ``lat``/``lon`` auxiliary coordinates.
    atomic : bool
        False writes at ``path`` directly: for a file inside a folder that is itself written
        atomically (:func:`export`), where a disk error is then reported for that folder.

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

    if atomic:
        atomic_write_file(path, write)
    else:
        write(str(path))
    return str(path)


def netcdf_bytes(forecast: xr.DataArray, n_forecasts: int = 1, latlon: bool = True) -> int:
    """Uncompressed size of a NetCDF file of ``n_forecasts`` forecasts shaped like ``forecast``.

    The ``rain_rate`` values at their stored dtype (:data:`STORED_DTYPE`), the coordinates
    (``y``, ``x``, lead and valid times, the 2-D ``lat``/``lon`` when ``latlon``) and
    :data:`FILE_OVERHEAD_BYTES`. zlib makes the file smaller (much smaller where it is dry), so
    this is an upper bound for the free-space checks before a write.
    """
    n_lead, ny, nx = (forecast.sizes[d] for d in ("lead_time", "y", "x"))
    values = n_forecasts * n_lead * ny * nx * STORED_DTYPE.itemsize
    coords = 8 * (ny + nx + n_lead + n_forecasts * (n_lead + 1))  # float64 / int64
    if latlon:
        coords += 2 * ny * nx * STORED_DTYPE.itemsize
    return values + coords + FILE_OVERHEAD_BYTES


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
        Window by window, the forecasts of ``settings.methods`` in their order; ``len()`` gives
        their number.
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
    return _Counted(forecasts, len(windows) * len(names)), provenance


class _Counted(Iterator):
    """An iterator that knows how many items it yields (for the free-space estimate)."""

    def __init__(self, items: Iterator, count: int) -> None:
        self._items, self._count = items, count

    def __next__(self):
        return next(self._items)

    def __len__(self) -> int:
        return self._count


def export(
    config: str | Path | ExperimentConfig,
    forecasts: Iterable[xr.DataArray] | None = None,
    forecast_source: ForecastSource | None = None,
    provenance: dict | None = None,
) -> list[str]:
    """The ``export`` stage: write forecasts of an experiment as CF NetCDF.

    The export folder (``export.out_dir``, default ``<run_dir>/netcdf``) is one artifact: the
    run holds ``<folder>.lock``, writes each file into a temporary sibling folder as its
    forecast arrives, and renames that folder into place when every file is written. A killed
    run leaves the previous folder (if any) as it was, and the next run redoes the export.
    Before writing, the free space must hold the files uncompressed (:func:`netcdf_bytes`).

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
        Written file paths (in the final folder). With no forecasts nothing is written and a
        previous folder stays.

    Raises
    ------
    nowcast.storage.StoreLockedError
        If another export is writing the folder (``<folder>.lock``).
    nowcast.storage.DiskWriteError
        If the disk has no room for the files, or is full or read-only when writing.
    ConfigError
        If the folder holds files other than NetCDF (the export would replace them).
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
    out_dir = (settings.out_dir or f"{experiment.run_path}/netcdf").rstrip("/")
    with exclusive_lock(f"{out_dir}.lock"):
        _check_replaceable(out_dir)
        if settings.multi_file:
            names = _write_multi(forecasts, out_dir, experiment.name, provenance, settings.latlon)
        else:
            names = _write_single(forecasts, out_dir, experiment.name, provenance, settings.latlon)
    return [f"{out_dir}/{name}" for name in names]


def _check_replaceable(out_dir: str) -> None:
    """Refuse a folder that holds more than an export's files: it is replaced as a whole."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise ConfigError(f"export.out_dir: {out_dir} is a file; choose a folder")
        return
    others = sorted(n for n in os.listdir(out_dir) if not n.endswith(".nc") and ".nc.tmp-" not in n)
    if others:
        raise ConfigError(
            f"export.out_dir: {out_dir} holds files other than NetCDF ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}), and an export replaces the whole folder: "
            "choose an empty or new folder"
        )


def _check_space(out_dir: str, needed: int, n_files: int | None) -> None:
    what = f"export of {n_files} NetCDF file(s)" if n_files else "export's next NetCDF file"
    storage.check_free_space(out_dir, needed, what)


def _write_single(
    forecasts: Iterable[xr.DataArray], out_dir: str, experiment: str, provenance: dict, latlon: bool
) -> list[str]:
    """One file per forecast, each written as it comes (memory holds one window whatever
    their number); returns the file names."""
    n_files = len(forecasts) if isinstance(forecasts, Sized) else None
    items = iter(forecasts)
    first = next(items, None)
    if first is None:
        return []
    per_file = netcdf_bytes(first, latlon=latlon)
    _check_space(out_dir, per_file * (n_files or 1), n_files)
    names = []
    with atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        for forecast in itertools.chain([first], items):
            if n_files is None and names:  # a count known only at the end: check file by file
                _check_space(out_dir, per_file, None)
            names.append(forecast_filename(experiment, forecast))
            path = f"{tmp}/{names[-1]}"
            write_forecast_netcdf(forecast, path, provenance, latlon=latlon, atomic=False)
    return names


def _write_multi(
    forecasts: Iterable[xr.DataArray], out_dir: str, experiment: str, provenance: dict, latlon: bool
) -> list[str]:
    """One file per method holding all its forecasts (gathered first); returns the names."""
    by_method: dict[str, list[xr.DataArray]] = {}
    for forecast in forecasts:
        by_method.setdefault(forecast.attrs.get("method", "forecast"), []).append(forecast)
    if not by_method:
        return []
    groups = list(by_method.values())
    needed = sum(netcdf_bytes(group[0], len(group), latlon) for group in groups)
    _check_space(out_dir, needed, len(groups))
    names = []
    with atomic_path(out_dir) as tmp:
        os.makedirs(tmp)
        for group in groups:
            names.append(forecast_filename(experiment, group[0], multi=True))
            path = f"{tmp}/{names[-1]}"
            write_forecast_netcdf(group, path, provenance, True, latlon=latlon, atomic=False)
    return names
