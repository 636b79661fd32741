"""CF-1.8 NetCDF export of forecasts (the ``export`` stage).

One forecast becomes a file with dims ``(lead_time, y, x)``; several forecasts of one method can
share a file with an extra ``forecast_reference_time`` dimension. An ensemble keeps its
``realization`` dimension first and adds its exceedance probabilities at 1, 5 and 10 mm/h
(``exceedance_probability``, dims ``(threshold, ..., lead_time, y, x)``). The layout is in
``docs/architecture.md`` ("Forecast NetCDF"); every file passes the CF checker (cfchecker,
CF-1.8) with no errors and no warnings. Files are written to a temporary sibling and renamed
when complete (:func:`nowcast.storage.atomic_write_file`); the ``export`` stage's folder is one
artifact (:func:`export`), so the folder at the final path is always a complete set.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from datetime import datetime, timezone
from pathlib import Path

import dask
import numpy as np
import xarray as xr
from pydantic import Field

from nowcast import __version__, storage
from nowcast.config import ConfigError, ExperimentConfig, StrictModel, load_experiment, stage_config
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
    method_kwargs: dict[str, dict] = Field(
        default_factory=dict, description="keyword arguments per method, e.g. ensemble.checkpoint"
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
        (valid time, on ``lead_time``), ``y``, ``x`` and optionally ``lat``, ``lon``. An
        ensemble has ``rain_rate`` (realization, lead_time, y, x) and ``exceedance_probability``
        (threshold, lead_time, y, x).
    """
    return _dataset([forecast], provenance, latlon, multi=False)


def _dataset(
    forecasts: list[xr.DataArray],
    provenance: dict | None,
    latlon: bool,
    multi: bool,
    probabilities: list[xr.DataArray] | None = None,
) -> xr.Dataset:
    if not forecasts:
        raise ValueError("no forecasts to export")
    first = forecasts[0]
    _check_compatible(forecasts)
    ensemble = is_ensemble(first)
    if ensemble:
        forecasts = [members(f) for f in forecasts]
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
    }
    for axis in ("y", "x"):  # projected metres
        name = f"projection_{axis}_coordinate"
        attrs = {"standard_name": name, "long_name": f"{axis} coordinate of projection"}
        coords[axis] = (axis, first[axis].values, {**attrs, "units": "m", "axis": axis.upper()})
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
    else:
        dims = ("lead_time", "y", "x")
        coords["forecast_reference_time"] = ((), reference[0], reference_attrs)
        coords["time"] = ("lead_time", valid_time[0], time_attrs)
    if latlon:
        lat, lon = latlon_grid(crs, first["x"].values, first["y"].values)
        coords["lat"] = (("y", "x"), lat, {"standard_name": "latitude", "units": "degrees_north"})
        coords["lon"] = (("y", "x"), lon, {"standard_name": "longitude", "units": "degrees_east"})
    grid = {"grid_mapping": "crs"}
    variables = {"crs": crs_variable(crs)}
    if ensemble:
        coords[REALIZATION] = first[REALIZATION].variable.to_base_variable()
        coords[REALIZATION].attrs["units"] = "1"  # the CF standard name's canonical units
        if probabilities is None:
            probabilities = [exceedance_probability(f, THRESHOLDS) for f in forecasts]
        coords[THRESHOLD] = probabilities[0][THRESHOLD].variable.to_base_variable()
        # long_name and units "1": CF has no standard name for a probability.
        attrs_p = {key: probabilities[0].attrs[key] for key in ("long_name", "units")}
        values = _stacked([p.values for p in probabilities], multi)
        variables[PROBABILITY_NAME] = ((THRESHOLD, *dims), values, {**attrs_p, **grid})
        dims = (REALIZATION, *dims)
    values = _stacked([f.values for f in forecasts], multi, ensemble)
    variables[VARIABLE] = (dims, values, {**FORECAST_ATTRS, **grid})
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs = provenance_attrs(first, provenance)
    return ds


