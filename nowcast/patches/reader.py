"""Reading a patch store: :class:`PatchStore`, the one reader of the layout."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from nowcast.config import ConfigError
from nowcast.patches.layout import (
    FRAMES_GROUP,
    SAMPLE_COLUMNS,
    SCHEMA_VERSION,
    decode_attrs,
    open_root,
    quiet_zarr,
)
from nowcast.patches.normalization import Normalization
from nowcast.windows import FrameSpec, input_offsets, lead_offsets


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
    def frame_spec(self) -> FrameSpec:
        """Input and target frames of a sample and their timestep."""
        return FrameSpec.from_attrs(self.attrs)

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def reference_frame(self) -> str:
        """``"eulerian"`` or ``"lagrangian"`` (the attribute ``frame``)."""
        return str(self.attrs.get("frame", "eulerian"))

    @property
    def margin(self) -> int:
        """Pixels around a patch that Lagrangian trajectories may reach (0 for Eulerian)."""
        return int(self.attrs.get("margin", 0))

    @property
    def motion_node_spacing(self) -> int:
        """Pixels between the nodes of a Lagrangian store's coarse motion grid (the attribute
        ``motion_stride``)."""
        return int(self.attrs.get("motion_stride", 1))

    @property
    def normalization(self) -> Normalization:
        """The normalization of the stored values (fitted on the training split)."""
        return Normalization.from_dict(self.attrs["normalization"])

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
            if self.reference_frame == "lagrangian":
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
        """Lagrangian samples of one source, warped in one batch (:mod:`nowcast.advection.warp`).

        The trajectories of the patch pixels come first (they need only the coarse motion);
        then each frame of each sample reads the box its displaced points fall in, which is
        about the patch, somewhere within ``margin`` pixels of it.
        """
        # torch only here (start-up time): the store's tables and Eulerian samples do not
        # need it.
        import torch

        from nowcast.advection import warp

        group = self._group(source)
        frames, motion = group["frames"], group["motion"]
        n_input, n_frames = self.n_input_frames, self.n_input_frames + self.n_target_frames
        domain = frames.shape[1:]
        windows, which = np.unique(part["motion_index"].to_numpy(), return_inverse=True)
        coarse = motion.get_orthogonal_selection((windows, slice(None), slice(None), slice(None)))
        origins = torch.from_numpy(part[["y0", "x0"]].to_numpy(np.int64).copy())
        points = warp.patch_points(origins, self.patch_size, torch.float32)
        normalization = self.normalization
        with torch.inference_mode():
            moves = warp.window_displacements(
                torch.from_numpy(coarse[which]),
                self.motion_node_spacing,
                domain,
                points,
                n_input,
                n_frames - n_input,
            )
            where = moves.add_(points[:, None])  # in place: no second batch of positions
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
                normalization.inverse,
            )
            values = torch.where(valid, normalization.forward(torch.where(valid, moved, 0.0)), 0.0)
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
            attrs={"frame": self.reference_frame},
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


def open_patch_store(path: str) -> xr.Dataset:
    """The store's root group with xarray: sample and window tables, attributes (lazy)."""
    return open_root(path)


def evaluation_windows(path: str, split: str | None = None) -> pd.DataFrame:
    """Full-domain windows of a store: source, cube_path, start_time, reference_time, split."""
    return PatchStore.open(path).windows(split)
