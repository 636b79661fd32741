"""File discovery for catalog sources.

The catalog uses pysteps' own data-source vocabulary (``root_path``, ``path_fmt``,
``fn_pattern``, ``fn_ext``, ``importer``, ``importer_kwargs``, ``timestep``), so an entry of a
``pystepsrc`` file can be pasted into ``data_catalog.yaml``.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from .config import ConfigError, SourceConfig


@dataclass(frozen=True)
class FrameRef:
    """One expected frame of a source: its valid time and the file that should hold it."""

    time: datetime
    path: str | None  # None for the synthetic source


def frame_path(source: SourceConfig, time: datetime) -> str:
    """Expected file of a source at a time (the catalog patterns applied with strftime)."""
    directory = os.path.join(source.resolved_root, time.strftime(source.path_fmt))
    return os.path.join(directory, time.strftime(source.fn_pattern) + "." + source.fn_ext)


def _pattern_to_glob(pattern: str) -> str:
    return re.sub(r"%[a-zA-Z]", "*", pattern)


def _discover_times(source: SourceConfig) -> list[datetime]:
    """Times of all files on disk that match the source's path and name patterns."""
    path_glob = os.path.join(
        source.resolved_root,
        _pattern_to_glob(source.path_fmt),
        _pattern_to_glob(source.fn_pattern) + "." + source.fn_ext,
    )
    times = []
    for path in glob.glob(path_glob):
        name = os.path.basename(path)[: -(len(source.fn_ext) + 1)]
        try:
            times.append(datetime.strptime(name, source.fn_pattern))
        except ValueError:
            continue  # a file that only looks like the pattern
    return sorted(set(times))


def time_axis(start: datetime, end: datetime, timestep_minutes: int) -> pd.DatetimeIndex:
    """Regular time axis from ``start`` to ``end`` inclusive."""
    return pd.date_range(start, end, freq=timedelta(minutes=timestep_minutes))


def list_frames(
    source: SourceConfig, start: datetime | None = None, end: datetime | None = None
) -> list[FrameRef]:
    """List the expected frames of a source on its regular time axis.

    Parameters
    ----------
    source : SourceConfig
        Catalog entry.
    start, end : datetime, optional
        Override the entry's time range. Without either, the range spans the files on disk.

    Returns
    -------
    list of FrameRef
        One per time step, including times whose file is missing (a gap), so that the cube
        records gaps explicitly.
    """
    start = start or (pd.Timestamp(source.start).to_pydatetime() if source.start else None)
    end = end or (pd.Timestamp(source.end).to_pydatetime() if source.end else None)
    if source.importer == "synthetic":
        kwargs = source.importer_kwargs
        start = start or pd.Timestamp(kwargs.get("start", "2000-01-01T00:00")).to_pydatetime()
        n_frames = int(kwargs.get("n_frames", 48))
        end = end or start + timedelta(minutes=source.timestep * (n_frames - 1))
        return [FrameRef(t.to_pydatetime(), None) for t in time_axis(start, end, source.timestep)]

    if start is None or end is None:
        found = _discover_times(source)
        if not found:
            raise ConfigError(
                f"source '{source.name}': no files match "
                f"{source.resolved_root}/{source.path_fmt}/{source.fn_pattern}.{source.fn_ext}"
            )
        start = start or found[0]
        end = end or found[-1]
    if end < start:
        raise ConfigError(f"source '{source.name}': end {end} is before start {start}")
    step = np.timedelta64(source.timestep, "m")
    if (np.datetime64(end) - np.datetime64(start)) % step:
        raise ConfigError(
            f"source '{source.name}': end {end} is not on the "
            f"{source.timestep}-min axis from {start}"
        )
    return [
        FrameRef(t.to_pydatetime(), frame_path(source, t.to_pydatetime()))
        for t in time_axis(start, end, source.timestep)
    ]
