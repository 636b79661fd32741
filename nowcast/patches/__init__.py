"""The patch store: frames stored once, samples an index cut at load time.

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
samples are moved into the frame of their window's motion by :mod:`nowcast.advection.warp`, batched.
"""

from nowcast.patches.reader import PatchStore, evaluation_windows, open_patch_store

__all__ = ["PatchStore", "evaluation_windows", "open_patch_store"]
