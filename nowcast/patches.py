"""Patches stage: radar cubes -> normalized zarr store of patch sequences for training.

For each source of an experiment the cube's time axis (optionally subsampled to a common
``resample_minutes``) is labelled train / val / test in contiguous time blocks, either by
fractions of the source's time span or by explicit time ranges. A buffer is then carved out of
the lower-priority side of each boundary (train gives way to val and test, val to test), so that
windows of different splits are at least ``buffer_minutes`` apart.

A window is ``n_input_frames + n_target_frames`` consecutive frames that are all valid (read from
a file) and all carry the same split label, so no window crosses a gap or a split boundary. Every
window is listed for full-domain evaluation (``window`` dimension). Spatial patches of
``patch_size`` pixels every ``stride`` pixels are cut out of the windows; a patch is "wet" when
the fraction of its pixels at or above ``rain_threshold`` over the target frames (or the whole
window, ``wet_fraction_over``) reaches ``min_wet_fraction``. All wet patches are kept, plus a
seeded random draw of dry ones making up ``dry_share`` of the kept patches.

Values are normalized with :mod:`nowcast.transforms`, fitted on the train windows' frames only.
No-data (NaN) is written as 0 and recorded in ``input_mask`` / ``target_mask``. The store layout
is documented in ``docs/architecture.md`` ("Patch store").
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from pydantic import Field, field_validator, model_validator

from . import __version__, storage
from . import transforms as normalization_methods
from .config import ConfigError, StrictModel, load_catalog
from .experiment import ExperimentConfig, load_experiment, stage_config
from .io.cube import cube_path, open_cube
from .parallel import dask_client, show_progress

SPLITS = ("train", "val", "test")
# A buffer is carved from the split that comes later in this order.
SPLIT_PRIORITY = ("test", "val", "train")
SplitName = Literal["train", "val", "test"]
PATCH_ARRAYS = ("inputs", "targets", "input_mask", "target_mask")
# One chunk per sample keeps a sample read to one chunk per array; grouping chunks in zarr
# shards of about this many bytes (of inputs) keeps the file count small, which matters for
# deleting and copying stores and on object storage.
SHARD_BYTES = 16 * 2**20


class TimeRange(StrictModel):
    """Frame times ``start`` to ``end``, both included (UTC; an offset is converted to UTC)."""

    start: datetime
    end: datetime

    @field_validator("start", "end")
    @classmethod
    def _naive_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self


class PatchesConfig(StrictModel):
    """The ``patches:`` section of an experiment config."""

    n_input_frames: int | None = Field(
        None, ge=1, description="input frames; default one hour at the (resampled) timestep"
    )
    n_target_frames: int | None = Field(
        None, ge=1, description="target frames; default one hour at the (resampled) timestep"
    )
    resample_minutes: int | None = Field(
        None, gt=0, description="common timestep: keep clock-aligned frames at this step"
    )
    patch_size: int = Field(128, ge=2, description="patch edge in pixels")
    stride: int = Field(64, ge=1, description="pixels between patch origins")
    split_fractions: dict[SplitName, float] = Field(
        default_factory=lambda: {"train": 0.6, "val": 0.2, "test": 0.2},
        description="share of each source's time span per split (ignored with split_times)",
    )
    block_pattern: list[SplitName] = Field(
        default_factory=lambda: list(SPLITS),
        description="order of the split blocks within one cycle",
    )
    n_cycles: int = Field(1, ge=1, description="repetitions of block_pattern over the span")
    split_times: dict[SplitName, list[TimeRange]] | None = Field(
        None, description="explicit ranges per split; one split may be left out: it takes the rest"
    )
    buffer_minutes: int = Field(60, ge=0, description="minimum time between windows of two splits")
    rain_threshold: float = Field(0.5, ge=0, description="mm/h for a pixel to count as wet")
    min_wet_fraction: float = Field(0.05, ge=0, le=1, description="wet-pixel share of a wet patch")
    wet_fraction_over: Literal["target", "window"] = Field(
        "target", description="frames over which the wet fraction is computed"
    )
    min_valid_fraction: float = Field(
        0.5, ge=0, le=1, description="patches with less valid (non-NaN) data are not used"
    )
    dry_share: float = Field(0.1, ge=0, lt=1, description="share of kept patches that are dry")
    max_samples_per_split: int | None = Field(
        None, ge=1, description="seeded random subset of at most this many patches per split"
    )
    seed: int = 0
    normalization: str = Field("log1p", description="nowcast.transforms method")
    normalization_kwargs: dict[str, float] = Field(default_factory=dict)
    dtype: Literal["float16", "float32"] = "float16"
    frame: Literal["eulerian", "lagrangian"] = Field(
        "eulerian",
        description="lagrangian: inputs advected to the reference time and targets back to it "
        "along the LK motion of the inputs (nowcast.lagrangian), for advection-aware models",
    )
    min_windows: int = Field(1, ge=1, description="fewer windows in any split is an error")
    max_fit_values: int = Field(
        20_000_000, ge=1000, description="pixels used to fit the normalization (spatial subsample)"
    )
    samples_per_shard: int | None = Field(
        None, ge=1, description="samples per zarr shard file; default about 16 MiB of inputs"
    )

    @field_validator("normalization")
    @classmethod
    def _known_normalization(cls, value: str) -> str:
        normalization_methods.get_method(value)
        return value

    @model_validator(mode="after")
    def _consistent_splits(self) -> PatchesConfig:
        if self.split_times is not None:
            left_out = [s for s in SPLITS if s not in self.split_times]
            if len(left_out) > 1:
                raise ValueError(
                    f"split_times leaves out {left_out}; at most one split may take the rest"
                )
            return self
        missing = [s for s in SPLITS if self.split_fractions.get(s, 0.0) <= 0]
        if missing:
            raise ValueError(f"split_fractions must give every split a share > 0: {missing}")
        total = sum(self.split_fractions.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"split_fractions must sum to 1, not {total}")
        absent = [s for s in SPLITS if s not in self.block_pattern]
        if absent:
            raise ValueError(f"block_pattern must contain every split; missing {absent}")
        return self


# --------------------------------------------------------------------------------------------
# time axis, splits and windows


def default_frame_counts(timestep_minutes: int) -> tuple[int, int]:
    """One hour of input and one hour of target frames (10 min -> 6/6, 5 min -> 12/12)."""
    if 60 % timestep_minutes:
        raise ConfigError(
            f"no default n_input_frames/n_target_frames for a {timestep_minutes}-minute "
            "timestep; set them in the patches section"
        )
    n = 60 // timestep_minutes
    return n, n


def resampled_frames(
    times: np.ndarray, source_step: int, resample_minutes: int | None
) -> tuple[int, int]:
    """First cube index and index step of the frames kept at ``resample_minutes``.

    Kept frames are aligned to the clock (minutes since midnight divisible by the step), so that
    sources with different timesteps are resampled to the same times.
    """
    if resample_minutes is None or resample_minutes == source_step:
        return 0, 1
    if resample_minutes % source_step:
        raise ConfigError(
            f"resample_minutes={resample_minutes} is not a multiple of the source timestep "
            f"({source_step} min)"
        )
    minutes = (times - times.astype("datetime64[D]")) // np.timedelta64(1, "m")
    aligned = np.flatnonzero(minutes % resample_minutes == 0)
    first = int(aligned[0]) if aligned.size else 0
    return first, resample_minutes // source_step


def labels_by_fraction(
    n_frames: int, fractions: dict[str, float], pattern: list[str], n_cycles: int
) -> np.ndarray:
    """Split label of each frame: contiguous blocks following ``pattern``, ``n_cycles`` times.

    A split that appears several times in the pattern shares its fraction between its blocks.
    """
    occurrences = Counter(pattern)
    blocks = list(pattern) * n_cycles
    weights = np.array([fractions[s] / occurrences[s] for s in blocks])
    edges = np.rint(np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * n_frames)
    labels = np.full(n_frames, "", dtype=object)
    for split, start, stop in zip(
        blocks, edges[:-1].astype(int), edges[1:].astype(int), strict=True
    ):
        labels[start:stop] = split
    return labels


def labels_by_time(times: np.ndarray, split_times: dict[str, list[TimeRange]]) -> np.ndarray:
    """Split label of each frame from explicit time ranges; a left-out split takes the rest."""
    labels = np.full(times.shape, "", dtype=object)
    for split, ranges in split_times.items():
        for time_range in ranges:
            inside = (times >= np.datetime64(time_range.start)) & (
                times <= np.datetime64(time_range.end)
            )
            clash = sorted(set(labels[inside]) - {"", split})
            if clash:
                raise ConfigError(
                    f"split_times: {split} range {time_range.start} - {time_range.end} overlaps "
                    f"split {clash[0]}"
                )
            labels[inside] = split
    rest = [s for s in SPLITS if s not in split_times]
    if rest:
        labels[labels == ""] = rest[0]
    return labels


def carve_buffer(times: np.ndarray, labels: np.ndarray, buffer_minutes: int) -> np.ndarray:
    """Unlabel frames closer than ``buffer_minutes`` to a frame of a higher-priority split.

    Test frames are never removed; val frames give way to test, train frames to val and test.
    After this, any two frames of different splits are at least ``buffer_minutes`` apart.
    """
    labels = labels.copy()
    if buffer_minutes <= 0:
        return labels
    buffer = np.timedelta64(buffer_minutes, "m")
    for rank, split in enumerate(SPLIT_PRIORITY[1:], start=1):
        higher = np.sort(times[np.isin(labels, SPLIT_PRIORITY[:rank])])
        if higher.size == 0:
            continue
        own = np.flatnonzero(labels == split)
        position = np.searchsorted(higher, times[own])
        after = higher[np.minimum(position, higher.size - 1)]
        before = higher[np.maximum(position - 1, 0)]
        near = (np.abs(after - times[own]) < buffer) | (np.abs(times[own] - before) < buffer)
        labels[own[near]] = ""
    return labels


def label_blocks(times: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Contiguous runs of one split label: ``{split, start, end}`` (ISO, ``end`` included)."""
    blocks = []
    start = 0
    for index in range(1, len(labels) + 1):
        if index == len(labels) or labels[index] != labels[start]:
            if labels[start]:
                blocks.append(
                    {
                        "split": str(labels[start]),
                        "start": _iso(times[start]),
                        "end": _iso(times[index - 1]),
                    }
                )
            start = index
    return blocks


