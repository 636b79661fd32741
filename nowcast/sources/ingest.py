"""Ingest stage: catalog source -> CF zarr cube of rain rate (mm/h), streamed block by block.

Memory does not grow with the archive: the store is created empty (metadata and coordinates),
then each task decodes one time chunk of frames and writes it into its region of the store
itself. Only a small status record per frame comes back, a bounded number of tasks is in
flight, and every finished future is released at once. The tasks run on a Dask cluster or,
for a small job (:data:`IN_PROCESS_MAX_FRAMES`), on a thread pool of this process.

The store is built at ``<cube>.zarr.partial/cube.zarr`` and renamed to ``<cube>.zarr`` only
when complete. Each finished block leaves ``<cube>.zarr.partial/blocks/<n>.json`` (its status
records, written after its data), and ``build.json`` records the digest the partial store is
built for: a rerun with the same digest writes only the missing blocks, one with another digest
starts over. ``<cube>.zarr.lock`` keeps two ingests of one cube apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from tqdm import tqdm

from nowcast import parallel, storage
from nowcast.parallel import IN_PROCESS, active_client, bounded_results, task_executor
from nowcast.sources.catalog import (
    Catalog,
    FramePlan,
    FrameRef,
    SourceConfig,
    load_catalog,
    plan_frames,
)
from nowcast.sources.cube import (
    CUBE_CHUNKS,
    CUBE_SCHEMA_VERSION,
    build_cube,
    create_cube_store,
    cube_path,
    cube_segments,
    estimate_frame_bytes,
    finalize_cube,
    latlon_grid,
    open_cube,
    read_frames,
    segments_json,
    stored_time_chunks,
    write_frames,
)
from nowcast.sources.frames import read_frame_status, source_grid
from nowcast.sources.readers import FrameReadError, Grid, GridMismatchError

# Free space must exceed the estimate by this factor: compression varies with the weather.
DISK_SAFETY_FACTOR = 1.5
# Bytes besides the frames and lat/lon in the estimate: the zarr.json files, the consolidated
# metadata and the 1-D coordinates (about 18 KiB for a small cube).
METADATA_BYTES = 32 * 1024
# Frames decoded to estimate the size: compressed size grows with rain, and a few evenly spread
# frames can all fall in a dry spell and underestimate it.
N_ESTIMATE_SAMPLES = 8
# Default of ``ingest(in_process_max_frames=...)``: jobs up to this many frames run in a thread
# pool of this process when no scheduler is given. Decoding holds a process-wide netCDF lock, so
# more cores need worker processes, but starting and closing a local cluster has a fixed cost
# that only a large job on many cores earns back (docs/performance.md).
IN_PROCESS_MAX_FRAMES = 2000


@dataclass
class IngestResult:
    """What an ingest run did."""

    path: str
    n_times: int
    n_read: int
    skipped: list[dict] = field(default_factory=list)
    missing_times: list[str] = field(default_factory=list)
    up_to_date: bool = False
    n_segments: int = 1
    blocks_total: int = 0
    blocks_resumed: int = 0
    estimated_bytes: int = 0

    def summary(self) -> str:
        lines = [
            f"cube: {self.path}",
            f"times: {self.n_times} in {self.n_segments} segment(s), read: {self.n_read}, "
            f"missing: {len(self.missing_times)}, skipped: {len(self.skipped)}"
            + (" (already up to date)" if self.up_to_date else ""),
        ]
        if self.blocks_resumed:
            lines.append(f"resumed: {self.blocks_resumed} of {self.blocks_total} blocks")
        lines += [f"  skipped {s['file']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def source_digest(source: SourceConfig, frames: list[FrameRef], latlon: bool = False) -> str:
    """Digest of what a cube is built from: schema version, source entry, options and files.

    Files enter by path, size and mtime, so a changed or newly arrived file changes it.
    """
    h = hashlib.sha256(f"cube-schema-{CUBE_SCHEMA_VERSION}|latlon={latlon}|".encode())
    h.update(source.model_dump_json().encode())
    for frame in frames:
        h.update(frame.time.isoformat().encode())
        if frame.path is not None:
            try:
                stat = os.stat(frame.path)
                h.update(f"{frame.path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            except FileNotFoundError:
                h.update(f"{frame.path}|missing".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Block:
    """One time chunk of the cube: where it starts, and per frame the file to decode (a
    FrameRef) or, when appending, the index of the frame in the old cube (an int)."""

    index: int
    start: int
    items: tuple


def _write_block(block: Block, source: SourceConfig, grid: Grid, store: str, old_store: str | None):
    """Worker task: decode one time chunk, write it into its region, then record it as done.

    One task per storage chunk (rather than per file) means a chunk is decoded and written by
    the same worker, and no two tasks write the same chunk. Returns the status records only.
    """
    data = np.full((len(block.items), *grid.shape), np.nan, dtype=np.float32)
    statuses = []
    for k, item in enumerate(block.items):
        if isinstance(item, int):  # a frame of the cube being appended to
            data[k] = read_frames(old_store, item, item + 1)[0]
            continue
        frame, status = read_frame_status(item, source, grid)
        if frame is not None:
            data[k] = frame
        statuses.append(status)
    write_frames(store, block.start, data)
    # Written after the data: a block with a record is complete even if it is all NaN (zarr
    # stores no chunk for those, so chunk existence cannot tell).
    storage.write_text(_block_record(store, block.index), json.dumps({"statuses": statuses}))
    return statuses


def _block_record(store: str, index: int) -> str:
    return f"{_partial_dir(store)}/blocks/{index:08d}.json"


def _partial_dir(store: str) -> str:
    return store.rsplit("/", 1)[0]


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
    in_process_max_frames: int = IN_PROCESS_MAX_FRAMES,
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
        Where the blocks are decoded and written: a Dask scheduler address, ``"processes"``
        (a new local process cluster), ``"threads"`` (an in-process Dask cluster),
        ``"in-process"`` (a thread pool of this process, no cluster), or None: an active Dask
        client if there is one, else in-process for a job of at most ``in_process_max_frames``
        frames and a new local process cluster above that. The store written is the same
        either way.
    strict : bool
        Make unreadable files fatal instead of skipping them.
    append : bool
        Add times after the end of an existing cube. A gap longer than the source's
        ``max_gap_minutes`` starts a new segment, a shorter one is filled with NaN frames.
        The old chunks are hard-linked (object storage: copied server-side) into a new partial
        store that gets the new region, and that store replaces the cube: the old cube is never
        read into memory nor modified, and stays complete until the swap.
    latlon : bool
        Store 2-D ``lat``/``lon`` coordinates.
    force : bool
        Rebuild even if the cube is up to date.
    progress : bool
        Print block progress.
    in_process_max_frames : int, optional
        Largest job (frames to write) that runs in this process when no scheduler is given, by
        default :data:`IN_PROCESS_MAX_FRAMES`.

    Returns
    -------
    IngestResult

    Raises
    ------
    StoreLockedError
        If another ingest of the same cube is running.
    ConfigError
        Bad catalog entry or no readable file.
    DiskWriteError
        Not enough free disk space for the estimate (times :data:`DISK_SAFETY_FACTOR`).
    """
    catalog = catalog or load_catalog()
    source = catalog[source_name]
    path = cube_path(cube_dir, source.name)
    with storage.exclusive_lock(path + ".lock"):
        choose = functools.partial(_executor_kind, scheduler, in_process_max=in_process_max_frames)
        return _ingest_locked(
            source, path, start, end, choose, strict, append, latlon, force, progress
        )


