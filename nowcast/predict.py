"""Operational ``predict``: a nowcast from the newest (or a chosen) radar frames.

Inputs come from the source's cube or straight from the raw files through the catalog, so a
forecast can be issued as soon as a new file lands, without re-ingesting.

A forecast is a set of files in the output folder, ``<source>_<time>Z.nc`` and ``.png``, each
written atomically, and ``<source>_<time>Z.json`` written last: a manifest with the sha256 of
every file of the set. A consumer that finds the manifest finds a complete set; a rerun for the
same reference time removes the manifest first and replaces the set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from nowcast import storage
from nowcast.config import ConfigError
from nowcast.export import netcdf_bytes, write_forecast_netcdf
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.runner import ForecastRun, forecast_window, model_method
from nowcast.nowcasts.variants import check_method_names, parse_variants
from nowcast.sources.catalog import Catalog, FrameRef, frame_path, load_catalog, plan_frames
from nowcast.sources.cube import build_cube, cube_path, open_cube
from nowcast.sources.frames import read_frame_status, source_grid
from nowcast.storage import atomic_write_file, exists, file_sha256, remove, write_text
from nowcast.visualization.maps import plot_forecast_panels
from nowcast.windows import cube_timestep, frame_step_note, input_times

#: Free space asked for the map PNG(s) besides the NetCDF (a map is a few hundred KiB).
PNG_ALLOWANCE_BYTES = 4 * 2**20
#: Resolution of the map, as :func:`nowcast.visualization.maps.plot_forecast_panels` saves it.
MAP_DPI = 110


class InputFramesError(ConfigError):
    """The frames a forecast needs are missing or have gaps."""


@dataclass
class PredictResult:
    """What :func:`predict` wrote, and how long each of its stages took.

    Attributes
    ----------
    netcdf, map_png : str
        The files written.
    reference_time : str
        Time of the last input frame (ISO 8601).
    seconds : dict of str to float
        Wall seconds of each stage, in order: ``load_model`` (the checkpoint), ``read_inputs``,
        ``model`` (motion, transport and network), ``netcdf`` and ``map``. Together they are
        the work of a forecast; imports are not in any stage.
    note : str, optional
        How the model's timestep reads the source (:func:`nowcast.windows.frame_step_note`), if
        not 1:1.
    manifest : str, optional
        The manifest ``<stem>.json``, written last: ``reference_time``, ``source``, ``method``
        and ``files`` (name to sha256) of the set.
    """

    netcdf: str
    map_png: str
    reference_time: str
    seconds: dict
    note: str | None = None
    manifest: str | None = None

    @property
    def work_seconds(self) -> float:
        """Seconds of all the stages together."""
        return sum(self.seconds.values())

    def process_timings(self, startup: float, wall: float) -> dict:
        """The stage timings within the process that ran them (``nowcast predict``).

        Parameters
        ----------
        startup : float
            Seconds from the process start to the start of the work (interpreter, imports,
            configuration).
        wall : float
            Seconds from the process start to the end of the work.

        Returns
        -------
        dict
            ``stages_s`` (:attr:`seconds`), ``work_s`` (their sum), ``startup_s``, ``wall_s``
            and ``overhead_s`` (``wall_s - work_s``: start-up and whatever no stage covers).
        """
        work = self.work_seconds
        return {
            "stages_s": dict(self.seconds),
            "work_s": work,
            "startup_s": startup,
            "wall_s": wall,
            "overhead_s": wall - work,
        }

    def summary(self, timings: dict | None = None) -> str:
        """Lines for the user: files, stage timings and, given :meth:`process_timings`, the
        process's start-up and wall time."""
        timing = ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())
        note = f"note: {self.note}\n" if self.note else ""
        text = (
            f"{note}nowcast from {self.reference_time}\n  NetCDF: {self.netcdf}\n"
            f"  map: {self.map_png}\n"
            + (f"  manifest: {self.manifest}\n" if self.manifest else "")
            + f"  timing: {timing} (work {self.work_seconds:.2f} s)"
        )
        if timings is not None:
            text += (
                f"\n  process: start-up {timings['startup_s']:.2f} s (interpreter, imports), "
                f"wall {timings['wall_s']:.2f} s, overhead {timings['overhead_s']:.2f} s"
            )
        return text


def _required_times(reference: pd.Timestamp, n_frames: int, step: int) -> list[pd.Timestamp]:
    return list(pd.DatetimeIndex(input_times(reference, n_frames, step)))