def valid_windows(frame_valid: np.ndarray, labels: np.ndarray, n_frames: int) -> np.ndarray:
    """First-frame indices of windows whose frames are all valid and in the same split."""
    n_windows = len(labels) - n_frames + 1
    if n_windows <= 0:
        return np.zeros(0, dtype=int)
    frames = np.arange(n_windows)[:, None] + np.arange(n_frames)[None, :]
    same_split = (labels[frames] == labels[frames[:, :1]]).all(axis=1)
    labelled = labels[:n_windows] != ""
    all_valid = frame_valid[frames].all(axis=1)
    return np.flatnonzero(same_split & labelled & all_valid)


# --------------------------------------------------------------------------------------------
# patch statistics and selection


def patch_origins(n_rows: int, n_cols: int, patch_size: int, stride: int):
    """Row and column indices of patch origins on a ``stride`` grid inside the domain."""
    if patch_size > min(n_rows, n_cols):
        raise ConfigError(
            f"patch_size={patch_size} is larger than the grid ({n_rows} x {n_cols} pixels)"
        )
    return np.arange(0, n_rows - patch_size + 1, stride), np.arange(
        0, n_cols - patch_size + 1, stride
    )


def _patch_counts_block(block: np.ndarray, patch_size: int, stride: int, threshold: float):
    """Per frame and patch origin: number of wet and of valid pixels, shape (t, 2, ny, nx)."""
    wet = (block >= threshold).astype(np.int32)
    valid = np.isfinite(block).astype(np.int32)
    counts = []
    for field in (wet, valid):
        windows = np.lib.stride_tricks.sliding_window_view(field, (patch_size, patch_size), (1, 2))
        counts.append(windows[:, ::stride, ::stride].sum(axis=(-2, -1), dtype=np.int32))
    return np.stack(counts, axis=1)