def _ingest_locked(source, path, start, end, choose, strict, append, latlon, force, progress):
    full = plan_frames(source, start, end)
    digest = source_digest(source, full.frames, latlon)
    partial = path + ".partial"
    storage.restore_swapped_out(path)  # a swap killed between its two renames
    for stale in storage.stale_temporaries(path):  # left by killed runs
        storage.remove(stale)
    if force:
        storage.remove(partial)
    existing = open_cube(path) if storage.exists(path) and not force else None
    if existing is not None and append:
        if existing.attrs.get("cube_schema_version") != CUBE_SCHEMA_VERSION:
            print(f"{path}: written by another ingest (schema != {CUBE_SCHEMA_VERSION}): rebuild")
            existing, append = None, False
    elif existing is not None:
        if existing.attrs.get("source_files_digest") == digest:
            storage.remove(partial)  # left by a run killed after its rename
            return _result_from_cube(path, existing, up_to_date=True)
        existing = None

    if existing is not None:
        last = pd.Timestamp(existing["time"].values[-1]).to_pydatetime()
        plan = plan_frames(source, end=end, after=last)
        if not plan.frames:
            return _result_from_cube(path, existing, up_to_date=True)
        build_id = hashlib.sha256(
            f"{digest}|append|{existing.attrs.get('source_files_digest')}|"
            f"{existing.sizes['time']}".encode()
        ).hexdigest()
    else:
        plan, build_id = full, digest

    grid = source_grid(source, plan.frames)
    if existing is not None:
        _check_same_grid(existing, grid, path)
    layout = _layout(plan, existing, source)
    stores_latlon = latlon or (existing is not None and "lat" in existing.variables)
    estimate = _announce(source, plan, grid, path, layout, stores_latlon)
    store = f"{partial}/cube.zarr"
    if not _resumable(partial, build_id):
        storage.remove(partial)
        _create_partial(partial, store, build_id, layout, grid, source, latlon, existing, path)
    else:
        storage.remove_zarr_temporaries(store)  # chunk writes a kill cut short
    blocks = _blocks(plan, layout)
    done = _finished_blocks(store, blocks)
    if done:
        print(f"{path}: resuming: {len(done)} of {len(blocks)} blocks already written, skipped")
    statuses = _run_blocks(
        [b for b in blocks if b.index not in done],
        done,
        source,
        grid,
        store,
        path if existing is not None else None,
        choose,
        strict,
        progress,
    )
    report = _report(statuses, len(plan.frames))
    frame_valid = np.array([s["state"] == "ok" for s in statuses], bool)
    attrs = _cube_attrs(source, grid, report, digest)
    attrs["segments"] = segments_json(layout["times"], layout["segment"])
    if existing is not None:
        frame_valid = np.concatenate([existing["frame_valid"].values, frame_valid])
        attrs = _appended_attrs(existing, attrs, report)
    finalize_cube(store, frame_valid, attrs)
    with storage.writing(path):
        storage.replace(store, path)
    storage.remove(partial)
    result = _result_from_cube(path, open_cube(path))
    result.blocks_total, result.blocks_resumed = len(blocks), len(done)
    result.estimated_bytes = estimate
    return result


