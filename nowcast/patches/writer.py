"""Writing a patch store: :func:`nowcast.patches.build_patches` decides what goes in, this is
how it is laid out on disk."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from nowcast.parallel import show_progress
from nowcast.patches.layout import FRAMES_GROUP, normalize_frames, quiet_zarr
from nowcast.patches.normalization import Normalization
from nowcast.windows import (
    SPLITS,
    input_offsets,
    lead_offsets,
    reference_times,
    window_frame_indices,
)

# --------------------------------------------------------------------------------------------
# writing (nowcast.patches.build_patches decides what goes in; this is how it is laid out)

#: Storage chunk of the frames: a 128-pixel patch sequence of 12 frames reads 2-3 chunks in
#: time and 2-3 per axis (see benchmarks/bench_patches.py for the choice).
FRAME_CHUNK = (6, 64, 64)
#: Zarr shards group chunks into files of about this many bytes: few files to copy or delete,
#: and one dask task (one shard) holds a bounded block of frames whatever the archive length.
SHARD_BYTES = 16 * 2**20
#: Motion windows per shard file (one chunk per window) and per dask task.
MOTION_SHARD = 16


def window_motions(
    cube: str, cube_starts: list[int], step: int, n_input: int, node_spacing: int
) -> np.ndarray:
    """Coarse LK motion (window, 2, yc, xc) of the input frames of windows of one cube.

    The motion is :func:`nowcast.advection.motion.coarse_motion_field` of the full-resolution input
    frames, as at forecast time (the full-resolution LK field at the nodes, without computing
    it at every pixel); one window's frames are in memory at a time.
    """
    # Lazy (start-up time): nowcast.advection.motion brings pysteps, which an Eulerian build and the
    # Dask workers reading its frames never need.
    from nowcast.advection.motion import coarse_motion_field

    with quiet_zarr():
        rain_rate = zarr.open_group(cube, mode="r")["rain_rate"]
    fields = []
    for first in cube_starts:
        inputs = rain_rate[first : first + (n_input - 1) * step + 1 : step]
        fields.append(coarse_motion_field(np.asarray(inputs, dtype=np.float64), node_spacing))
    return np.stack(fields)


@dataclass
class StoreContent:
    """What :func:`write_store` writes: the root tables and, per source, the lazy frames group
    with its zarr encoding."""

    root: xr.Dataset
    groups: dict[str, xr.Dataset]
    encodings: dict[str, dict]
    n_input: int
    n_target: int

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes of the arrays :func:`write_store` writes: each source's frames
        (every frame of a sampled window once, full domain, at the store dtype), their
        Lagrangian motion and the root tables (sample and window tables). zarr compresses them
        (dry frames to little), so this is an upper bound for the free-space check; nothing is
        computed (the sizes of the lazy arrays are known)."""
        groups = sum(group.nbytes for group in self.groups.values())
        return int(self.root.nbytes + groups)