def patch_counts(rain_rate: da.Array, patch_size: int, stride: int, threshold: float) -> da.Array:
    """Wet and valid pixel counts per frame and patch origin (lazy), shape (t, 2, ny, nx)."""
    n_rows, n_cols = rain_rate.shape[1:]
    rows, cols = patch_origins(n_rows, n_cols, patch_size, stride)
    frames = rain_rate.rechunk({0: min(6, rain_rate.shape[0]), 1: -1, 2: -1})
    return da.map_blocks(
        _patch_counts_block,
        frames,
        patch_size,
        stride,
        threshold,
        dtype=np.int32,
        new_axis=1,
        chunks=(frames.chunks[0], (2,), (len(rows),), (len(cols),)),
    )


def window_sums(counts: np.ndarray, starts: np.ndarray, first: int, n_frames: int):
    """Per-frame counts summed over frames ``start + first`` to ``start + first + n_frames - 1``.

    ``counts`` is (time, ...); the result is (window, ...), one row per entry of ``starts``.
    """
    cumulative = np.concatenate([np.zeros_like(counts[:1]), np.cumsum(counts, axis=0)])
    return cumulative[starts + first + n_frames] - cumulative[starts + first]


def select_patches(
    wet_fraction: np.ndarray, valid_fraction: np.ndarray, config: PatchesConfig, split: str
) -> np.ndarray:
    """Boolean (window, ny, nx) selection of the patches kept for one split.

    All wet patches with enough valid data, and a seeded draw of dry ones so that they are
    ``dry_share`` of the kept patches; then at most ``max_samples_per_split`` of them.
    """
    usable = valid_fraction >= config.min_valid_fraction
    wet = usable & (wet_fraction >= config.min_wet_fraction) & (wet_fraction > 0)
    dry_candidates = np.flatnonzero(usable & ~wet)
    keep = wet.ravel().copy()
    rng = np.random.default_rng([config.seed, SPLITS.index(split)])
    n_dry = round(keep.sum() * config.dry_share / (1.0 - config.dry_share))
    n_dry = min(n_dry, dry_candidates.size)
    if n_dry:
        keep[rng.choice(dry_candidates, size=n_dry, replace=False)] = True
    if config.max_samples_per_split is not None and keep.sum() > config.max_samples_per_split:
        chosen = rng.choice(np.flatnonzero(keep), size=config.max_samples_per_split, replace=False)
        keep[:] = False
        keep[chosen] = True
    return keep.reshape(wet_fraction.shape)


# --------------------------------------------------------------------------------------------
# per-source plan