def cube_reference_time(
    cube: xr.Dataset, at: datetime | None, n_input_frames: int, timestep: int
) -> pd.Timestamp:
    """The reference time of a forecast from ``at`` (default: the newest valid frame).

    Raises
    ------
    InputFramesError
        If any of the ``n_input_frames`` frames ending there is outside the cube or not valid
        (a gap or a skipped file).
    """
    valid = cube["frame_valid"].to_series()
    if at is None:
        if not valid.any():
            raise InputFramesError("the cube has no valid frame")
        at = valid[valid].index[-1]
    reference = pd.Timestamp(at)
    needed = _required_times(reference, n_input_frames, timestep)
    missing = [t for t in needed if t not in valid.index or not valid[t]]
    if missing:
        listing = ", ".join(t.isoformat() for t in missing)
        raise InputFramesError(
            f"cannot forecast from {reference.isoformat()}: {len(missing)} of the "
            f"{n_input_frames} input frames are missing or invalid ({listing})"
        )
    return reference


def cube_from_files(
    catalog: Catalog, source_name: str, at: datetime | None, n_input_frames: int, timestep: int
) -> tuple[xr.Dataset, pd.Timestamp]:
    """An in-memory cube of the input frames, read straight from the raw files of a source.

    Returns
    -------
    cube : xarray.Dataset
        The frames ending at the reference time (see :func:`nowcast.sources.cube.build_cube`).
    reference : pandas.Timestamp
        ``at``, default the newest file's time.

    Raises
    ------
    InputFramesError
        If a frame is missing or unreadable.
    """
    source = catalog[source_name]
    if at is None:
        # The segment plan lists only the stretches with data: an archive of events months apart
        # does not become a regular axis of every 5 minutes in between.
        plan = plan_frames(source)
        present = [f for f, ok in zip(plan.frames, plan.present, strict=True) if ok]
        if not present:
            raise InputFramesError(f"source '{source_name}': no files found")
        at = present[-1].time
    reference = pd.Timestamp(at)
    needed = _required_times(reference, n_input_frames, timestep)
    refs = [
        FrameRef(
            t.to_pydatetime(), None if source.importer == "synthetic" else frame_path(source, t)
        )
        for t in needed
    ]
    grid = source_grid(source, refs)
    values, problems = [], []
    for ref in refs:
        data, status = read_frame_status(ref, source, grid)
        if data is None:
            problems.append(f"{ref.time.isoformat()} ({status['state']}: {ref.path})")
        values.append(data)
    if problems:
        raise InputFramesError(
            f"cannot forecast from {reference.isoformat()}: input frames missing or unreadable: "
            + "; ".join(problems)
        )
    cube = build_cube(
        np.stack(values),
        [r.time for r in refs],
        np.ones(len(refs), bool),
        grid,
        {"source": source_name, "timestep_minutes": source.timestep},
    )
    return cube, reference


def inputs_from_files(
    catalog: Catalog, source_name: str, at: datetime | None, n_input_frames: int, timestep: int
) -> xr.DataArray:
    """Read the input frames straight from the raw files of a catalog source.

    Returns
    -------
    xarray.DataArray
        Rain rate (time, y, x), as :func:`nowcast.nowcasts.inputs.cube_inputs` reads a cube.
    """
    cube, reference = cube_from_files(catalog, source_name, at, n_input_frames, timestep)
    return cube_inputs(cube, reference, n_input_frames, timestep)


