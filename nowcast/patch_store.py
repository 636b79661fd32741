"""The patch store (schema 2): frames stored once, samples an index cut at load time.

:class:`PatchStore` is the one reader of the store written by :mod:`nowcast.patches`; no other
module decodes its attributes or arrays. Layout (``docs/architecture.md``, "Patch store"):

- root group (xarray-openable, small): the sample table on ``sample`` (``source``, ``split``,
  ``start_time``, ``reference_time``, ``y0``, ``x0``, ``wet_fraction``, ``frame_start``,
  ``window``, and for Lagrangian stores ``motion_index``), the evaluation window table on
  ``window``, ``input_time`` / ``target_time`` and the JSON attributes;
- ``frames/<source>``: ``frames`` (frame, y, x) normalized rain rate, NaN where no data, of every
  frame used by a window with samples (a window's frames are consecutive there), with ``time``
  and ``cube_index``; Lagrangian stores add ``motion`` (motion_window, 2, yc, xc), the LK motion
  of each sampled window's inputs on a coarse grid.

A sample is ``frames[frame_start : frame_start + T, y0 : y0 + P, x0 : x0 + P]``; Lagrangian
samples are moved into the frame of their window's motion by :mod:`nowcast.warp`, batched.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from . import storage, transforms
from . import windows as window_rules
from .config import ConfigError
from .windows import SPLITS, input_offsets, lead_offsets

#: Version of the layout; a store of another version is rebuilt by ``nowcast patches``.
SCHEMA_VERSION = 2
FRAMES_GROUP = "frames"
JSON_ATTRS = ("normalization", "splits", "cube_paths", "source_crs", "config", "counts")
SAMPLE_COLUMNS = ("source", "split", "start_time", "reference_time", "y0", "x0", "wet_fraction")


@contextmanager
def quiet_zarr():
    """Silence zarr's notice that consolidated metadata is not in the v3 spec yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


def open_root(path: str) -> xr.Dataset:
    """The root group (sample and window tables, attributes) as a lazy xarray Dataset."""
    if not storage.exists(path):
        raise ConfigError(f"no patch store at {path}: run `nowcast patches CONFIG` first")
    with quiet_zarr():
        return xr.open_zarr(path, consolidated=True, chunks={})


def decode_attrs(attrs: dict) -> dict:
    """Store attributes with the JSON-encoded ones decoded."""
    info = dict(attrs)
    for key in JSON_ATTRS:
        if isinstance(info.get(key), str):
            info[key] = json.loads(info[key])
    return info