class SourcePlan:
    """Frames, windows and selected patches of one source (plain NumPy, small)."""

    def __init__(self, source: str, path: str, cube: xr.Dataset):
        self.source = source
        self.path = path
        self.cube = cube
        self.cube_step = int(cube.attrs.get("timestep_minutes", 0)) or _infer_step(cube)

    def set_timeline(self, config: PatchesConfig) -> None:
        """Frames at the (resampled) timestep: ``times``, ``frame_valid``, lazy ``rain_rate``."""
        cube_times = self.cube["time"].values
        self.first, self.step = resampled_frames(
            cube_times, self.cube_step, config.resample_minutes
        )
        self.timestep = self.cube_step * self.step
        self.times = cube_times[self.first :: self.step]
        self.frame_valid = np.asarray(self.cube["frame_valid"].values, dtype=bool)[
            self.first :: self.step
        ]
        self.rain_rate = self.cube["rain_rate"].data[self.first :: self.step]

    def set_windows(self, config: PatchesConfig, n_input: int, n_target: int) -> None:
        """Split labels (buffer carved), their ``blocks``, and the valid windows of each split."""
        n_frames = n_input + n_target
        if n_frames > len(self.times):
            raise ConfigError(
                f"n_input_frames + n_target_frames = {n_input} + {n_target} = {n_frames} frames, "
                f"but the cube of source '{self.source}' has only {len(self.times)} frames at "
                f"{self.timestep} min ({self.path})"
            )
        if config.split_times is not None:
            labels = labels_by_time(self.times, config.split_times)
        else:
            labels = labels_by_fraction(
                len(self.times), config.split_fractions, config.block_pattern, config.n_cycles
            )
        self.labels = carve_buffer(self.times, labels, config.buffer_minutes)
        self.blocks = label_blocks(self.times, self.labels)
        self.window_starts = valid_windows(self.frame_valid, self.labels, n_frames)
        self.window_splits = self.labels[self.window_starts].astype(str)

    def select(self, counts: np.ndarray, config: PatchesConfig, n_input: int, n_target: int):
        """Choose patches; sets ``samples``: a DataFrame of (window, y0, x0, split, wet)."""
        if config.wet_fraction_over == "target":
            first, n_frames = n_input, n_target
        else:
            first, n_frames = 0, n_input + n_target
        pixels = config.patch_size**2
        wet_sum = window_sums(counts[:, 0], self.window_starts, first, n_frames)
        valid_sum = window_sums(counts[:, 1], self.window_starts, 0, n_input + n_target)
        wet_fraction = wet_sum / (n_frames * pixels)
        valid_fraction = valid_sum / ((n_input + n_target) * pixels)
        rows, cols = patch_origins(*self.rain_rate.shape[1:], config.patch_size, config.stride)
        tables = []
        for split in SPLITS:
            in_split = np.flatnonzero(self.window_splits == split)
            keep = select_patches(wet_fraction[in_split], valid_fraction[in_split], config, split)
            window, row, col = np.nonzero(keep)
            tables.append(
                pd.DataFrame(
                    {
                        "window": self.window_starts[in_split][window],
                        "y0": rows[row],
                        "x0": cols[col],
                        "split": split,
                        "wet_fraction": wet_fraction[in_split][window, row, col],
                    }
                )
            )
        self.samples = pd.concat(tables, ignore_index=True)


