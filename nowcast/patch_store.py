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
import os
import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from . import storage, transforms
from .config import ConfigError
from .windows import input_offsets, lead_offsets

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
        """Lagrangian samples of one source: regions read, then warped in one batch."""
        # torch only here: the store's tables and Eulerian samples do not need it.
        import torch

        from .warp import warp_regions

        group = self._group(source)
        frames, motion = group["frames"], group["motion"]
        n_frames = self.n_input_frames + self.n_target_frames
        margin, size = self.margin, self.patch_size + 2 * self.margin
        n_rows, n_cols = frames.shape[1:]
        regions = np.full((len(part), n_frames, size, size), np.nan, dtype=np.float32)
        fields = {}
        for k, row in enumerate(part.itertuples(index=False)):
            y0, x0 = row.y0 - margin, row.x0 - margin
            r0, r1 = max(y0, 0), min(y0 + size, n_rows)
            c0, c1 = max(x0, 0), min(x0 + size, n_cols)
            regions[k, :, r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] = frames[
                row.frame_start : row.frame_start + n_frames, r0:r1, c0:c1
            ]
            if row.motion_index not in fields:
                fields[row.motion_index] = motion[row.motion_index]
        transform, params = self.transform()
        stored = torch.from_numpy(regions)
        finite = torch.isfinite(stored)
        rain_rate = torch.where(finite, transform.inverse(torch.nan_to_num(stored), params), np.nan)
        coarse = torch.from_numpy(np.stack([fields[i] for i in part["motion_index"]]))
        origins = torch.from_numpy(part[["y0", "x0"]].to_numpy(np.int64) - margin)
        with torch.no_grad():
            moved, valid = warp_regions(
                rain_rate, coarse, origins, (n_rows, n_cols), self.n_input_frames, margin
            )
            values = transform.forward(torch.where(valid, moved, 0.0), params)
            values = torch.where(valid, values, 0.0)
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