def _stacked(values: list[np.ndarray], multi: bool, lazy: bool = False):
    """Float32 values of one forecast, or of several stacked after their leading dimension (an
    ensemble's realization, a probability's threshold) when ``multi``. ``lazy``: one frame per
    Dask chunk, read from the array itself, so NetCDF encoding (NaN to the fill value) copies a
    frame at a time, not the ensemble (``dask.array.from_array`` would copy an ndarray)."""
    if multi:
        arrays = [np.asarray(v, dtype=np.float32) for v in values]
        return np.stack(arrays, axis=arrays[0].ndim - 3)
    array = np.asarray(values[0], dtype=np.float32)
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


def _check_compatible(forecasts: list[xr.DataArray]) -> None:
    first = forecasts[0]
    for other in forecasts[1:]:
        for name in ("lead_time", "y", "x"):
            if not np.array_equal(first[name].values, other[name].values):
                raise ValueError(f"forecasts differ in '{name}'; they cannot share a file")
        if forecast_crs(first) != forecast_crs(other):
            raise ValueError("forecasts differ in CRS; they cannot share a file")
        if (is_ensemble(first), ensemble_size(first)) != (is_ensemble(other), ensemble_size(other)):
            raise ValueError("forecasts differ in members; they cannot share a file")
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
    references = np.ravel(ds["forecast_reference_time"].values)
    times = np.concatenate([ds["time"].values.ravel(), references])
    time_units, time_dtype = _time_units(times, references.min())
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
    forecasts: xr.DataArray | Sequence[xr.DataArray],
    path: str | Path,
    provenance: dict | None = None,
    multi: bool = False,
    latlon: bool = True,
    atomic: bool = True,
    probabilities: xr.DataArray | None = None,
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
    probabilities : xarray.DataArray, optional
        One ensemble's exceedance probabilities, by default ``exceedance_probability(forecast)``.

    Returns
    -------
    str
        ``path``.
    """
    forecasts = [forecasts] if isinstance(forecasts, xr.DataArray) else list(forecasts)
    if not multi and len(forecasts) != 1:
        raise ValueError(f"{len(forecasts)} forecasts for one file: pass multi=True")
    given = None if probabilities is None else [probabilities]
    ds = _dataset(forecasts, provenance, latlon, multi, given)
    enc = encoding(ds)

    def write(tmp: str) -> None:
        # An ensemble's members are a Dask array (see _stacked): written here, in this thread.
        with dask.config.set(scheduler="synchronous"):
            ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=enc)

    if atomic:
        atomic_write_file(path, write)
    else:
        write(str(path))
    return str(path)


def netcdf_bytes(forecast: xr.DataArray, n_forecasts: int = 1, latlon: bool = True) -> int:
    """Uncompressed size of a NetCDF file of ``n_forecasts`` forecasts shaped like ``forecast``.

    The ``rain_rate`` values (every member of an ensemble) and an ensemble's exceedance
    probabilities at their stored dtype (:data:`STORED_DTYPE`), the coordinates (``y``, ``x``,
    lead and valid times, members and thresholds, the 2-D ``lat``/``lon`` when ``latlon``) and
    :data:`FILE_OVERHEAD_BYTES`. zlib makes the file smaller (much smaller where it is dry), so
    this is an upper bound for the free-space checks before a write.
    """
    n_lead, ny, nx = (forecast.sizes[d] for d in ("lead_time", "y", "x"))
    ensemble = is_ensemble(forecast)
    n_members, n_thresholds = ensemble_size(forecast), len(THRESHOLDS) * ensemble
    fields = n_forecasts * (n_members + n_thresholds)
    values = fields * n_lead * ny * nx * STORED_DTYPE.itemsize
    coords = 8 * (ny + nx + n_lead + n_forecasts * (n_lead + 1) + n_thresholds)
    coords += 4 * n_members * ensemble  # int32 realization
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
    method_kwargs = {k.lower(): v for k, v in settings.method_kwargs.items()}
    ensemble = method_kwargs.get("ensemble", {}).get("checkpoint")
    if "ensemble" in base_methods(names, variants) and ensemble and Path(ensemble).exists():
        provenance["ensemble_checkpoint_sha256"] = file_sha256(ensemble)
    run = ForecastRun(
        methods=tuple(names),
        method_kwargs=method_kwargs,
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
            size = netcdf_bytes(forecast, latlon=latlon)
            # A count known only at the end, or a larger file (an ensemble): check file by file.
            if (n_files is None and names) or size > per_file:
                _check_space(out_dir, size, None)
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
