"""Ingest stage: catalog source -> CF zarr cube of rain rate (mm/h).

Files are decoded in parallel on a Dask cluster, one task per file, and stay on the workers
until they are written: only a small status record per file comes back to the client, so the
decision to skip corrupt files (or to stop under ``strict``) is taken before anything is
written, and memory on the client does not grow with the archive.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from . import storage
from .catalog import FrameRef, list_frames
from .config import Catalog, ConfigError, SourceConfig, load_catalog
from .io.cube import CUBE_CHUNKS, build_cube, cube_path, open_cube, write_cube
from .io.radar import FrameReadError, Grid, GridMismatchError, read_frame, read_grid
from .io.synthetic import SyntheticParams, synthetic_frame, synthetic_grid
from .parallel import dask_client, show_progress


@dataclass
class IngestResult:
    """What an ingest run did."""

    path: str
    n_times: int
    n_read: int
    skipped: list[dict] = field(default_factory=list)
    missing_times: list[str] = field(default_factory=list)
    up_to_date: bool = False

    def summary(self) -> str:
        lines = [
            f"cube: {self.path}",
            f"times: {self.n_times}, read: {self.n_read}, missing: {len(self.missing_times)}, "
            f"skipped: {len(self.skipped)}" + (" (already up to date)" if self.up_to_date else ""),
        ]
        lines += [f"  skipped {s['file']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def source_digest(source: SourceConfig, frames: list[FrameRef]) -> str:
    """Digest of the source entry and its files (path, size, mtime) that a cube was built from."""
    h = hashlib.sha256(source.model_dump_json().encode())
    for frame in frames:
        h.update(frame.time.isoformat().encode())
        if frame.path is not None:
            try:
                stat = os.stat(frame.path)
                h.update(f"{frame.path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except FileNotFoundError:
                h.update(f"{frame.path}|missing".encode())
    return h.hexdigest()


def source_grid(source: SourceConfig, frames: list[FrameRef]) -> Grid:
    """Grid of a source, read once from its first readable file."""
    if source.importer == "synthetic":
        return synthetic_grid(SyntheticParams.from_kwargs(source.importer_kwargs))
    errors = []
    for frame in frames:
        if frame.path and os.path.exists(frame.path):
            try:
                return read_grid(source, frame.path)
            except FrameReadError as err:
                errors.append(str(err))
    detail = f" ({errors[0]})" if errors else ""
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


def _read_block(frames: list[FrameRef], source: SourceConfig, grid: Grid):
    """Worker task: decode the frames of one time chunk of the cube.

    One task per storage chunk (rather than per file) means a chunk is decoded and written by
    the same worker: no frame is shipped between processes before it is written.
    """
    block = np.full((len(frames), *grid.shape), np.nan, dtype=np.float32)
    statuses = []
    for index, frame in enumerate(frames):
        data, status = read_frame_status(frame, source, grid)
        if data is not None:
            block[index] = data
        statuses.append(status)
    return block, statuses


def _statuses_of(result) -> list[dict]:
    return result[1]


def _block_of(result) -> np.ndarray:
    return result[0]


def ingest(
    source_name: str,
    cube_dir: str = "data/cubes",
    *,
    catalog: Catalog | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    scheduler: str | None = None,
    strict: bool = False,
    append: bool = False,
    latlon: bool = False,
    force: bool = False,
    progress: bool = True,
) -> IngestResult:
    """Ingest a catalog source into a CF zarr cube.

    Parameters
    ----------
    source_name : str
        Name of the source in the catalog.
    cube_dir : str
        Directory or fsspec URL under which ``<source>.zarr`` is written.
    catalog : Catalog, optional
        Defaults to :func:`nowcast.config.load_catalog`.
    start, end : datetime, optional
        Restrict the time range (default: the catalog's, else all files found).
    scheduler : str, optional
        Dask scheduler address, ``"threads"``, or None for a local cluster.
    strict : bool
        Make unreadable files fatal instead of skipping them.
    append : bool
        Add times after the end of an existing cube.
    latlon : bool
        Store 2-D ``lat``/``lon`` coordinates.
    force : bool
        Rebuild even if the cube is up to date.
    progress : bool
        Show a progress bar.

    Returns
    -------
    IngestResult
    """
    catalog = catalog or load_catalog()
    source = catalog[source_name]
    path = cube_path(cube_dir, source.name)
    frames = list_frames(source, start, end)
    digest = source_digest(source, frames)

    existing = None
    if storage.exists(path) and not force:
        existing = open_cube(path)
        if existing.attrs.get("source_files_digest") == digest and not append:
            return _result_from_cube(path, existing, up_to_date=True)
        if append:
            last = pd.Timestamp(existing["time"].values[-1]).to_pydatetime()
            frames = [f for f in frames if f.time > last]
            if not frames:
                return _result_from_cube(path, existing, up_to_date=True)
            # Fill the interval between the old end and the new data on the regular axis.
            frames = list_frames(source, last + timedelta(minutes=source.timestep), frames[-1].time)
        else:
            existing = None

    grid = source_grid(source, frames)
    with dask_client(scheduler) as client:
        step = CUBE_CHUNKS["time"]
        blocks = [frames[i : i + step] for i in range(0, len(frames), step)]
        results = client.map(_read_block, blocks, source=source, grid=grid, pure=False)
        statuses = [s for part in client.gather(client.map(_statuses_of, results)) for s in part]
        bad_grid = [s for s in statuses if s["state"] == "grid_mismatch"]
        if bad_grid:
            raise GridMismatchError(bad_grid[0]["reason"])
        skipped = [
            {"file": s["file"], "time": s["time"], "reason": s["reason"]}
            for s in statuses
            if s["state"] == "corrupt"
        ]
        if skipped and strict:
            listing = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped)
            raise FrameReadError(f"{len(skipped)} unreadable file(s) (--strict): {listing}")
        missing = [s["time"] for s in statuses if s["state"] == "missing"]

        rain_rate = da.concatenate(
            [
                da.from_delayed(
                    dask.delayed(_block_of)(result),
                    shape=(len(block), *grid.shape),
                    dtype=np.float32,
                )
                for result, block in zip(results, blocks, strict=True)
            ]
        )
        frame_valid = np.array([s["state"] == "ok" for s in statuses])
        times = [f.time for f in frames]

        report = {
            "n_files": len(frames),
            "n_read": int(frame_valid.sum()),
            "skipped": skipped,
            "missing_times": missing,
        }
        attrs = _cube_attrs(source, grid, report, digest)
        new = build_cube(rain_rate, times, frame_valid, grid, attrs, latlon=latlon)
        if existing is not None:
            new = _appended(existing, new, report, digest)

        with storage.atomic_path(path) as tmp:
            delayed_write = write_cube(new, tmp, compute=False)
            future = client.compute(delayed_write)
            if progress:
                show_progress(future)
            future.result()
        del results
    return _result_from_cube(path, open_cube(path))


def _cube_attrs(source: SourceConfig, grid: Grid, report: dict, digest: str) -> dict:
    now = datetime.utcnow().replace(microsecond=0).isoformat()
    return {
        "title": f"Rain rate from radar source '{source.name}'",
        "source": source.name,
        "institution": source.institution or grid.metadata.get("institution", ""),
        "importer": source.importer,
        "importer_kwargs": json.dumps(source.importer_kwargs, sort_keys=True),
        "timestep_minutes": int(source.timestep),
        "history": f"{now}Z nowcast ingest {source.name}",
        "ingest_report": json.dumps(report),
        "source_files_digest": digest,
        "source_metadata": grid.metadata_json,
    }


def _appended(existing: xr.Dataset, new: xr.Dataset, report: dict, digest: str) -> xr.Dataset:
    """Existing cube followed by new times, with merged ingest reports."""
    old_report = json.loads(existing.attrs.get("ingest_report", "{}"))
    merged_report = {
        "n_files": old_report.get("n_files", 0) + report["n_files"],
        "n_read": old_report.get("n_read", 0) + report["n_read"],
        "skipped": old_report.get("skipped", []) + report["skipped"],
        "missing_times": old_report.get("missing_times", []) + report["missing_times"],
    }
    existing = existing.drop_encoding()
    combined = xr.concat([existing, new.drop_vars("crs")], dim="time", data_vars="minimal")
    combined["crs"] = existing["crs"]
    combined.attrs = dict(new.attrs)
    combined.attrs["ingest_report"] = json.dumps(merged_report)
    combined.attrs["history"] = existing.attrs.get("history", "") + "\n" + new.attrs["history"]
    combined.attrs["source_files_digest"] = digest
    return combined


def _result_from_cube(path: str, ds: xr.Dataset, up_to_date: bool = False) -> IngestResult:
    report = json.loads(ds.attrs.get("ingest_report", "{}"))
    return IngestResult(
        path=path,
        n_times=int(ds.sizes["time"]),
        n_read=int(ds["frame_valid"].values.sum()),
        skipped=report.get("skipped", []),
        missing_times=report.get("missing_times", []),
        up_to_date=up_to_date,
    )