def _infer_step(cube: xr.Dataset) -> int:
    times = cube["time"].values
    if len(times) < 2:
        raise ConfigError("cannot infer the timestep of a one-frame cube")
    return int((times[1] - times[0]) // np.timedelta64(1, "m"))


def _iso(time) -> str:
    return pd.Timestamp(time).isoformat()


# --------------------------------------------------------------------------------------------
# normalization fit and patch extraction


def train_frame_indices(plan: SourcePlan, n_frames: int) -> np.ndarray:
    """Indices (on the plan's time axis) of all frames used by the plan's train windows."""
    starts = plan.window_starts[plan.window_splits == "train"]
    return np.unique((starts[:, None] + np.arange(n_frames)[None, :]).ravel())


def fit_normalization(
    plans: list[SourcePlan], config: PatchesConfig, n_frames: int, client
) -> dict:
    """Fit the normalization on the frames of the train windows (spatially subsampled).

    Returns
    -------
    dict
        ``{"method", "params", "fitted_on"}`` as recorded in the store.
    """
    method = normalization_methods.get_method(config.normalization)
    samples, described = [], []
    for plan in plans:
        frames = train_frame_indices(plan, n_frames)
        n_pixels = frames.size * plan.rain_rate.shape[1] * plan.rain_rate.shape[2]
        spatial_step = max(1, math.ceil(math.sqrt(n_pixels * len(plans) / config.max_fit_values)))
        samples.append(plan.rain_rate[:, ::spatial_step, ::spatial_step][frames])
        described.append(
            {"source": plan.source, "n_frames": int(frames.size), "spatial_step": spatial_step}
        )
    values = np.concatenate([part.ravel() for part in client.gather(client.compute(samples))])
    try:
        params = method.fit(values, **config.normalization_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"patches.normalization '{config.normalization}': {err}") from None
    return {
        "method": method.name,
        "params": params,
        "fitted_on": {"split": "train", "sources": described},
    }


def normalize_frames(rain_rate: np.ndarray, normalization: dict, dtype: str) -> np.ndarray:
    """Normalized values of a block of frames, 0 where there is no data."""
    method = normalization_methods.get_method(normalization["method"])
    values = method.forward(rain_rate, normalization["params"])
    return np.where(np.isfinite(rain_rate), values, 0.0).astype(dtype)


def _cube_rain_rate(cube: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return zarr.open_group(cube, mode="r")["rain_rate"]


def read_patches(
    part: dict, n_frames: int, patch_size: int, normalization: dict, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized values and validity (sample, time, y, x) of patches of one cube.

    Parameters
    ----------
    part : dict
        ``cube`` (path), ``first`` and ``step`` (cube index of frame 0 and frame step, see
        :func:`resampled_frames`), and per sample ``window`` (first frame, sorted), ``y0``, ``x0``.

    Notes
    -----
    Windows that overlap in time are read from the cube and normalized once, as one block of
    frames covering all their patches. With ``lagrangian_blocks`` (window -> full-domain values
    and validity from :func:`lagrangian_block`) the patches are cut from those instead.
    """
    windows, rows, cols = part["window"], part["y0"], part["x0"]
    n = len(windows)
    values = np.empty((n, n_frames, patch_size, patch_size), dtype=dtype)
    valid = np.empty((n, n_frames, patch_size, patch_size), dtype=bool)
    if "lagrangian_blocks" in part:
        for k, window in enumerate(windows):
            block_values, block_valid = part["lagrangian_blocks"][int(window)]
            region = (
                slice(None),
                slice(rows[k], rows[k] + patch_size),
                slice(cols[k], cols[k] + patch_size),
            )
            values[k], valid[k] = block_values[region], block_valid[region]
        return values, valid
    rain_rate = _cube_rain_rate(part["cube"])
    # A run is a stretch of non-decreasing, overlapping windows (a shard may hold the end of
    # one split and the start of the next, which can be earlier in time).
    gaps = np.diff(windows, prepend=windows[0] - n_frames)
    run_starts = np.flatnonzero((gaps >= n_frames) | (gaps < 0))
    for begin, stop in zip(run_starts, [*run_starts[1:], n], strict=True):
        t0, t1 = windows[begin], windows[stop - 1] + n_frames
        r0, c0 = rows[begin:stop].min(), cols[begin:stop].min()
        r1, c1 = rows[begin:stop].max() + patch_size, cols[begin:stop].max() + patch_size
        first, step = part["first"] + t0 * part["step"], part["step"]
        block = rain_rate[first : first + (t1 - t0 - 1) * step + 1 : step, r0:r1, c0:c1]
        block_values = normalize_frames(block, normalization, dtype)
        block_valid = np.isfinite(block)
        for k in range(begin, stop):
            region = (
                slice(windows[k] - t0, windows[k] - t0 + n_frames),
                slice(rows[k] - r0, rows[k] - r0 + patch_size),
                slice(cols[k] - c0, cols[k] - c0 + patch_size),
            )
            values[k], valid[k] = block_values[region], block_valid[region]
    return values, valid


def lagrangian_window(frames: np.ndarray, n_input: int) -> tuple[np.ndarray, np.ndarray]:
    """One full-domain window moved into the Lagrangian frame of its inputs.

    The motion comes from the input frames only (as at forecast time). Rain rate and the
    validity mask are advected along the same trajectories; a pixel is valid where its advected
    validity is ~1, so pixels that came from outside the radar range are no-data, not dry.

    Returns
    -------
    rain_rate, valid : numpy.ndarray
        (n_frames, y, x), NaN where not valid.
    """
    from .lagrangian import motion_field, move_frames, window_moves

    frames = np.asarray(frames, dtype=np.float64)
    moves = window_moves(motion_field(frames[:n_input]), n_input, frames.shape[0] - n_input)
    moved = move_frames(frames, moves)
    moved_valid = move_frames(np.isfinite(frames).astype(np.float64), moves)
    valid = (moved_valid > 0.99) & np.isfinite(frames[n_input - 1])[None]
    return np.where(valid, moved, np.nan).astype(np.float32), valid


def lagrangian_block(
    cube: str,
    first: int,
    step: int,
    n_frames: int,
    n_input: int,
    normalization: dict,
    dtype: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized values and validity of one full-domain window in its Lagrangian frame."""
    rain_rate = _cube_rain_rate(cube)
    frames = rain_rate[first : first + (n_frames - 1) * step + 1 : step]
    frames, frames_valid = lagrangian_window(frames, n_input)
    return normalize_frames(frames, normalization, dtype), frames_valid


def extract_shard(
    parts: list[dict], n_input: int, n_frames: int, patch_size: int, normalization: dict, dtype
):
    """The four patch arrays of one shard: inputs, targets, input_mask, target_mask.

    ``parts`` are the shard's consecutive samples grouped by source (see :func:`read_patches`).
    """
    read = [read_patches(part, n_frames, patch_size, normalization, dtype) for part in parts]
    values = np.concatenate([r[0] for r in read])
    valid = np.concatenate([r[1] for r in read])
    return values[:, :n_input], values[:, n_input:], valid[:, :n_input], valid[:, n_input:]


def lazy_patch_arrays(
    table: pd.DataFrame,
    plans: list[SourcePlan],
    config: PatchesConfig,
    n_input: int,
    n_target: int,
    normalization: dict,
) -> list[da.Array]:
    """Dask arrays of the four patch arrays, one dask chunk (and one task) per zarr shard.

    Each task reads the cube frames its samples need straight from the cube store; reading a
    few cube chunks twice is far cheaper than moving shared frames between Dask workers.
    """
    plan_of = {plan.source: plan for plan in plans}
    shard = shard_size(config, n_input, len(table))
    size = config.patch_size
    n_frames = n_input + n_target
    shapes = [(n_input, size, size), (n_target, size, size)] * 2
    dtypes = [config.dtype] * 2 + [bool] * 2
    # A Lagrangian window needs LK motion and advection of the whole domain: one task per
    # window, shared by every shard that holds its patches (a window's patches span several
    # shards on large grids).
    blocks = {}
    if config.frame == "lagrangian":
        for source, window in table[["source", "window"]].drop_duplicates().itertuples(False):
            plan = plan_of[source]
            blocks[source, int(window)] = dask.delayed(lagrangian_block, nout=2, pure=True)(
                plan.path,
                plan.first + int(window) * plan.step,
                plan.step,
                n_frames,
                n_input,
                normalization,
                config.dtype,
            )
    pieces = []
    for begin in range(0, len(table), shard):
        rows = table.iloc[begin : begin + shard]
        source_runs = (rows["source"] != rows["source"].shift()).cumsum()
        parts = []
        for _, run in rows.groupby(source_runs, sort=False):
            source = run["source"].iloc[0]
            plan = plan_of[source]
            part = {
                "cube": plan.path,
                "first": plan.first,
                "step": plan.step,
                "window": run["window"].to_numpy(),
                "y0": run["y0"].to_numpy(),
                "x0": run["x0"].to_numpy(),
            }
            if blocks:
                part["lagrangian_blocks"] = {
                    int(w): blocks[source, int(w)] for w in np.unique(part["window"])
                }
            parts.append(part)
        outputs = dask.delayed(extract_shard, nout=4, pure=True)(
            parts, n_input, n_frames, size, normalization, config.dtype
        )
        pieces.append(
            [
                da.from_delayed(out, shape=(len(rows), *shape), dtype=dtype)
                for out, shape, dtype in zip(outputs, shapes, dtypes, strict=True)
            ]
        )
    return [da.concatenate([piece[k] for piece in pieces]) for k in range(4)]


# --------------------------------------------------------------------------------------------
# the store


def build_dataset(
    plans: list[SourcePlan],
    config: PatchesConfig,
    n_input: int,
    n_target: int,
    normalization: dict,
    attrs: dict,
) -> xr.Dataset:
    """Assemble the (lazy) patch-store Dataset; samples are ordered by split, source, time."""
    timestep = plans[0].timestep
    step = np.timedelta64(timestep, "m")
    tables = []
    for split in SPLITS:
        for plan in plans:
            samples = plan.samples[plan.samples["split"] == split].sort_values(
                ["window", "y0", "x0"]
            )
            if samples.empty:
                continue
            start_time = plan.times[samples["window"].to_numpy()]
            tables.append(
                samples.assign(
                    source=plan.source,
                    start_time=start_time,
                    reference_time=start_time + (n_input - 1) * step,
                )
            )
    table = pd.concat(tables, ignore_index=True)
    # Dask chunks are the zarr shards: two tasks never write to the same shard file.
    arrays = lazy_patch_arrays(table, plans, config, n_input, n_target, normalization)

    window_tables = []
    for split in SPLITS:
        for plan in plans:
            starts = plan.window_starts[plan.window_splits == split]
            window_tables.append(
                pd.DataFrame(
                    {
                        "window_source": plan.source,
                        "window_start_time": plan.times[starts],
                        "window_reference_time": plan.times[starts] + (n_input - 1) * step,
                        "window_split": split,
                    }
                )
            )
    windows = pd.concat(window_tables, ignore_index=True)

    dims_in = ("sample", "input_time", "y", "x")
    dims_out = ("sample", "target_time", "y", "x")
    value_attrs = {
        "long_name": f"normalized rain rate ({normalization['method']}); 0 where no data",
        "normalization": "see the store attribute 'normalization'",
    }
    mask_attrs = {"long_name": "True where the rain rate is valid data"}
    coords = {
        "input_time": (
            "input_time",
            (np.arange(n_input) - (n_input - 1)) * step.astype("timedelta64[ns]"),
            {"long_name": "input frame time minus reference_time"},
        ),
        "target_time": (
            "target_time",
            np.arange(1, n_target + 1) * step.astype("timedelta64[ns]"),
            {"long_name": "lead time of the target frame after reference_time"},
        ),
        "source": ("sample", table["source"].to_numpy(dtype=object)),
        "start_time": ("sample", _ns(table["start_time"]), {"long_name": "first input frame"}),
        "reference_time": (
            "sample",
            _ns(table["reference_time"]),
            {"long_name": "last input frame (forecast reference time)"},
        ),
        "y0": ("sample", table["y0"].to_numpy(np.int32), {"long_name": "first row in the cube"}),
        "x0": ("sample", table["x0"].to_numpy(np.int32), {"long_name": "first column in the cube"}),
        "split": ("sample", table["split"].to_numpy(dtype=object)),
        "wet_fraction": (
            "sample",
            table["wet_fraction"].to_numpy(np.float32),
            {"long_name": f"share of pixels >= rain_threshold over the {config.wet_fraction_over}"},
        ),
        "window_source": ("window", windows["window_source"].to_numpy(dtype=object)),
        "window_start_time": ("window", _ns(windows["window_start_time"])),
        "window_reference_time": ("window", _ns(windows["window_reference_time"])),
        "window_split": ("window", windows["window_split"].to_numpy(dtype=object)),
    }
    return xr.Dataset(
        {
            "inputs": (dims_in, arrays[0], value_attrs),
            "targets": (dims_out, arrays[1], value_attrs),
            "input_mask": (dims_in, arrays[2], mask_attrs),
            "target_mask": (dims_out, arrays[3], mask_attrs),
        },
        coords=coords,
        attrs=attrs,
    )


def shard_size(config: PatchesConfig, n_input: int, n_samples: int) -> int:
    """Samples per zarr shard."""
    if config.samples_per_shard is not None:
        return min(config.samples_per_shard, n_samples)
    sample_bytes = n_input * config.patch_size**2 * np.dtype(config.dtype).itemsize
    return int(np.clip(SHARD_BYTES // sample_bytes, 1, n_samples))


def _ns(values) -> np.ndarray:
    return np.asarray(values, dtype="datetime64[ns]")


def write_store(ds: xr.Dataset, path: str, client, progress: bool) -> None:
    """Write the store (zarr format 3, consolidated, one sample per chunk) on the cluster.

    The patch arrays' dask chunks along ``sample`` become the shards.
    """
    encoding = {
        name: {"chunks": (1, *ds[name].shape[1:]), "shards": ds[name].data.chunksize}
        for name in PATCH_ARRAYS
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        delayed_write = ds.to_zarr(
            path, mode="w", consolidated=True, zarr_format=3, encoding=encoding, compute=False
        )
    future = client.compute(delayed_write)
    if progress:
        show_progress(future)
    future.result()


def open_patch_store(path: str) -> xr.Dataset:
    """Open a patch store lazily with xarray."""
    if not storage.exists(path):
        raise ConfigError(f"no patch store at {path}: run `nowcast patches CONFIG` first")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_zarr(path, consolidated=True, chunks={})


def evaluation_windows(path: str, split: str | None = None) -> pd.DataFrame:
    """Full-domain windows of a store: source, start_time, reference_time, split."""
    ds = open_patch_store(path)
    table = pd.DataFrame(
        {
            "source": ds["window_source"].values.astype(object),
            "start_time": ds["window_start_time"].values,
            "reference_time": ds["window_reference_time"].values,
            "split": ds["window_split"].values.astype(object),
        }
    )
    if split is not None:
        table = table[table["split"] == split].reset_index(drop=True)
    return table


# --------------------------------------------------------------------------------------------
# the stage


def _experiment(config: str | Path | ExperimentConfig) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    return load_experiment(config)


def _open_sources(experiment: ExperimentConfig) -> list[SourcePlan]:
    plans = []
    for source in experiment.sources:
        path = cube_path(experiment.cube_root, source)
        if not storage.exists(path):
            catalog = load_catalog(experiment.catalog)
            if source not in catalog.sources:
                known = ", ".join(sorted(catalog.sources))
                raise ConfigError(
                    f"experiment '{experiment.name}': unknown source '{source}'; "
                    f"the catalog has: {known}"
                )
            raise ConfigError(
                f"experiment '{experiment.name}': no cube for source '{source}' at {path}; "
                f"run `nowcast ingest {source}` (cube_dir: {experiment.cube_dir})"
            )
        plans.append(SourcePlan(source, path, open_cube(path)))
    return plans


def _frame_counts(plans: list[SourcePlan], config: PatchesConfig) -> tuple[int, int]:
    steps = {plan.source: plan.timestep for plan in plans}
    if len(set(steps.values())) > 1:
        raise ConfigError(
            f"sources have different timesteps {steps} (minutes); set patches.resample_minutes "
            "to a common multiple"
        )
    default_in, default_out = default_frame_counts(plans[0].timestep)
    return config.n_input_frames or default_in, config.n_target_frames or default_out


def build_digest(config: PatchesConfig, plans: list[SourcePlan]) -> str:
    """Digest of the patches config and of the cubes it reads (their ingest digest and history)."""
    h = hashlib.sha256(config.model_dump_json().encode())
    h.update(__version__.encode())
    for plan in plans:
        h.update(plan.path.encode())
        h.update(str(plan.cube.attrs.get("source_files_digest", "")).encode())
        h.update(str(plan.cube.attrs.get("history", "")).encode())
    return h.hexdigest()


def _check_counts(plans: list[SourcePlan], config: PatchesConfig, n_input: int, n_target: int):
    windows = {s: sum(int((p.window_splits == s).sum()) for p in plans) for s in SPLITS}
    samples = {s: sum(int((p.samples["split"] == s).sum()) for p in plans) for s in SPLITS}
    detail = (
        f"windows per split: {_counts(windows)}; patches per split: {_counts(samples)} "
        f"(n_input_frames={n_input}, n_target_frames={n_target}, "
        f"buffer_minutes={config.buffer_minutes}, sources: {', '.join(p.source for p in plans)})"
    )
    short = [s for s in SPLITS if windows[s] < config.min_windows]
    if short:
        raise ConfigError(
            f"too few windows in split '{short[0]}' ({windows[short[0]]} < "
            f"min_windows={config.min_windows}); {detail}"
        )
    empty = [s for s in ("train", "val") if samples[s] == 0]
    if empty:
        raise ConfigError(
            f"no patches in split '{empty[0]}' (lower min_wet_fraction or raise dry_share); "
            f"{detail}"
        )
    return windows, samples


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


def _scheduler(scheduler: str | None) -> str | None:
    """The default cluster: an active client, else an in-process one.

    Unlike ingest (HDF5 and netCDF decoders hold a global lock), this stage is NumPy and zarr
    work that releases the GIL, and worker processes would only add start-up time and copies
    of cube frames between them (about twice the time on the BoM day).
    """
    if scheduler is not None:
        return scheduler
    from distributed import get_client

    try:
        get_client()
        return None
    except ValueError:
        return "threads"


def _existing_digest(path: str) -> str | None:
    try:
        return open_patch_store(path).attrs.get("build_digest")
    except Exception:  # an unreadable store is rebuilt
        return None


def build_patches(
    config: str | Path | ExperimentConfig,
    scheduler: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Build an experiment's patch store from its cubes.

    Parameters
    ----------
    config : str, Path or ExperimentConfig
        Experiment config file (``pipelines/configs/<name>.yaml``) or a loaded config.
    scheduler : str, optional
        Dask scheduler address, ``"threads"``, ``"processes"``, or None: the active Dask client
        if there is one, else an in-process cluster.
    force : bool
        Rebuild even if the store is up to date.
    progress : bool
        Show a progress bar.

    Returns
    -------
    str
        Path of the store (``<patch_dir>/<name>.zarr``).

    Raises
    ------
    ConfigError
        For an unknown source or missing cube, a window longer than a cube, or a split with too
        few windows (the message lists the counts per split).
    """
    experiment = _experiment(config)
    patches_config = stage_config(experiment, "patches", PatchesConfig)
    path = experiment.patch_store
    plans = _open_sources(experiment)
    for plan in plans:
        plan.set_timeline(patches_config)
    n_input, n_target = _frame_counts(plans, patches_config)
    digest = build_digest(patches_config, plans)
    if not force and storage.exists(path) and _existing_digest(path) == digest:
        for stale in storage.stale_temporaries(path):
            storage.remove(stale)
        return path

    for plan in plans:
        plan.set_windows(patches_config, n_input, n_target)

    with dask_client(_scheduler(scheduler)) as client:
        counts = client.compute(
            [
                patch_counts(
                    plan.rain_rate,
                    patches_config.patch_size,
                    patches_config.stride,
                    patches_config.rain_threshold,
                )
                for plan in plans
            ]
        )
        for plan, future in zip(plans, counts, strict=True):
            plan.select(future.result(), patches_config, n_input, n_target)
        window_counts, sample_counts = _check_counts(plans, patches_config, n_input, n_target)
        normalization = fit_normalization(plans, patches_config, n_input + n_target, client)
        attrs = _store_attrs(
            experiment,
            patches_config,
            plans,
            n_input,
            n_target,
            normalization,
            digest,
            {"windows": window_counts, "samples": sample_counts},
        )
        ds = build_dataset(plans, patches_config, n_input, n_target, normalization, attrs)
        with storage.atomic_path(path) as tmp:
            write_store(ds, tmp, client, progress)
    return path


def _store_attrs(
    experiment: ExperimentConfig,
    config: PatchesConfig,
    plans: list[SourcePlan],
    n_input: int,
    n_target: int,
    normalization: dict,
    digest: str,
    counts: dict,
) -> dict:
    now = datetime.now(timezone.utc).replace(microsecond=0, tzinfo=None).isoformat()
    splits = {
        "method": "times" if config.split_times is not None else "fractions",
        "buffer_minutes": config.buffer_minutes,
        "priority": list(SPLIT_PRIORITY),
        "blocks": {plan.source: plan.blocks for plan in plans},
    }
    if config.split_times is None:
        splits.update(
            fractions=config.split_fractions,
            block_pattern=config.block_pattern,
            n_cycles=config.n_cycles,
        )
    return {
        "Conventions": "CF-1.8",
        "title": f"Normalized radar patch sequences for experiment '{experiment.name}'",
        "experiment": experiment.name,
        "nowcast_version": __version__,
        "history": f"{now}Z nowcast patches {experiment.name}",
        "normalization": json.dumps(normalization),
        "frame": config.frame,
        "n_input_frames": int(n_input),
        "n_target_frames": int(n_target),
        "timestep_minutes": int(plans[0].timestep),
        "patch_size": int(config.patch_size),
        "stride": int(config.stride),
        "splits": json.dumps(splits),
        "cube_paths": json.dumps({plan.source: plan.path for plan in plans}),
        "source_crs": json.dumps(
            {plan.source: plan.cube["crs"].attrs["crs_wkt"] for plan in plans}
        ),
        "config": config.model_dump_json(),
        "counts": json.dumps(counts),
        "build_digest": digest,
    }
