"""Patches stage: radar cubes -> normalized zarr patch store for training.

Windows (``n_input_frames + n_target_frames`` consecutive valid frames of one split and one
segment), split labels and the buffer between splits come from :mod:`nowcast.windows`. Spatial
patches of ``patch_size`` pixels every ``stride`` pixels are cut out of the windows; a patch is
"wet" when the fraction of its pixels at or above ``rain_threshold`` over the target frames (or
the whole window, ``wet_fraction_over``) reaches ``min_wet_fraction``. All wet patches are kept,
plus a seeded random draw of dry ones making up ``dry_share`` of the kept patches.

The store keeps each frame used by a sampled window once, normalized with
:mod:`nowcast.patches.normalization` (fitted on the train windows' frames only), NaN where
there is no data; a sample is an index (source, first frame, patch origin) cut at load time by
:class:`nowcast.patches.PatchStore`, the one reader of the layout (``docs/architecture.md``,
"Patch store"). A Lagrangian store (``frame: lagrangian``) adds each sampled window's LK motion
on a coarse grid; samples are advected at load time (:mod:`nowcast.advection.warp`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from pydantic import Field, field_validator, model_validator

from nowcast import __version__, storage
from nowcast.config import ConfigError, ExperimentConfig, StrictModel, load_experiment, stage_config
from nowcast.parallel import dask_client
from nowcast.patches.layout import SCHEMA_VERSION, existing_digest
from nowcast.patches.normalization import Normalization, get_method
from nowcast.patches.writer import (
    FRAME_CHUNK,
    StoreContent,
    frames_group,
    root_dataset,
    write_store,
)
from nowcast.sources.catalog import load_catalog
from nowcast.sources.cube import cube_path, open_cube
from nowcast.windows import (
    SPLIT_PRIORITY,
    SPLITS,
    Timeline,
    frame_counts,
    label_blocks,
    list_windows,
    split_labels,
    window_frame_indices,
)

SplitName = Literal["train", "val", "test"]


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
    normalization: str = Field("log1p", description="nowcast.patches.normalization method")
    normalization_kwargs: dict[str, float] = Field(default_factory=dict)
    dtype: Literal["float16", "float32"] = "float16"
    frame: Literal["eulerian", "lagrangian"] = Field(
        "eulerian",
        description="lagrangian: inputs advected to the reference time and targets back to it "
        "along the LK motion of the inputs (nowcast.advection.lagrangian), for "
        "advection-aware models",
    )
    min_windows: int = Field(1, ge=1, description="fewer windows in any split is an error")
    # Enough pixels for thousands of values above log1p's 99.9th percentile, few enough that the
    # fit's memory stays small.
    max_fit_values: int = Field(4_000_000, ge=1000, description="pixels fitting the normalization")
    motion_stride: int = Field(
        8,
        ge=1,
        description="lagrangian: pixels between the nodes of the stored coarse motion grid",
    )

    @field_validator("normalization")
    @classmethod
    def _known_normalization(cls, value: str) -> str:
        get_method(value)
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
# patch statistics and selection


def patch_origins(n_rows: int, n_cols: int, patch_size: int, patch_step: int):
    """Row and column indices of patch origins on a ``patch_step`` grid inside the domain."""
    if patch_size > min(n_rows, n_cols):
        raise ConfigError(
            f"patch_size={patch_size} is larger than the grid ({n_rows} x {n_cols} pixels)"
        )
    return np.arange(0, n_rows - patch_size + 1, patch_step), np.arange(
        0, n_cols - patch_size + 1, patch_step
    )


def _patch_counts_block(block: np.ndarray, patch_size: int, patch_step: int, threshold: float):
    """Per frame and patch origin: number of wet and of valid pixels, shape (t, 2, ny, nx)."""
    wet = (block >= threshold).astype(np.int32)
    valid = np.isfinite(block).astype(np.int32)
    counts = []
    for values in (wet, valid):
        windows = np.lib.stride_tricks.sliding_window_view(values, (patch_size, patch_size), (1, 2))
        counts.append(windows[:, ::patch_step, ::patch_step].sum(axis=(-2, -1), dtype=np.int32))
    return np.stack(counts, axis=1)


def patch_counts(
    rain_rate: da.Array, patch_size: int, patch_step: int, threshold: float
) -> da.Array:
    """Wet and valid pixel counts per frame and patch origin (lazy), shape (t, 2, ny, nx)."""
    n_rows, n_cols = rain_rate.shape[1:]
    rows, cols = patch_origins(n_rows, n_cols, patch_size, patch_step)
    frames = rain_rate.rechunk({0: min(6, rain_rate.shape[0]), 1: -1, 2: -1})
    return da.map_blocks(
        _patch_counts_block,
        frames,
        patch_size,
        patch_step,
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


@dataclass
class SourcePlan:
    """Timeline, windows and selected patches of one source (plain NumPy, small)."""

    timeline: Timeline
    cube: xr.Dataset
    labels: np.ndarray = None
    blocks: list = None
    windows: pd.DataFrame = None
    samples: pd.DataFrame = None

    @property
    def source(self) -> str:
        return self.timeline.source

    @property
    def path(self) -> str:
        return self.timeline.cube_path

    @property
    def rain_rate(self) -> da.Array:
        """Lazy rain rate of the timeline's frames (time, y, x)."""
        index = self.timeline.cube_index
        rain_rate = self.cube["rain_rate"].data
        if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
            return rain_rate[index[0] : index[0] + index.size]
        return rain_rate[index]

    def set_windows(self, config: PatchesConfig, n_input: int, n_target: int) -> None:
        """Split labels (buffer carved), their ``blocks``, and the valid windows of each split."""
        n_frames = n_input + n_target
        timeline = self.timeline
        if n_frames > len(timeline):
            raise ConfigError(
                f"n_input_frames + n_target_frames = {n_input} + {n_target} = {n_frames} frames, "
                f"but the cube of source '{self.source}' has only {len(timeline)} frames at "
                f"{timeline.timestep} min ({self.path})"
            )
        self.labels = split_labels(timeline, config)
        self.blocks = label_blocks(timeline.times, self.labels, timeline.segment)
        self.windows = list_windows(timeline, self.labels, n_input, n_target)

    def select(self, counts: np.ndarray, config: PatchesConfig, n_input: int, n_target: int):
        """Choose patches; sets ``samples``: a DataFrame of (start, y0, x0, split, wet_fraction)
        where ``start`` is the window's first frame on the timeline."""
        if config.wet_fraction_over == "target":
            first, n_frames = n_input, n_target
        else:
            first, n_frames = 0, n_input + n_target
        pixels = config.patch_size**2
        starts = self.windows["start"].to_numpy()
        splits = self.windows["split"].to_numpy()
        wet_sum = window_sums(counts[:, 0], starts, first, n_frames)
        valid_sum = window_sums(counts[:, 1], starts, 0, n_input + n_target)
        wet_fraction = wet_sum / (n_frames * pixels)
        valid_fraction = valid_sum / ((n_input + n_target) * pixels)
        rows, cols = patch_origins(
            *self.cube["rain_rate"].shape[1:], config.patch_size, config.stride
        )
        tables = []
        for split in SPLITS:
            in_split = np.flatnonzero(splits == split)
            keep = select_patches(wet_fraction[in_split], valid_fraction[in_split], config, split)
            window, row, col = np.nonzero(keep)
            tables.append(
                pd.DataFrame(
                    {
                        "start": starts[in_split][window],
                        "y0": rows[row],
                        "x0": cols[col],
                        "split": split,
                        "wet_fraction": wet_fraction[in_split][window, row, col],
                    }
                )
            )
        self.samples = pd.concat(tables, ignore_index=True)


