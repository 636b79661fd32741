"""File discovery for catalog sources, and the segmented time axis of a cube.

The catalog uses pysteps' own data-source vocabulary (``root_path``, ``path_fmt``,
``fn_pattern``, ``fn_ext``, ``importer``, ``importer_kwargs``, ``timestep``), so an entry of a
``pystepsrc`` file can be pasted into ``data_catalog.yaml``. As in
:func:`pysteps.io.archive.find_by_date`, the patterns are strftime patterns that may also hold
the wildcards ``?`` (one character) and ``*`` (any characters), matched with :mod:`fnmatch`.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, field_validator, model_validator

from nowcast import import_pysteps
from nowcast.config import ConfigError, StrictModel, expand_env, format_validation_error, load_yaml

#: The catalog that ships inside the package: a byte-equal copy of the repository's top-level
#: ``data_catalog.yaml`` (a test keeps them equal), so an installed wheel has one.
PACKAGED_CATALOG = Path(__file__).resolve().parent.parent / "data_catalog.yaml"


def default_catalog_path() -> Path:
    """The catalog used when none is given.

    In a development checkout (the package next to ``pyproject.toml``) it is the top-level
    ``data_catalog.yaml``, the source of truth a user edits; in an installed package, the copy
    the wheel carries (:data:`PACKAGED_CATALOG`).
    """
    checkout = Path(__file__).resolve().parent.parent.parent
    top_level = checkout / "data_catalog.yaml"
    if (checkout / "pyproject.toml").is_file() and top_level.is_file():
        return top_level
    return PACKAGED_CATALOG


class Conversion(StrictModel):
    """How importer output becomes rain rate in mm/h."""

    units: Literal["auto", "mm", "mm/h", "dBZ"] = Field(
        "auto", description="units delivered by the importer; auto trusts its metadata"
    )
    zr_a: float | None = Field(None, description="Z-R a for dBZ input (default: importer's)")
    zr_b: float | None = Field(None, description="Z-R b for dBZ input (default: importer's)")
    max_rain_rate: float | None = Field(
        None, gt=0, description="values above this (mm/h) are radar artefacts and become no-data"
    )


class SourceConfig(StrictModel):
    """One radar source of the data catalog."""

    name: str
    description: str = ""
    importer: str = Field(description="pysteps importer name, or 'synthetic'")
    importer_kwargs: dict[str, Any] = Field(default_factory=dict)
    decoder: Literal["pysteps", "xarray"] = Field(
        "pysteps",
        description="per-file decoder: the pysteps importer, or xarray for CF netCDF "
        "(metadata still comes from the pysteps importer, read once)",
    )
    variable: str | None = Field(None, description="data variable for decoder: xarray")
    root_path: str = ""
    path_fmt: str = ""
    fn_pattern: str = ""
    fn_ext: str = ""
    timestep: int = Field(gt=0, description="minutes between frames")
    conversion: Conversion = Field(default_factory=Conversion)
    start: str | None = Field(None, description="first time, ISO 8601 (UTC)")
    end: str | None = Field(None, description="last time, ISO 8601 (UTC)")
    max_gap_minutes: int = Field(
        360,
        gt=0,
        description="a run of missing times longer than this splits the cube's time axis into "
        "segments and is not stored; shorter runs are kept as NaN frames",
    )
    institution: str = ""

    @field_validator("importer")
    @classmethod
    def _known_importer(cls, value: str) -> str:
        if value == "synthetic":
            return value
        _importer_methods = import_pysteps("pysteps.io.interface")._importer_methods

        if value not in _importer_methods:
            known = ", ".join(sorted(_importer_methods))
            raise ValueError(f"unknown pysteps importer '{value}'; known: synthetic, {known}")
        return value

    @model_validator(mode="after")
    def _files_described(self) -> SourceConfig:
        if self.importer != "synthetic":
            for field in ("root_path", "fn_pattern", "fn_ext"):
                if not getattr(self, field):
                    raise ValueError(f"'{field}' is required for importer '{self.importer}'")
        if self.decoder == "xarray" and not self.variable:
            raise ValueError("'variable' is required when decoder is 'xarray'")
        return self

    @property
    def resolved_root(self) -> str:
        return expand_env(self.root_path)


class Catalog(StrictModel):
    """The data catalog: named radar sources."""

    sources: dict[str, SourceConfig]

    def __getitem__(self, name: str) -> SourceConfig:
        if name not in self.sources:
            known = ", ".join(sorted(self.sources))
            raise ConfigError(f"unknown source '{name}'; the catalog has: {known}")
        return self.sources[name]


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate ``data_catalog.yaml``.

    Parameters
    ----------
    path : str or Path, optional
        Catalog file; default :func:`default_catalog_path`.

    Returns
    -------
    Catalog
    """
    path = Path(path) if path else default_catalog_path()
    raw = load_yaml(path)
    unknown = sorted(set(raw) - {"sources"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; a catalog has 'sources'")
    entries = raw.get("sources")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: expected a non-empty 'sources' mapping")
    sources = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: source '{name}': expected a mapping")
        try:
            sources[name] = SourceConfig(name=name, **entry)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{path}: source '{name}'")) from None
    return Catalog(sources=sources)


@dataclass(frozen=True)
class FrameRef:
    """One expected frame of a source: its valid time and the file that should hold it."""

    time: datetime
    path: str | None  # None for the synthetic source


@dataclass
class FramePlan:
    """The frames a cube is built from: regular segments separated by long gaps.

    Attributes
    ----------
    frames : list of FrameRef
        Every time of every segment, in time order; times without a file are gaps.
    segment : numpy.ndarray
        Segment number (int32, 0, 1, ... in time order) of each frame.
    present : numpy.ndarray
        True where a file (or, for the synthetic source, a frame) exists at planning time.
    """

    frames: list[FrameRef]
    segment: np.ndarray
    present: np.ndarray

    @property
    def n_segments(self) -> int:
        return int(self.segment.max()) + 1 if self.segment.size else 0

    @property
    def times(self) -> list[datetime]:
        return [f.time for f in self.frames]


_DIRECTIVES = {
    "Y": r"(\d{4})",
    "y": r"(\d{2})",
    "m": r"(\d{2})",
    "d": r"(\d{2})",
    "j": r"(\d{3})",
    "H": r"(\d{2})",
    "M": r"(\d{2})",
    "S": r"(\d{2})",
}


def _pattern_regex(pattern: str, source: str) -> tuple[str, list[str]]:
    """Regex of a strftime pattern with fnmatch wildcards, and the directive of each group.

    strptime cannot parse a name that holds wildcards, so discovery matches names with this
    regex and takes the time from its groups.
    """
    parts, fields, i = [], [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "%" and i + 1 < len(pattern):
            code = pattern[i + 1]
            if code == "%":
                parts.append("%")
            elif code in _DIRECTIVES:
                parts.append(_DIRECTIVES[code])
                fields.append(code)
            else:
                raise ConfigError(
                    f"source '{source}': unsupported strftime directive %{code} in {pattern!r} "
                    f"(supported: %{', %'.join(_DIRECTIVES)})"
                )
            i += 2
            continue
        parts.append({"?": "[^/]", "*": "[^/]*?"}.get(char, re.escape(char)))
        i += 1
    return "".join(parts), fields


def _time_from_fields(fields: list[str], values: tuple[str, ...]) -> datetime | None:
    found: dict[str, int] = {}
    for code, value in zip(fields, values, strict=True):
        found.setdefault(code, int(value))
    if "Y" in found:
        year = found["Y"]
    elif "y" in found:
        year = found["y"] + (1900 if found["y"] >= 69 else 2000)  # as strptime's %y
    else:
        return None
    try:
        if "j" in found:
            day = datetime(year, 1, 1) + timedelta(days=found["j"] - 1)
        else:
            day = datetime(year, found.get("m", 1), found.get("d", 1))
        return day.replace(
            hour=found.get("H", 0), minute=found.get("M", 0), second=found.get("S", 0)
        )
    except ValueError:
        return None


def _relative_pattern(source: SourceConfig) -> str:
    name = source.fn_pattern + "." + source.fn_ext
    return f"{source.path_fmt.strip('/')}/{name}" if source.path_fmt.strip("/") else name


def _matches(source: SourceConfig, relative: str, time: datetime) -> bool:
    """Whether a file (path relative to the root) is the file of ``time`` (pysteps' fnmatch)."""
    return fnmatch.fnmatchcase(relative, time.strftime(_relative_pattern(source)))


def _pattern_to_glob(pattern: str) -> str:
    return re.sub(r"%[a-zA-Z]", "*", pattern)


def _choose(source: SourceConfig, time: datetime, paths: list[str]) -> str:
    paths = sorted(paths)
    if len(paths) > 1:
        warnings.warn(
            f"source '{source.name}': {len(paths)} files match {time.isoformat()}: "
            f"{', '.join(paths)}; using {paths[0]}",
            stacklevel=3,
        )
    return paths[0]


def discover_files(
    source: SourceConfig, start: datetime | None = None, end: datetime | None = None
) -> dict[datetime, str]:
    """Files on disk that match the source's patterns, by time.

    With ``start`` and ``end`` only the directories of that range are listed; otherwise the
    whole tree under ``root_path`` that matches ``path_fmt``. When several files match one time
    (wildcards), the first in sorted order is taken and a warning names them all.
    """
    root = source.resolved_root
    regex, fields = _pattern_regex(_relative_pattern(source), source.name)
    matcher = re.compile(regex)
    if start is not None and end is not None:
        day_axis = time_axis(start, end, source.timestep)
        dir_globs = sorted({t.strftime(source.path_fmt) for t in day_axis})
    else:
        dir_globs = [_pattern_to_glob(source.path_fmt)]
    name_glob = _pattern_to_glob(source.fn_pattern) + "." + _pattern_to_glob(source.fn_ext)
    candidates: dict[datetime, list[str]] = {}
    for dir_glob in dir_globs:
        for path in glob.glob(os.path.join(root, dir_glob, name_glob)):
            relative = os.path.relpath(path, root)
            match = matcher.fullmatch(relative)
            time = _time_from_fields(fields, match.groups()) if match else None
            if time is None or not _matches(source, relative, time):
                continue  # a file that only looks like the pattern
            if (start is None or time >= start) and (end is None or time <= end):
                candidates.setdefault(time, []).append(path)
    return {time: _choose(source, time, paths) for time, paths in sorted(candidates.items())}


def frame_path(source: SourceConfig, time: datetime) -> str:
    """File of a source at a time: the catalog patterns applied with strftime.

    Wildcards (``?``, ``*``) are resolved against the directory listing as in pysteps'
    ``find_by_date``; when nothing matches, the pattern itself is returned (a missing file).
    """
    expected = _missing_path(source, time)
    if not glob.has_magic(expected):
        return expected
    found = glob.glob(expected)
    return _choose(source, time, found) if found else expected


def time_axis(start: datetime, end: datetime, timestep_minutes: int) -> pd.DatetimeIndex:
    """Regular time axis from ``start`` to ``end`` inclusive."""
    return pd.date_range(start, end, freq=timedelta(minutes=timestep_minutes))


def _as_datetime(value) -> datetime | None:
    """A datetime from a datetime, numpy/pandas time or ISO string (library callers pass any)."""
    return None if value is None else pd.Timestamp(value).to_pydatetime()


def _range(source: SourceConfig, start, end):
    start = _as_datetime(start if start is not None else source.start)
    end = _as_datetime(end if end is not None else source.end)
    if source.importer == "synthetic":
        kwargs = source.importer_kwargs
        start = start or pd.Timestamp(kwargs.get("start", "2000-01-01T00:00")).to_pydatetime()
        n_frames = int(kwargs.get("n_frames", 48))
        end = end or start + timedelta(minutes=source.timestep * (n_frames - 1))
    if start is not None and end is not None:
        if end < start:
            raise ConfigError(f"source '{source.name}': end {end} is before start {start}")
        step = np.timedelta64(source.timestep, "m")
        if (np.datetime64(end) - np.datetime64(start)) % step:
            raise ConfigError(
                f"source '{source.name}': end {end} is not on the "
                f"{source.timestep}-min axis from {start}"
            )
    return start, end


def _present(source: SourceConfig, start, end) -> dict[datetime, str | None]:
    """Times that exist (files on disk; synthetic: all but ``drop_times``) in the range."""
    if source.importer == "synthetic":
        dropped = {pd.Timestamp(t) for t in source.importer_kwargs.get("drop_times", ())}
        return {
            t.to_pydatetime(): None
            for t in time_axis(start, end, source.timestep)
            if t not in dropped
        }
    found = discover_files(source, start, end)
    if not found and (start is None or end is None):
        raise ConfigError(
            f"source '{source.name}': no files match "
            f"{source.resolved_root}/{source.path_fmt}/{source.fn_pattern}.{source.fn_ext}"
            "; for the pysteps sample sources run `nowcast data` (or `make data`)"
        )
    return found


def list_frames(
    source: SourceConfig, start: datetime | None = None, end: datetime | None = None
) -> list[FrameRef]:
    """List the expected frames of a source on one regular time axis (no gap splitting).

    Parameters
    ----------
    source : SourceConfig
        Catalog entry.
    start, end : datetime, optional
        Override the entry's time range. Without either, the range spans the files on disk.

    Returns
    -------
    list of FrameRef
        One per time step from start to end, including times whose file is missing. Ingest
        uses :func:`plan_frames` instead, which leaves long gaps out.
    """
    start, end = _range(source, start, end)
    if source.importer == "synthetic":
        return [FrameRef(t.to_pydatetime(), None) for t in time_axis(start, end, source.timestep)]
    if start is None or end is None:
        found = _present(source, start, end)
        start, end = _range(source, start or min(found), end or max(found))
    else:
        found = discover_files(source, start, end)
    return [
        FrameRef(t, found.get(t) or frame_path(source, t))
        for t in (ts.to_pydatetime() for ts in time_axis(start, end, source.timestep))
    ]


def plan_frames(
    source: SourceConfig,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    after: datetime | None = None,
) -> FramePlan:
    """Frames of a cube: segments of a regular axis, split where a gap exceeds the maximum.

    A run of missing times longer than ``source.max_gap_minutes`` (``n_missing * timestep >
    max_gap_minutes``) is not stored: the axis is cut there into segments, each regular at the
    source's timestep and anchored at its first time. Shorter runs are kept as frames without a
    file. This holds for times discovered on disk and inside an explicit ``start``/``end``
    range, including the runs before the first and after the last file.

    Parameters
    ----------
    source : SourceConfig
        Catalog entry.
    start, end : datetime, optional
        Time range (default: the entry's, else the files on disk).
    after : datetime, optional
        Last time of an existing cube (``--append``): only later times are planned. The plan
        then starts at ``after + timestep`` exactly when the gap since ``after`` is at most
        ``max_gap_minutes``, i.e. when it continues the cube's last segment.

    Returns
    -------
    FramePlan
    """
    if after is not None:
        start, end = _append_range(source, after, end)
        if end is None:
            return FramePlan([], np.zeros(0, np.int32), np.zeros(0, bool))
    else:
        start, end = _range(source, start, end)
    present = _present(source, start, end)
    if not present:
        # Nothing on disk in an explicit range: one segment of gaps, so that the caller can
        # name the expected files (ingest then stops: no readable file in the time range).
        times = [t.to_pydatetime() for t in time_axis(start, end, source.timestep)]
        frames = [FrameRef(t, _missing_path(source, t)) for t in times]
        return FramePlan(frames, np.zeros(len(frames), np.int32), np.zeros(len(frames), bool))
    return _split(source, present, start, end)


def _append_range(source: SourceConfig, after: datetime, end: datetime | None):
    """Range of an append: from the step after ``after`` to ``end``, the entry's or the newest
    file (None when there is nothing newer)."""
    step = timedelta(minutes=source.timestep)
    start = after + step
    end = _as_datetime(end if end is not None else source.end)
    if end is None and source.importer == "synthetic":
        _, end = _range(source, None, None)
    if end is None:
        newer = [t for t in discover_files(source) if t >= start]
        end = max(newer) if newer else None
    if end is None or end < start:
        return start, None
    return start, start + step * ((end - start) // step)  # on the axis from ``start``


def _missing_path(source: SourceConfig, time: datetime) -> str | None:
    """Path of a time that discovery found no file for (patterns applied, wildcards kept)."""
    if source.importer == "synthetic":
        return None
    directory = os.path.join(source.resolved_root, time.strftime(source.path_fmt))
    return os.path.join(directory, time.strftime(source.fn_pattern) + "." + source.fn_ext)


def _split(source: SourceConfig, present: dict, start, end) -> FramePlan:
    """Cut the axis at every run of missing times longer than ``max_gap_minutes``."""
    step = timedelta(minutes=source.timestep)
    limit = timedelta(minutes=source.max_gap_minutes)
    times = sorted(present)
    # The run before the first file is kept as gaps when short and on the axis from start.
    lead = times[0] - start if start is not None else None
    first = start if lead is not None and lead <= limit and not lead % step else times[0]
    segments: list[list[datetime]] = [[first]]
    skipped: list[datetime] = []
    for t in times:
        last = segments[-1][-1]
        if t <= last:
            continue
        if t - last - step > limit:
            segments.append([t])  # a new segment, anchored at its first file
        elif (t - segments[-1][0]) % step:
            skipped.append(t)  # off the segment's regular axis
        else:
            segments[-1].append(t)
    if end is not None and end > segments[-1][-1]:
        trail = end - segments[-1][-1]
        if trail <= limit and not (end - segments[-1][0]) % step:
            segments[-1].append(end)  # the run after the last file is short: keep it as gaps
    if skipped:
        warnings.warn(
            f"source '{source.name}': {len(skipped)} file(s) off the {source.timestep}-min axis "
            f"ignored, first at {skipped[0].isoformat()}",
            stacklevel=3,
        )
    frames, segment = [], []
    for index, seg in enumerate(segments):
        for ts in time_axis(seg[0], seg[-1], source.timestep):
            t = ts.to_pydatetime()
            frames.append(FrameRef(t, present.get(t) or _missing_path(source, t)))
            segment.append(index)
    flags = np.array([f.time in present for f in frames], bool)
    return FramePlan(frames, np.asarray(segment, np.int32), flags)