class PatchStore:
    """A patch store opened for reading.

    Use :meth:`open`. The object pickles without open file handles (zarr arrays are opened again
    in each process), so it can travel to ``DataLoader`` workers.

    Attributes
    ----------
    path : str
    attrs : dict
        Store attributes, JSON ones decoded.
    """

    def __init__(self, path: str, root: xr.Dataset):
        self.path = str(path)
        self.attrs = decode_attrs(root.attrs)
        self._table = _sample_table(root)
        self._windows = _window_table(root, self.cube_paths)
        self._pid = None
        self._arrays = None

    @classmethod
    def open(cls, path: str) -> PatchStore:
        """Open the store at ``path``.

        Raises
        ------
        ConfigError
            If there is no store, or it has an older layout (``nowcast patches`` rebuilds it).
        """
        root = open_root(str(path))
        version = int(root.attrs.get("store_schema_version", 1))
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{path}: patch store schema version {version}, this nowcast reads version "
                f"{SCHEMA_VERSION}: rerun `nowcast patches CONFIG` to rebuild it"
            )
        return cls(path, root)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _arrays=None)
        return state

    # ---- attributes ----------------------------------------------------------------------

    @property
    def n_input_frames(self) -> int:
        return int(self.attrs["n_input_frames"])

    @property
    def n_target_frames(self) -> int:
        return int(self.attrs["n_target_frames"])

    @property
    def timestep_minutes(self) -> int:
        return int(self.attrs["timestep_minutes"])

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def frame(self) -> str:
        """``"eulerian"`` or ``"lagrangian"``."""
        return str(self.attrs.get("frame", "eulerian"))

    @property
    def margin(self) -> int:
        """Pixels around a patch that Lagrangian trajectories may reach (0 for Eulerian)."""
        return int(self.attrs.get("margin", 0))

    @property
    def motion_stride(self) -> int:
        """Pixels between the nodes of a Lagrangian store's coarse motion grid."""
        return int(self.attrs.get("motion_stride", 1))

    @property
    def normalization(self) -> dict:
        """``{"method", "params", "fitted_on"}``."""
        return self.attrs["normalization"]

    @property
    def cube_paths(self) -> dict:
        """Source -> cube path."""
        return self.attrs["cube_paths"]

    @property
    def counts(self) -> dict:
        """``{"windows": {split: n}, "samples": {split: n}}``."""
        return self.attrs["counts"]

    @property
    def splits(self) -> dict:
        return self.attrs["splits"]

    def transform(self):
        """``(method, params)``: ``method.inverse(values, params)`` gives rain rate in mm/h."""
        return transforms.get_method(self.normalization["method"]), self.normalization["params"]

    # ---- tables --------------------------------------------------------------------------

    def windows(self, split: str | None = None) -> pd.DataFrame:
        """Full-domain evaluation windows: source, cube_path, start_time, reference_time, split."""
        table = self._windows
        if split is not None:
            table = table[table["split"] == split].reset_index(drop=True)
        return table.copy()

    def samples(self, split: str | None = None) -> pd.DataFrame:
        """Sample table: sample (index for :meth:`sample`), source, split, start_time,
        reference_time, y0, x0, wet_fraction."""
        table = self._table[["sample", *SAMPLE_COLUMNS]]
        if split is not None:
            table = table[table["split"] == split].reset_index(drop=True)
        return table.copy()

    def __len__(self) -> int:
        return len(self._table)

    # ---- samples -------------------------------------------------------------------------

    def _open(self) -> None:
        """Open the frame arrays once per process (zarr handles are not shared with workers)."""
        with quiet_zarr():
            group = zarr.open_group(self.path, mode="r")
            self._arrays = {source: group[f"{FRAMES_GROUP}/{source}"] for source in self.cube_paths}
        self._pid = os.getpid()

    def _group(self, source: str):
        if self._pid != os.getpid():
            self._open()
        return self._arrays[source]

    def cut(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Normalized values and validity of samples, (B, T, P, P) with T = inputs + targets.

        Values are float32, 0 where not valid (as the network sees them); Lagrangian samples
        are moved into the frame of their window's motion, one warp per source for the batch.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = self._table.iloc[indices]
        n_frames, size = self.n_input_frames + self.n_target_frames, self.patch_size
        values = np.empty((len(indices), n_frames, size, size), dtype=np.float32)
        valid = np.empty(values.shape, dtype=bool)
        for source, positions in rows.groupby("source", sort=False).indices.items():
            part = rows.iloc[positions]
            if self.frame == "lagrangian":
                values[positions], valid[positions] = self._warped(source, part)
                continue
            frames = self._group(source)["frames"]
            for k, row in zip(positions, part.itertuples(index=False), strict=True):
                block = frames[
                    row.frame_start : row.frame_start + n_frames,
                    row.y0 : row.y0 + size,
                    row.x0 : row.x0 + size,
                ]
                valid[k] = np.isfinite(block)
                values[k] = np.where(valid[k], block, 0.0)
        return values, valid

    def _warped(self, source: str, part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Lagrangian samples of one source, warped in one batch (:mod:`nowcast.warp`).

        The trajectories of the patch pixels come first (they need only the coarse motion);
        then each frame of each sample reads the box its displaced points fall in, which is
        about the patch, somewhere within ``margin`` pixels of it.
        """
        # torch only here: the store's tables and Eulerian samples do not need it.
        import torch

        from . import warp

        group = self._group(source)
        frames, motion = group["frames"], group["motion"]
        n_input, n_frames = self.n_input_frames, self.n_input_frames + self.n_target_frames
        domain = frames.shape[1:]
        windows, which = np.unique(part["motion_index"].to_numpy(), return_inverse=True)
        coarse = motion.get_orthogonal_selection((windows, slice(None), slice(None), slice(None)))
        origins = torch.from_numpy(part[["y0", "x0"]].to_numpy(np.int64).copy())
        points = warp.patch_points(origins, self.patch_size, torch.float32)
        transform, params = self.transform()
        with torch.inference_mode():
            moves = warp.window_displacements(
                torch.from_numpy(coarse[which]),
                self.motion_stride,
                domain,
                points,
                n_input,
                n_frames - n_input,
            )
            where = moves.add_(points[:, None])  # in place: 12 MB a batch of 8
            low, high = warp.frame_boxes(where, domain)
            boxes = warp.read_frame_boxes(
                frames, part["frame_start"].to_numpy(), low.numpy(), high.numpy()
            )
            moved, valid = warp.warp_frames(
                torch.from_numpy(boxes),
                low,
                where,
                domain,
                n_input,
                lambda values: transform.inverse(values, params),
            )
            values = torch.where(
                valid, transform.forward(torch.where(valid, moved, 0.0), params), 0.0
            )
        return values.numpy().astype(np.float32, copy=False), valid.numpy()

    def sample(self, index: int) -> xr.Dataset:
        """One sample as the network sees it, with its table entry.

        Returns
        -------
        xarray.Dataset
            ``inputs`` (input_time, y, x) and ``targets`` (target_time, y, x), normalized
            float32, 0 where no data; boolean ``input_mask`` and ``target_mask``; scalars
            ``source``, ``split``, ``reference_time``, ``start_time``, ``y0``, ``x0``,
            ``wet_fraction``. Lagrangian stores give the warped sample.
        """
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is not in the store ({len(self)} samples)")
        values, valid = self.cut([index])
        n_input, row = self.n_input_frames, self._table.iloc[index]
        step = self.timestep_minutes
        inputs, targets = ("input_time", "y", "x"), ("target_time", "y", "x")
        return xr.Dataset(
            {
                "inputs": (inputs, values[0, :n_input]),
                "targets": (targets, values[0, n_input:]),
                "input_mask": (inputs, valid[0, :n_input]),
                "target_mask": (targets, valid[0, n_input:]),
            },
            coords={
                "input_time": input_offsets(n_input, step),
                "target_time": lead_offsets(self.n_target_frames, step),
                "sample": index,
                **{name: row[name] for name in SAMPLE_COLUMNS},
            },
            attrs={"frame": self.frame},
        )


def _sample_table(root: xr.Dataset) -> pd.DataFrame:
    names = [
        name
        for name in (*SAMPLE_COLUMNS, "frame_start", "window", "motion_index")
        if name in root.variables
    ]
    table = pd.DataFrame({name: root[name].values for name in names})
    for name in ("source", "split"):
        table[name] = _strings(table[name].to_numpy())
    table.insert(0, "sample", np.arange(len(table)))
    return table


def _window_table(root: xr.Dataset, cube_paths: dict) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "source": _strings(root["window_source"].values),
            "start_time": root["window_start_time"].values.astype("datetime64[ns]"),
            "reference_time": root["window_reference_time"].values.astype("datetime64[ns]"),
            "split": _strings(root["window_split"].values),
        }
    )
    table.insert(1, "cube_path", table["source"].map(cube_paths))
    return table


def _strings(values) -> np.ndarray:
    """Plain Python strings (zarr v3 gives NumPy's variable-width StringDType)."""
    return np.asarray(values).astype(object).astype(str).astype(object)


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


def normalize_frames(rain_rate: np.ndarray, normalization: dict, dtype: str) -> np.ndarray:
    """Normalized values of a block of frames as stored: NaN where there is no data."""
    method = transforms.get_method(normalization["method"])
    values = method.forward(rain_rate, normalization["params"])
    return np.where(np.isfinite(rain_rate), values, np.nan).astype(dtype)


def window_motions(
    cube: str, cube_starts: list[int], step: int, n_input: int, stride: int
) -> np.ndarray:
    """Coarse LK motion (window, 2, yc, xc) of the input frames of windows of one cube.

    The motion is :func:`nowcast.lagrangian.motion_field` of the full-resolution input frames,
    as at forecast time; one window's frames and full motion are in memory at a time.
    """
    from .lagrangian import coarse_motion, motion_field

    with quiet_zarr():
        rain_rate = zarr.open_group(cube, mode="r")["rain_rate"]
    fields = []
    for first in cube_starts:
        inputs = rain_rate[first : first + (n_input - 1) * step + 1 : step]
        fields.append(coarse_motion(motion_field(np.asarray(inputs, dtype=np.float64)), stride))
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


def frames_group(plan, config, n_input: int, n_frames: int, normalization: dict):
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
    frame_ids = window_rules.window_frame_indices(starts, n_frames)
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
            {"long_name": f"normalized rain rate ({normalization['method']}); NaN = no data"},
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
    cube: str, cube_indices: np.ndarray, normalization: dict, dtype: str, block: int = 6
) -> np.ndarray:
    """Normalized frames of one shard, read from the cube ``block`` frames at a time.

    The output is filled in place, so a task holds one shard of ``dtype`` plus one block of
    float32 frames; letting dask slice, rechunk and normalize the whole shard in float32 held
    about 8x the shard, per thread.
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


def _lazy_motion(plan, starts: np.ndarray, stride: int, n_input: int):
    """Coarse motion of the windows starting at ``starts``: one task per shard of windows."""
    import dask
    import dask.array as da

    from .lagrangian import coarse_grid_shape

    shape = coarse_grid_shape(plan.rain_rate.shape[1:], stride)
    cube_starts = plan.timeline.cube_index[starts]
    pieces = []
    for begin in range(0, len(starts), MOTION_SHARD):
        chunk = [int(s) for s in cube_starts[begin : begin + MOTION_SHARD]]
        task = dask.delayed(window_motions, pure=True)(
            plan.path, chunk, plan.timeline.step, n_input, stride
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
                    reference_time=window_rules.reference_times(start_time, n_input, step),
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
            window_rules.input_offsets(n_input, step),
            {"long_name": "input frame time minus reference_time"},
        ),
        "target_time": (
            "target_time",
            window_rules.lead_offsets(n_target, step),
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
    from .parallel import show_progress

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
            # Imported only here: nowcast.lagrangian brings pysteps and torch, about 8 s of
            # client CPU that an Eulerian build does not need.
            from .lagrangian import trajectory_margin

            max_speed = max(float(value) for value in results[len(writes) :])
            root = zarr.open_group(path, mode="r+")
            root.attrs["margin"] = trajectory_margin(max_speed, content.n_input, content.n_target)
            root.attrs["max_motion_speed"] = max_speed
        zarr.consolidate_metadata(path)
