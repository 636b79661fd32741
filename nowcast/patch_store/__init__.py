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

from .layout import SCHEMA_VERSION, decode_attrs, normalize_frames, open_root, quiet_zarr
from .reader import PatchStore, evaluation_windows, open_patch_store
from .writer import (
    FRAME_CHUNK,
    StoreContent,
    frames_group,
    root_dataset,
    sample_table,
    shard_frames,
    window_motions,
    write_store,
)

__all__ = [
    "FRAME_CHUNK",
    "SCHEMA_VERSION",
    "PatchStore",
    "StoreContent",
    "decode_attrs",
    "evaluation_windows",
    "open_patch_store",
    "frames_group",
    "normalize_frames",
    "open_root",
    "quiet_zarr",
    "root_dataset",
    "sample_table",
    "shard_frames",
    "window_motions",
    "write_store",
]
