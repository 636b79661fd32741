"""A source's frames one at a time: its grid, and one frame decoded with a status.

Ingest and predict both read frames through these two functions, the synthetic source and
radar files alike, so "missing", "corrupt" and "grid mismatch" mean the same to both.
"""

from __future__ import annotations

import os

import pandas as pd

from nowcast.config import ConfigError
from nowcast.sources.catalog import FrameRef, SourceConfig
from nowcast.sources.readers import FrameReadError, Grid, GridMismatchError, read_frame, read_grid
from nowcast.sources.synthetic import SyntheticParams, synthetic_frame, synthetic_grid


def source_grid(source: SourceConfig, frames: list[FrameRef]) -> Grid:
    """Grid of a source, read once from its first readable file."""
    if source.importer == "synthetic":
        return synthetic_grid(SyntheticParams.from_kwargs(source.importer_kwargs))
    errors = []
    for frame in frames:
        if frame.path and os.path.exists(frame.path):
            try:
                return read_grid(source, frame.path)
            except GridMismatchError:
                raise
            except FrameReadError as err:
                errors.append(str(err))
    if errors:
        detail = f" ({errors[0]})"
    else:
        first = next((frame.path for frame in frames if frame.path), None)
        detail = (
            f" (none exists, e.g. {first}; for the pysteps sample sources run `nowcast data` "
            "or `make data`)"
        )
    raise ConfigError(f"source '{source.name}': no readable file in the time range{detail}")


def read_frame_status(frame: FrameRef, source: SourceConfig, grid: Grid):
    """Decode one frame without raising: (rain rate or None, status dict).

    ``status["state"]`` is ``ok``, ``missing`` (no file), ``corrupt`` or ``grid_mismatch``,
    with the reason; ingest and predict decide what each means for them.
    """
    status = {"time": frame.time.isoformat(), "file": frame.path, "state": "ok", "reason": ""}
    if source.importer == "synthetic":
        params = SyntheticParams.from_kwargs(source.importer_kwargs)
        if frame.time in {pd.Timestamp(t).to_pydatetime() for t in params.drop_times}:
            status["state"] = "missing"
            return None, status
        return synthetic_frame(frame.time, params, source.timestep), status
    if not os.path.exists(frame.path):
        status["state"] = "missing"
        return None, status
    try:
        return read_frame(source, frame.path, grid), status
    except GridMismatchError as err:
        status.update(state="grid_mismatch", reason=str(err))
    except FrameReadError as err:
        status.update(state="corrupt", reason=str(err).split(": ", 1)[-1])
    return None, status