def frames_group(plan, config, n_input: int, n_frames: int, normalization: Normalization):
    """Lazy frames group of one source and its encoding; adds ``frame_start`` (and, Lagrangian,
    ``motion_index``) to the source's samples.

    Parameters
    ----------
    plan : nowcast.patches.SourcePlan
        ``timeline``, ``rain_rate`` (lazy, on the timeline), ``samples`` (with ``start``, the
        window's first timeline frame), ``source``, ``path``.
    config : nowcast.patches.PatchesConfig

    Returns
    -------
    tuple
        ``(xarray.Dataset, encoding)``. The frames are those of the windows with samples, each
        once and sorted, so a window's frames are consecutive; one dask chunk is one shard.
    """
    starts = np.unique(plan.samples["start"].to_numpy())
    frame_ids = window_frame_indices(starts, n_frames)
    plan.samples["frame_start"] = np.searchsorted(frame_ids, plan.samples["start"].to_numpy())
    n_rows, n_cols = plan.rain_rate.shape[1:]
    chunk = (FRAME_CHUNK[0], min(FRAME_CHUNK[1], n_rows), min(FRAME_CHUNK[2], n_cols))
    shard_area = [math.ceil(n / c) * c for n, c in zip((n_rows, n_cols), chunk[1:], strict=True)]
    frame_bytes = shard_area[0] * shard_area[1] * np.dtype(config.dtype).itemsize
    per_shard = max(1, SHARD_BYTES // frame_bytes // chunk[0]) * chunk[0]
    frames = _lazy_frames(
        plan.path,
        plan.timeline.cube_index[frame_ids],
        (n_rows, n_cols),
        per_shard,
        normalization,
        config.dtype,
    )
    data = {
        "frames": (
            ("frame", "y", "x"),
            frames,
            {"long_name": f"normalized rain rate ({normalization.method}); NaN = no data"},
        ),
        "time": ("frame", plan.timeline.times[frame_ids]),
        "cube_index": ("frame", plan.timeline.cube_index[frame_ids].astype(np.int64)),
    }
    encoding = {"frames": {"chunks": chunk, "shards": (per_shard, *shard_area)}}
    if config.frame == "lagrangian":
        plan.samples["motion_index"] = np.searchsorted(starts, plan.samples["start"].to_numpy())
        motion = _lazy_motion(plan, starts, config.motion_stride, n_input)
        data["motion"] = (("motion_window", "component", "yc", "xc"), motion)
        encoding["motion"] = {
            "chunks": (1, *motion.shape[1:]),
            "shards": (min(MOTION_SHARD, motion.shape[0]), *motion.shape[1:]),
        }
    group = xr.Dataset(data, attrs={"source": plan.source, "cube_path": plan.path})
    return group, encoding


def shard_frames(
    cube: str,
    cube_indices: np.ndarray,
    normalization: Normalization,
    dtype: str,
    block: int = 6,
) -> np.ndarray:
    """Normalized frames of one shard, read from the cube ``block`` frames at a time.

    The output is filled in place, so a task holds one shard of ``dtype`` plus one block of
    float32 frames; letting dask slice, rechunk and normalize the whole shard in float32 would
    hold several float32 copies of the shard per thread.
    """
    with quiet_zarr():
        rain_rate = zarr.open_group(cube, mode="r")["rain_rate"]
    out = np.empty((len(cube_indices), *rain_rate.shape[1:]), dtype=dtype)
    for begin in range(0, len(cube_indices), block):
        indices = np.asarray(cube_indices[begin : begin + block])
        if np.all(np.diff(indices) == 1):
            frames = rain_rate[int(indices[0]) : int(indices[-1]) + 1]
        else:
            frames = rain_rate.get_orthogonal_selection((indices, slice(None), slice(None)))
        out[begin : begin + len(indices)] = normalize_frames(frames, normalization, dtype)
    return out


def _lazy_frames(cube, cube_indices, shape, per_shard, normalization, dtype):
    """Dask array of a source's stored frames: one task, and one dask chunk, per zarr shard."""
    import dask
    import dask.array as da

    pieces = []
    for begin in range(0, len(cube_indices), per_shard):
        indices = cube_indices[begin : begin + per_shard]
        task = dask.delayed(shard_frames, pure=True)(cube, indices, normalization, dtype)
        pieces.append(da.from_delayed(task, shape=(len(indices), *shape), dtype=dtype))
    return da.concatenate(pieces)


def _lazy_motion(plan, starts: np.ndarray, node_spacing: int, n_input: int):
    """Coarse motion of the windows starting at ``starts``: one task per shard of windows."""
    import dask
    import dask.array as da

    from nowcast.advection.motion import coarse_grid_shape

    shape = coarse_grid_shape(plan.rain_rate.shape[1:], node_spacing)
    cube_starts = plan.timeline.cube_index[starts]
    pieces = []
    for begin in range(0, len(starts), MOTION_SHARD):
        chunk = [int(s) for s in cube_starts[begin : begin + MOTION_SHARD]]
        task = dask.delayed(window_motions, pure=True)(
            plan.path, chunk, plan.timeline.step, n_input, node_spacing
        )
        pieces.append(da.from_delayed(task, shape=(len(chunk), 2, *shape), dtype=np.float32))
    return da.concatenate(pieces)


def sample_table(plans: list, n_input: int, step: int) -> pd.DataFrame:
    """Samples of all sources ordered by split, source, time, then patch origin."""
    tables = []
    for split in SPLITS:
        for plan in plans:
            samples = plan.samples[plan.samples["split"] == split].sort_values(
                ["start", "y0", "x0"]
            )
            start_time = plan.timeline.times[samples["start"].to_numpy()]
            tables.append(
                samples.assign(
                    source=plan.source,
                    start_time=start_time,
                    reference_time=reference_times(start_time, n_input, step),
                )
            )
    return pd.concat(tables, ignore_index=True)


def root_dataset(plans: list, n_input: int, n_target: int, attrs: dict) -> xr.Dataset:
    """The root group: sample table, window table (ordered by split, source, time), time
    offsets and attributes. Call after :func:`frames_group` (it adds ``frame_start``)."""
    step = plans[0].timeline.timestep
    table = sample_table(plans, n_input, step)
    windows = pd.concat(
        [plan.windows[plan.windows["split"] == split] for split in SPLITS for plan in plans],
        ignore_index=True,
    )
    row_of = {key: k for k, key in enumerate(zip(windows["source"], windows["start"], strict=True))}
    columns = {
        "source": table["source"].to_numpy(dtype=object),
        "split": table["split"].to_numpy(dtype=object),
        "start_time": _ns(table["start_time"]),
        "reference_time": _ns(table["reference_time"]),
        "y0": table["y0"].to_numpy(np.int32),
        "x0": table["x0"].to_numpy(np.int32),
        "wet_fraction": table["wet_fraction"].to_numpy(np.float32),
        "frame_start": table["frame_start"].to_numpy(np.int64),
        "window": np.array(
            [row_of[key] for key in zip(table["source"], table["start"], strict=True)],
            dtype=np.int64,
        ),
    }
    if "motion_index" in table:
        columns["motion_index"] = table["motion_index"].to_numpy(np.int64)
    data = {name: ("sample", values) for name, values in columns.items()}
    data.update(
        window_source=("window", windows["source"].to_numpy(dtype=object)),
        window_start_time=("window", _ns(windows["start_time"])),
        window_reference_time=("window", _ns(windows["reference_time"])),
        window_split=("window", windows["split"].to_numpy(dtype=object)),
    )
    coords = {
        "input_time": (
            "input_time",
            input_offsets(n_input, step),
            {"long_name": "input frame time minus reference_time"},
        ),
        "target_time": (
            "target_time",
            lead_offsets(n_target, step),
            {"long_name": "lead time of the target frame after reference_time"},
        ),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def _ns(values) -> np.ndarray:
    return np.asarray(values, dtype="datetime64[ns]")


def write_store(content: StoreContent, path: str, client, progress: bool) -> None:
    """Write the store (zarr format 3, consolidated metadata) at ``path``.

    The root tables first, then the frame groups on the Dask cluster (one task per shard, so
    memory is bounded by a shard whatever the archive length), then the Lagrangian ``margin``
    from the largest motion written.
    """
    with quiet_zarr():
        content.root.to_zarr(path, mode="w", consolidated=False, zarr_format=3)
        writes, speeds = [], []
        for source, group in content.groups.items():
            if "motion" in group:
                speeds.append(abs(group["motion"].data).max())
            writes.append(
                group.to_zarr(
                    path,
                    group=f"{FRAMES_GROUP}/{source}",
                    mode="w",
                    consolidated=False,
                    zarr_format=3,
                    encoding=content.encodings[source],
                    compute=False,
                )
            )
        # One compute: the speed reductions share the motion tasks with the writes.
        futures = client.compute([*writes, *speeds])
        if progress:
            show_progress(futures)
        results = client.gather(futures)
        if speeds:
            # Imported only here: nowcast.advection.lagrangian brings pysteps and torch, import
            # time that an Eulerian build does not need.
            from nowcast.advection.lagrangian import trajectory_margin

            max_speed = max(float(value) for value in results[len(writes) :])
            root = zarr.open_group(path, mode="r+")
            root.attrs["margin"] = trajectory_margin(max_speed, content.n_input, content.n_target)
            root.attrs["max_motion_speed"] = max_speed
        zarr.consolidate_metadata(path)