def predict(
    source: str,
    checkpoint: str | Path,
    *,
    at: datetime | None = None,
    cube_dir: str = "data/cubes",
    from_files: bool = False,
    out_dir: str | Path = "runs/predict",
    catalog: Catalog | None = None,
    n_leadtimes: int | None = None,
    method: str = "model",
    forecast_methods: dict | None = None,
) -> PredictResult:
    """Issue a nowcast with a trained model and write CF NetCDF plus a map PNG.

    Parameters
    ----------
    source : str
        Catalog source name.
    checkpoint : str or Path
        Checkpoint written by ``nowcast train``.
    at : datetime, optional
        Time of the last input frame; default the newest available frame (``--latest``).
    cube_dir : str
        Where the source's cube is (unless ``from_files``).
    from_files : bool
        Read the raw files through the catalog instead of the cube.
    out_dir : str or Path
        Output folder.
    catalog : Catalog, optional
    n_leadtimes : int, optional
        Lead times to write; default all the model predicts.
    method : str, optional
        ``model`` (default) or a variant of ``forecast_methods`` built on the model (blending,
        probability matching; :mod:`nowcast.nowcasts.variants`, as evaluate and export build
        it).
    forecast_methods : dict, optional
        An experiment's ``forecast_methods:`` section, where ``method`` is declared.

    Returns
    -------
    PredictResult
    """
    variants = parse_variants(forecast_methods)
    name = method.lower()
    check_method_names([name], variants, "predict --method")
    spec = variants.get(name)
    if name != "model" and (spec is None or spec.method != "model"):
        raise ConfigError(f"predict --method {method}: not the model or a variant built on it")
    seconds = {}
    start = time.perf_counter()
    model = model_method(str(checkpoint))
    seconds["load_model"] = time.perf_counter() - start
    step = int(model.timestep_minutes)

    start = time.perf_counter()
    if from_files:
        catalog = catalog or load_catalog()
        note = _timestep_note(source, catalog[source].timestep, step)
        cube, reference = cube_from_files(catalog, source, at, model.n_input_frames, step)
    else:
        path = cube_path(cube_dir, source)
        if catalog is not None and source not in catalog.sources and not exists(path):
            catalog[source]  # no cube and no such source: say the source is unknown
        cube = open_cube(path)
        note = _timestep_note(source, cube_timestep(cube), step)
        reference = cube_reference_time(cube, at, model.n_input_frames, step)
    opened = time.perf_counter() - start

    run = ForecastRun(
        methods=(name,),
        method_kwargs={},
        checkpoint=str(checkpoint),
        device=None,
        n_input_frames=model.n_input_frames,
        n_leadtimes=n_leadtimes or model.n_target_frames,
        timestep_minutes=step,
        variants={name: spec} if spec else {},
    )
    window = forecast_window(cube, reference, run, observe=False)
    seconds["read_inputs"] = opened + window.seconds["read"]
    seconds["model"] = window.seconds["forecast"]
    forecast = window.forecasts[name]

    reference = pd.Timestamp(forecast["forecast_reference_time"].values)
    stem = f"{source}_{reference:%Y%m%dT%H%M}Z"
    out_dir = Path(out_dir)
    manifest = out_dir / f"{stem}.json"
    storage.check_free_space(
        out_dir, netcdf_bytes(forecast) + PNG_ALLOWANCE_BYTES, f"forecast files {stem}.*"
    )
    remove(manifest)  # the set is incomplete until its new manifest is written
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    netcdf = write_forecast_netcdf(
        forecast,
        out_dir / f"{stem}.nc",
        provenance={
            "source": source,
            "method": name,
            "checkpoint_sha256": file_sha256(checkpoint),
            "config": {
                "checkpoint": str(checkpoint),
                "from_files": from_files,
                **({"forecast_method": spec.model_dump(mode="json")} if spec else {}),
            },
        },
    )
    seconds["netcdf"] = time.perf_counter() - start
    start = time.perf_counter()
    png = out_dir / f"{stem}.png"
    _write_map(forecast, name, step, png)
    seconds["map"] = time.perf_counter() - start
    _write_manifest(manifest, reference, source, name, [Path(netcdf), png])
    return PredictResult(
        str(netcdf), str(png), reference.isoformat(), seconds, note, manifest=str(manifest)
    )


def _write_map(forecast: xr.DataArray, name: str, step: int, path: Path) -> None:
    """The map panels at +1, +3 and +6 steps (those the forecast has), written atomically."""
    leads = [step * k for k in (1, 3, 6) if k <= forecast.sizes["lead_time"]]
    figure = plot_forecast_panels(None, {name: forecast}, leads)
    try:
        atomic_write_file(path, lambda tmp: figure.savefig(tmp, dpi=MAP_DPI, format="png"))
    finally:
        _close(figure)


def _write_manifest(
    path: Path, reference: pd.Timestamp, source: str, method: str, files: list[Path]
) -> None:
    """``<stem>.json``: the set's files and their sha256, written after all of them."""
    record = {
        "reference_time": reference.isoformat(),
        "source": source,
        "method": method,
        "files": {file.name: file_sha256(file) for file in files},
    }
    write_text(path, json.dumps(record, indent=2) + "\n")


def _timestep_note(source: str, source_step: int, model_step: int) -> str | None:
    # The rule of nowcast.windows.frames_per_model_step: inputs are read every k-th source frame
    # counted
    # back from the reference time (input_times at the model's step), or a ConfigError.
    return frame_step_note(source, source_step, model_step)


def _close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


__all__ = [
    "predict",
    "cube_reference_time",
    "cube_from_files",
    "inputs_from_files",
    "InputFramesError",
]