def _check_same_grid(existing: xr.Dataset, grid: Grid, path: str) -> None:
    for name, ours in (("x", grid.x), ("y", grid.y)):
        theirs = existing[name].values
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=0, atol=1e-6):
            raise GridMismatchError(
                f"{path}: the new files' {name} grid ({ours.size} values from {ours[0]:g} m) "
                f"differs from the cube's ({theirs.size} from {theirs[0]:g} m); "
                "rebuild with --force"
            )


def _layout(plan: FramePlan, existing: xr.Dataset | None, source: SourceConfig) -> dict:
    """The whole time axis of the cube being written (old frames first when appending)."""
    if existing is None:
        return {
            "times": np.asarray(plan.times, "datetime64[ns]"),
            "segment": plan.segment,
            "n_old": 0,
            "n_linked": 0,
        }
    old_segment = cube_segments(existing)
    last = pd.Timestamp(existing["time"].values[-1]).to_pydatetime()
    continues = plan.frames[0].time == last + timedelta(minutes=source.timestep)
    offset = int(old_segment[-1]) + (0 if continues else 1)
    n_old = int(existing.sizes["time"])
    n_total = n_old + len(plan.frames)
    step = _time_chunk(n_total)
    new_chunks = (step, *(min(CUBE_CHUNKS[d], existing.sizes[d]) for d in ("y", "x")))
    # Whole old time chunks are reused as they are when the chunking is the same.
    same = tuple(existing["rain_rate"].encoding.get("chunks", ())) == new_chunks
    return {
        "times": np.concatenate(
            [existing["time"].values, np.asarray(plan.times, "datetime64[ns]")]
        ),
        "segment": np.concatenate([old_segment, plan.segment + offset]).astype(np.int32),
        "n_old": n_old,
        "n_linked": (n_old // step) * step if same else 0,
    }


def _time_chunk(n_times: int) -> int:
    return min(CUBE_CHUNKS["time"], n_times)


def _blocks(plan: FramePlan, layout: dict) -> list[Block]:
    """Chunk-aligned blocks of the region to write (when appending, from the first old time
    chunk that is not reused on: old frames in it are copied)."""
    n_old, n_total, first = layout["n_old"], layout["times"].size, layout["n_linked"]
    step = _time_chunk(n_total)
    items = [*range(first, n_old), *plan.frames]
    return [
        Block(index=(first + i) // step, start=first + i, items=tuple(items[i : i + step]))
        for i in range(0, len(items), step)
    ]


def _announce(source, plan: FramePlan, grid: Grid, path: str, layout: dict, latlon: bool) -> int:
    """Print frames, segments, gap share and estimated size; stop if the disk is too small.

    The estimate is the frames' compressed size (:func:`_frame_bytes`), :data:`METADATA_BYTES`
    and, when the cube stores them, the 2-D lat/lon (:func:`_latlon_bytes`); the free space
    must exceed it by :data:`DISK_SAFETY_FACTOR`.
    """
    n = len(plan.frames)
    missing = int(n - plan.present.sum())
    estimate = int(_frame_bytes(source, plan, grid) * plan.present.sum()) + METADATA_BYTES
    estimate += _latlon_bytes(grid) if latlon else 0
    n_segments = len(np.unique(layout["segment"][layout["n_old"] :]))
    print(
        f"ingest {source.name}: {n} frames in {n_segments} segment(s), gap share "
        f"{missing / max(n, 1):.1%} ({missing} of {n} frames missing), "
        f"estimated {storage.format_bytes(estimate)} on disk -> {path}",
        flush=True,
    )
    storage.check_free_space(
        path,
        estimate * DISK_SAFETY_FACTOR,
        f"ingest (estimated {storage.format_bytes(estimate)}, x{DISK_SAFETY_FACTOR} safety margin)",
    )
    return estimate


def _latlon_bytes(grid: Grid) -> int:
    """Stored size of the 2-D lat/lon of ``latlon=True``, uncompressed at the dtype
    :func:`nowcast.sources.cube.latlon_grid` gives them: smooth fields of full-precision floats
    compress little (by a tenth to a fifth), so this upper bound is close."""
    itemsize = latlon_grid(grid.crs, grid.x[:1], grid.y[:1])[0].dtype.itemsize
    return 2 * grid.shape[0] * grid.shape[1] * itemsize


def _frame_bytes(source: SourceConfig, plan: FramePlan, grid: Grid) -> float:
    """Stored size of one frame, measured on a few decoded frames spread over the plan."""
    present = np.flatnonzero(plan.present)
    if not present.size:
        return 0.0
    picks = np.linspace(0, present.size - 1, min(N_ESTIMATE_SAMPLES, present.size)).astype(int)
    samples = []
    for index in np.unique(present[picks]):
        frame, _ = read_frame_status(plan.frames[index], source, grid)
        if frame is not None:
            samples.append(frame)
    return estimate_frame_bytes(samples)


def _resumable(partial: str, build_id: str) -> bool:
    record = storage.read_text(f"{partial}/build.json")
    try:
        return record is not None and json.loads(record).get("build_id") == build_id
    except ValueError:
        return False


def _create_partial(partial, store, build_id, layout, grid, source, latlon, existing, path):
    """Create the empty store (and, when appending, link the old complete time chunks), then
    ``build.json``: a partial store without it is incomplete and is redone."""
    n_total = layout["times"].size
    chunks = (_time_chunk(n_total), min(CUBE_CHUNKS["y"], grid.shape[0]))
    chunks += (min(CUBE_CHUNKS["x"], grid.shape[1]),)
    lazy = da.full((n_total, *grid.shape), np.nan, dtype=np.float32, chunks=chunks)
    frame_valid = np.zeros(n_total, bool)
    if existing is not None:
        frame_valid[: layout["n_old"]] = existing["frame_valid"].values
    ds = build_cube(
        lazy,
        layout["times"],
        frame_valid,
        grid,
        {"source": source.name},
        latlon=latlon or "lat" in (existing.variables if existing is not None else ()),
        segment=layout["segment"],
        max_gap_minutes=source.max_gap_minutes,
    )
    create_cube_store(ds, store)
    if existing is not None:
        for key in stored_time_chunks(path, layout["n_linked"] // chunks[0]):
            storage.link_or_copy(f"{path}/{key}", f"{store}/{key}")
    storage.write_text(f"{partial}/build.json", json.dumps({"build_id": build_id}))


def _finished_blocks(store: str, blocks: list[Block]) -> dict[int, list[dict]]:
    """Status records of the blocks a killed run finished (unreadable records are redone)."""
    wanted = {b.index for b in blocks}
    done = {}
    for name in storage.list_names(f"{_partial_dir(store)}/blocks"):
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        index = int(name[:-5])
        try:
            record = json.loads(storage.read_text(_block_record(store, index)) or "")
        except ValueError:
            continue
        if index in wanted:
            done[index] = record["statuses"]
    return done


def _run_blocks(todo, done, source, grid, store, old_store, choose, strict, progress):
    """Write the missing blocks; return every frame's status in time order.

    At most two tasks per worker thread are in flight (:func:`nowcast.parallel.bounded_results`),
    so neither the workers nor the scheduler hold more than a few blocks.
    """
    results = dict(done)
    for statuses in done.values():
        _check_grid(statuses)
    if todo:
        with task_executor(choose(todo)) as tasks:
            args = (source, tasks.share(grid), store, old_store)
            n = 2 * tasks.n_threads
            finished = bounded_results(tasks.executor, _write_block, todo, *args, in_flight=n)
            every = parallel.progress_interval(sys.stderr)  # tqdm's stream
            # Closed on an error too, so that a one-line error starts on its own line.
            with tqdm(total=len(todo), unit="block", desc="ingest", disable=not progress) as bar:
                bar.mininterval = every
                for block, statuses in finished:
                    results[block.index] = statuses
                    _check_grid(statuses)  # fatal at once; unreadable ones judged on them all
                    bar.update()
    statuses = [s for index in sorted(results) for s in results[index]]
    _check_unreadable(statuses, strict)
    return statuses


def _executor_kind(
    scheduler: str | None, todo: list[Block], in_process_max: int = IN_PROCESS_MAX_FRAMES
) -> str | None:
    """The ``scheduler`` for :func:`nowcast.parallel.task_executor`: as given, else an active
    Dask client, else in-process for a job of at most ``in_process_max`` frames and a new local
    cluster for a larger one."""
    if scheduler is not None or active_client() is not None:
        return scheduler
    n_frames = sum(len(block.items) for block in todo)
    return IN_PROCESS if n_frames <= in_process_max else None


def _check_grid(statuses: list[dict]) -> None:
    bad_grid = [s for s in statuses if s["state"] == "grid_mismatch"]
    if bad_grid:
        raise GridMismatchError(bad_grid[0]["reason"])


def _check_unreadable(statuses: list[dict], strict: bool) -> None:
    corrupt = [s for s in statuses if s["state"] == "corrupt"]
    if corrupt and strict:
        listing = "; ".join(f"{s['file']}: {s['reason']}" for s in corrupt)
        raise FrameReadError(f"{len(corrupt)} unreadable file(s) (--strict): {listing}")


def _report(statuses: list[dict], n_files: int) -> dict:
    return {
        "n_files": n_files,
        "n_read": sum(s["state"] == "ok" for s in statuses),
        "skipped": [
            {"file": s["file"], "time": s["time"], "reason": s["reason"]}
            for s in statuses
            if s["state"] == "corrupt"
        ],
        "missing_times": [s["time"] for s in statuses if s["state"] == "missing"],
    }


def _cube_attrs(source: SourceConfig, grid: Grid, report: dict, digest: str) -> dict:
    now = datetime.utcnow().replace(microsecond=0).isoformat()
    return {
        "title": f"Rain rate from radar source '{source.name}'",
        "source": source.name,
        "institution": source.institution or grid.metadata.get("institution", ""),
        "importer": source.importer,
        "importer_kwargs": json.dumps(source.importer_kwargs, sort_keys=True),
        "timestep_minutes": int(source.timestep),
        "max_gap_minutes": int(source.max_gap_minutes),
        "cube_schema_version": CUBE_SCHEMA_VERSION,
        "history": f"{now}Z nowcast ingest {source.name}",
        "ingest_report": json.dumps(report),
        "source_files_digest": digest,
        "source_metadata": grid.metadata_json,
    }


def _appended_attrs(existing: xr.Dataset, attrs: dict, report: dict) -> dict:
    """Attributes after an append: the old and new ingest reports merged, history extended."""
    old = json.loads(existing.attrs.get("ingest_report", "{}"))
    merged = {
        "n_files": old.get("n_files", 0) + report["n_files"],
        "n_read": old.get("n_read", 0) + report["n_read"],
        "skipped": old.get("skipped", []) + report["skipped"],
        "missing_times": old.get("missing_times", []) + report["missing_times"],
    }
    attrs = dict(attrs)
    attrs["ingest_report"] = json.dumps(merged)
    attrs["history"] = existing.attrs.get("history", "") + "\n" + attrs["history"]
    return attrs


def _result_from_cube(path: str, ds: xr.Dataset, up_to_date: bool = False) -> IngestResult:
    report = json.loads(ds.attrs.get("ingest_report", "{}"))
    return IngestResult(
        path=path,
        n_times=int(ds.sizes["time"]),
        n_read=int(ds["frame_valid"].values.sum()),
        skipped=report.get("skipped", []),
        missing_times=report.get("missing_times", []),
        up_to_date=up_to_date,
        n_segments=int(np.unique(cube_segments(ds)).size),
    )