# --------------------------------------------------------------------------------------------
# normalization


def fit_normalization(
    plans: list[SourcePlan], config: PatchesConfig, n_frames: int, client
) -> Normalization:
    """Fit the normalization on the frames of the train windows (spatially subsampled).

    Returns
    -------
    Normalization
        The fitted record, ``fitted_on`` naming the train split and the frames per source.
    """
    method = get_method(config.normalization)
    samples, described = [], []
    for plan in plans:
        train = plan.windows["start"].to_numpy()[plan.windows["split"].to_numpy() == "train"]
        frames = window_frame_indices(train, n_frames)
        rain_rate = plan.rain_rate
        n_pixels = frames.size * rain_rate.shape[1] * rain_rate.shape[2]
        spatial_step = max(1, math.ceil(math.sqrt(n_pixels * len(plans) / config.max_fit_values)))
        samples.append(rain_rate[:, ::spatial_step, ::spatial_step][frames])
        described.append(
            {"source": plan.source, "n_frames": int(frames.size), "spatial_step": spatial_step}
        )
    values = np.concatenate([part.ravel() for part in client.gather(client.compute(samples))])
    try:
        params = method.fit(values, **config.normalization_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"patches.normalization '{config.normalization}': {err}") from None
    return Normalization(method.name, params, {"split": "train", "sources": described})


