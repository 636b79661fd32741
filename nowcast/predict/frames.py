"""The input frames of an operational nowcast: from the source's cube or its raw files.

Reading the raw files through the catalog lets a forecast be issued as soon as a new file lands,
without re-ingesting. Every function names the frames that are missing or unreadable.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import xarray as xr

from nowcast.config import ConfigError
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.sources.catalog import Catalog, FrameRef, frame_path, plan_frames
from nowcast.sources.cube import build_cube
from nowcast.sources.frames import read_frame_status, source_grid
from nowcast.windows import input_times

__all__ = ["InputFramesError", "cube_from_files", "cube_reference_time", "inputs_from_files"]


class InputFramesError(ConfigError):
    """The frames a forecast needs are missing or have gaps."""


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
