"""The ``export`` stage: forecasts of an experiment's windows as NetCDF files.

Each forecast becomes one file, written by
:func:`nowcast.nowcasts.netcdf.write_forecast_netcdf`: CF-1.8 (cfchecker, no errors and no
warnings) and read by pysteps' ``pysteps.io.nowcast_importers.import_netcdf_pysteps``. That
reader takes one reference time per file, so ``export.multi_file: true`` (several reference
times in one file) is refused. The stage's folder is one artifact (:func:`export`): the folder
at the final path is always a complete set.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path

import numpy as np
import xarray as xr
from pydantic import Field, field_validator

from nowcast import storage
from nowcast.config import ConfigError, ExperimentConfig, StrictModel, load_experiment, stage_config
from nowcast.nowcasts.netcdf import netcdf_bytes, write_forecast_netcdf
from nowcast.nowcasts.runner import ForecastRun, forecast_windows
from nowcast.nowcasts.variants import base_methods, check_method_names, parse_variants
from nowcast.patches.reader import PatchStore
from nowcast.sources.cube import cube_path
from nowcast.storage import atomic_path, exclusive_lock, file_sha256
from nowcast.windows import on_time_grid


class ExportConfig(StrictModel):
    """The ``export:`` section of an experiment config."""

    out_dir: str = Field("", description="where NetCDF files go; default <run_dir>/netcdf")
    multi_file: bool = Field(
        False,
        description="must be false: one file per forecast, the one reference time per file that "
        "pysteps' NetCDF reader takes",
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

    @field_validator("multi_file")
    @classmethod
    def _one_reference_time_per_file(cls, multi_file: bool) -> bool:
        if multi_file:
            raise ValueError(
                "true would put several reference times in one file, which pysteps' NetCDF "
                "reader cannot read; remove it (export writes one file per forecast)"
            )
        return multi_file


def forecast_filename(experiment: str, forecast: xr.DataArray) -> str:
    """``<experiment>_<method>_<reference time>.nc``."""
    method = forecast.attrs.get("method", "forecast")
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
    Before writing, the free space must hold the files uncompressed
    (:func:`nowcast.nowcasts.netcdf.netcdf_bytes`).

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
        If the folder holds files other than NetCDF (the export would replace them), or the
        section is invalid (``multi_file: true`` among others).
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
        names = _write_files(forecasts, out_dir, experiment.name, provenance, settings.latlon)
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


def _write_files(
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