# --------------------------------------------------------------------------------------------
# the stage


def _experiment(config: str | Path | ExperimentConfig) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    return load_experiment(config)


def _open_sources(experiment: ExperimentConfig, config: PatchesConfig) -> list[SourcePlan]:
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
        cube = open_cube(path)
        timeline = Timeline.from_cube(source, path, cube, config.resample_minutes)
        plans.append(SourcePlan(timeline, cube))
    return plans


def build_digest(config: PatchesConfig, plans: list[SourcePlan]) -> str:
    """Digest of the store layout, the patches config and the cubes it reads (their ingest
    digest and history)."""
    h = hashlib.sha256(f"schema {SCHEMA_VERSION} {FRAME_CHUNK} motion nodes on pixels".encode())
    h.update(config.model_dump_json().encode())
    h.update(__version__.encode())
    for plan in plans:
        h.update(plan.path.encode())
        h.update(str(plan.cube.attrs.get("source_files_digest", "")).encode())
        h.update(str(plan.cube.attrs.get("history", "")).encode())
    return h.hexdigest()


def _check_counts(plans: list[SourcePlan], config: PatchesConfig, n_input: int, n_target: int):
    windows = {s: sum(int((p.windows["split"] == s).sum()) for p in plans) for s in SPLITS}
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
    nowcast.storage.StoreLockedError
        If another run is writing the same store (``<store>.lock``).
    nowcast.storage.DiskWriteError
        If the free space is less than the store's arrays uncompressed (``StoreContent.nbytes``),
        or the disk fills up while writing.
    ConfigError
        For an unknown source or missing cube, a window longer than a cube, or a split with too
        few windows (the message lists the counts per split).
    """
    experiment = _experiment(config)
    patches_config = stage_config(experiment, "patches", PatchesConfig)
    path = experiment.patch_store
    plans = _open_sources(experiment, patches_config)
    n_input, n_target = frame_counts(
        [plan.timeline for plan in plans],
        patches_config.n_input_frames,
        patches_config.n_target_frames,
    )
    digest = build_digest(patches_config, plans)
    with storage.exclusive_lock(path + ".lock"):  # another build would delete our temporaries
        if not force and storage.exists(path) and existing_digest(path) == digest:
            for stale in storage.stale_temporaries(path):
                storage.remove(stale)
            return path

        for plan in plans:
            plan.set_windows(patches_config, n_input, n_target)
        n_frames = n_input + n_target
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
            normalization = fit_normalization(plans, patches_config, n_frames, client)
            groups, encodings = {}, {}
            for plan in plans:
                groups[plan.source], encodings[plan.source] = frames_group(
                    plan, patches_config, n_input, n_frames, normalization
                )
            attrs = _store_attrs(
                experiment,
                patches_config,
                plans,
                (n_input, n_target),
                normalization,
                digest,
                {"windows": window_counts, "samples": sample_counts},
            )
            root = root_dataset(plans, n_input, n_target, attrs)
            content = StoreContent(root, groups, encodings, n_input, n_target)
            storage.check_free_space(path, content.nbytes, "patch store")
            with storage.atomic_path(path) as tmp:
                write_store(content, tmp, client, progress)
    return path


def _store_attrs(
    experiment: ExperimentConfig,
    config: PatchesConfig,
    plans: list[SourcePlan],
    frame_counts: tuple[int, int],
    normalization: Normalization,
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
    attrs = {
        "Conventions": "CF-1.8",
        "title": f"Normalized radar patch sequences for experiment '{experiment.name}'",
        "experiment": experiment.name,
        "nowcast_version": __version__,
        "history": f"{now}Z nowcast patches {experiment.name}",
        "store_schema_version": SCHEMA_VERSION,
        "normalization": json.dumps(normalization.to_dict()),
        "frame": config.frame,
        "n_input_frames": int(frame_counts[0]),
        "n_target_frames": int(frame_counts[1]),
        "timestep_minutes": int(plans[0].timeline.timestep),
        "patch_size": int(config.patch_size),
        "stride": int(config.stride),
        "margin": 0,
        "splits": json.dumps(splits),
        "cube_paths": json.dumps({plan.source: plan.path for plan in plans}),
        "source_crs": json.dumps(
            {plan.source: plan.cube["crs"].attrs["crs_wkt"] for plan in plans}
        ),
        "config": config.model_dump_json(),
        "counts": json.dumps(counts),
        "build_digest": digest,
    }
    if config.frame == "lagrangian":
        attrs["motion_stride"] = int(config.motion_stride)
    return attrs
