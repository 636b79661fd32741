"""Zero-shot evaluation: a trained model against the baselines on any catalog source.

``nowcast evaluate --source NAME`` scores persistence, LK extrapolation, S-PROG and a model
(default: the committed pretrained one) on every forecast start of a catalog source, with no
experiment config and no patch store. The source's cube is ingested first when it is missing.
The windows come from :mod:`nowcast.windows` at the model's frame counts and timestep, read by
the rule of :func:`nowcast.windows.frames_per_model_step` (a 10-minute model on a 5-minute source
takes
every second frame counted back from the reference time; starts are every source frame), and
the scoring and the outputs are those of ``nowcast evaluate CONFIG``
(:func:`nowcast.evaluate.plan_evaluation` and :func:`nowcast.evaluate.score_and_write`).

The model runs on the source's native grid; the report and ``metrics.json`` state the source's
pixel size beside the pixel size the model was trained on (the checkpoint's ``pixel_size_m``).

Ensemble methods (``steps``, the learned ensemble) and ``lagrangian_probability`` run when the
methods name them (``--methods-from``), with ``--members`` members; they add the probabilistic
outputs of :mod:`nowcast.evaluate.ensemble`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from nowcast import storage
from nowcast.config import ConfigError, ExperimentConfig
from nowcast.evaluate.setup import EvaluateConfig
from nowcast.evaluate.stage import plan_evaluation, score_and_write
from nowcast.sources.catalog import Catalog, load_catalog
from nowcast.sources.cube import cube_path, cube_pixel_size, open_cube
from nowcast.sources.ingest import ingest
from nowcast.training.checkpoint import PRETRAINED_CHECKPOINT, check_checkpoint
from nowcast.windows import (
    Timeline,
    cube_timestep,
    frame_step_note,
    frames_per_model_step,
    list_windows,
)

#: Methods scored by ``nowcast evaluate --source``.
SOURCE_METHODS = ("persistence", "extrapolation", "sprog", "model")
#: Split label of every window (the source has no splits; ``evaluate``'s default split).
SOURCE_SPLIT = "test"


def default_out_dir(source: str) -> str:
    """Output folder of ``nowcast evaluate --source``: ``runs/evaluate_<source>``."""
    return f"runs/evaluate_{source}"


def ensure_cube(
    source: str,
    cube_dir: str,
    catalog: Catalog,
    scheduler: str | None = None,
    progress: bool = True,
) -> str:
    """Path of the source's cube, ingested first (with one line saying so) when missing.

    Returns
    -------
    str
        ``<cube_dir>/<source>.zarr``.
    """
    path = cube_path(cube_dir, source)
    if storage.exists(path):
        return path
    print(f"{source}: no cube at {path}; ingesting it first (as `nowcast ingest {source}`)")
    return ingest(source, cube_dir, catalog=catalog, scheduler=scheduler, progress=progress).path


def source_windows(
    source: str,
    path: str,
    cube: xr.Dataset,
    n_input: int,
    n_target: int,
    frame_step: int,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """Every forecast start of a cube whose input and target frames are all valid.

    A start (reference time) is kept when its ``n_input`` input and ``n_target`` target frames,
    every ``frame_step``-th cube frame counted from it, are present and valid in one segment
    (:func:`nowcast.windows.list_windows`), and it lies in [``start``, ``end``].

    Returns
    -------
    pandas.DataFrame
        ``source``, ``cube_path``, ``reference_time``, in time order.
    """
    timeline = Timeline.from_cube(source, path, cube)
    labels = np.full(len(timeline), SOURCE_SPLIT, dtype=object)
    table = list_windows(timeline, labels, n_input, n_target, frame_step)
    reference = table["reference_time"]
    keep = np.ones(len(table), dtype=bool)
    if start is not None:
        keep &= (reference >= pd.Timestamp(start)).to_numpy()
    if end is not None:
        keep &= (reference <= pd.Timestamp(end)).to_numpy()
    return table[keep][["source", "cube_path", "reference_time"]].reset_index(drop=True)


def _metres(sizes: dict) -> str:
    return ", ".join(f"{size:g} m ({name})" for name, size in sizes.items())


def zero_shot_notes(info: dict) -> list[str]:
    """Report lines: what is scored, the timestep rule applied and both pixel sizes."""
    source = info["source"]
    if info["training_pixel_size_m"]:
        trained = f"it was trained on pixels of {_metres(info['training_pixel_size_m'])}"
    else:
        # make_checkpoint records {} when the training cubes could not be opened.
        trained = "its training pixel size is not recorded"
    timestep = info["timestep_note"] or (
        f"{source} and the model both have a {info['model_timestep_minutes']}-minute step"
    )
    return [
        f"Zero-shot evaluation on catalog source `{source}` (no experiment config, no patch "
        f"store): every forecast start from {info['first_start']} to {info['last_start']} whose "
        f"{info['n_input_frames']} input and {info['n_target_frames']} target frames are valid "
        f"in one segment of the cube `{info['cube']}`, one start every "
        f"{info['source_timestep_minutes']} min.",
        f"Timestep: {timestep}.",
        f"Grid: the model runs on the source's native grid ({info['grid_shape'][0]} x "
        f"{info['grid_shape'][1]} pixels of {info['source_pixel_size_m']:g} m); {trained}.",
    ]


def _checked_request(source, catalog, checkpoint, start, end, members, window_stride):
    """The catalog and checkpoint of an :func:`evaluate_source` request, its arguments checked."""
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    catalog[source]  # unknown source: one-line error naming the catalog's sources
    checkpoint = Path(checkpoint) if checkpoint is not None else PRETRAINED_CHECKPOINT
    if not checkpoint.is_file():
        raise ConfigError(f"evaluate --source: checkpoint not found: {checkpoint}")
    if members is not None and int(members) < 1:
        raise ConfigError(f"evaluate --source: --members must be at least 1, got {members}")
    if int(window_stride) < 1:
        raise ConfigError(
            f"evaluate --source: --window-stride must be at least 1, got {window_stride}"
        )
    if start is not None and end is not None and pd.Timestamp(start) > pd.Timestamp(end):
        raise ConfigError(f"evaluate --source: --start {start} is after --end {end}")
    return catalog, checkpoint


def evaluate_source(
    source: str,
    *,
    catalog: Catalog | str | Path | None = None,
    checkpoint: str | Path | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    out_dir: str | Path | None = None,
    cube_dir: str = "data/cubes",
    scheduler: str | None = None,
    progress: bool = True,
    figures: bool = True,
    methods: list[str] | None = None,
    forecast_methods: dict | None = None,
    compare: str | None = None,
    window_stride: int = 1,
    members: int | None = None,
    method_kwargs: dict | None = None,
) -> dict:
    """Score a model and the baselines on every forecast start of a catalog source.

    Parameters
    ----------
    source : str
        Catalog source name.
    catalog : Catalog, str or Path, optional
        The catalog or its file; default :func:`nowcast.config.load_catalog`.
    checkpoint : str or Path, optional
        Model checkpoint; default the pretrained model
        (:data:`nowcast.training.checkpoint.PRETRAINED_CHECKPOINT`).
    start, end : datetime, optional
        First and last forecast reference time scored; default the whole source.
    out_dir : str or Path, optional
        Output folder, written atomically; default ``runs/evaluate_<source>``.
    cube_dir : str, optional
        Where ``<source>.zarr`` is, or is ingested to when missing.
    scheduler : str, optional
        Dask scheduler address, ``"threads"``, or None for a local cluster.
    progress : bool, optional
        Progress bars (ingest and scoring).
    figures : bool, optional
        Draw score curves, map panels and an animation.
    methods : list of str, optional
        Methods scored; default :data:`SOURCE_METHODS`. May name ``forecast_methods`` variants.
    forecast_methods : dict, optional
        Variants (blending, probability matching) as an experiment's ``forecast_methods:``
        section declares them (:mod:`nowcast.nowcasts.variants`).
    compare : str, optional
        The method of ``differences.csv``; default the model.
    window_stride : int, optional
        Score every k-th valid start (default 1: every start).
    members : int, optional
        Members of the ensemble methods (``steps``, the learned ensemble); default
        :attr:`EvaluateConfig.members <nowcast.evaluate.setup.EvaluateConfig>` (20).
    method_kwargs : dict, optional
        Keyword arguments per method, as an experiment's ``evaluate.method_kwargs`` (the
        learned ensemble's ``checkpoint`` and ``noise_gain``, for example).

    Returns
    -------
    dict
        As :func:`nowcast.evaluate.evaluate`: ``folder``, ``metrics_csv``, ``metrics_json``,
        ``differences_csv``, ``report``, ``figures`` and, with an ensemble or probability
        method, ``ensemble_metrics_csv`` and ``ensemble_curves_csv``.

    Raises
    ------
    ConfigError
        For an unknown source, a missing checkpoint, a source step that does not fit the model's
        (:func:`nowcast.windows.frames_per_model_step`), no valid forecast start in the range,
        or ``members`` or ``window_stride`` below 1.
    """
    catalog, checkpoint = _checked_request(
        source, catalog, checkpoint, start, end, members, window_stride
    )
    meta = check_checkpoint(checkpoint)
    n_input, n_target = int(meta["n_input_frames"]), int(meta["n_target_frames"])
    model_step = int(meta["timestep_minutes"])

    path = ensure_cube(source, cube_dir, catalog, scheduler, progress)
    cube = open_cube(path)
    source_step = cube_timestep(cube)
    frame_step = frames_per_model_step(model_step, source_step, source)
    note = frame_step_note(source, source_step, model_step)
    if note:
        print(f"note: {note}")
    table = source_windows(source, path, cube, n_input, n_target, frame_step, start, end)
    if table.empty:
        raise ConfigError(
            f"evaluate --source {source}: no forecast start between {start or 'the start'} and "
            f"{end or 'the end'} of {path} has all its {n_input} input and {n_target} target "
            f"frames ({model_step} min apart) valid"
        )
    out_dir = Path(out_dir or default_out_dir(source))
    experiment = ExperimentConfig(
        name=f"evaluate_{source}",
        sources=[source],
        cube_dir=cube_dir,
        run_dir=str(out_dir),
        forecast_methods=forecast_methods or {},
    )
    eval_config = EvaluateConfig(
        methods=list(methods or SOURCE_METHODS),
        checkpoint=str(checkpoint),
        window_stride=window_stride,
        figures=figures,
        compare=compare,
        method_kwargs=method_kwargs or {},
        **({} if members is None else {"members": members}),
    )
    info = {"n_input_frames": n_input, "n_target_frames": n_target, "timestep_minutes": model_step}
    plan = plan_evaluation(
        experiment,
        eval_config,
        table,
        info,
        windows_from=f"catalog source {source}",
        folder=out_dir,
    )
    trained = {str(name): float(size) for name, size in meta["pixel_size_m"].items()}
    zero_shot = {
        "source": source,
        "cube": path,
        "source_timestep_minutes": source_step,
        "model_timestep_minutes": model_step,
        "frame_stride": frame_step,
        "timestep_note": note,
        "n_input_frames": n_input,
        "n_target_frames": n_target,
        "first_start": pd.Timestamp(table["reference_time"].iloc[0]).isoformat(),
        "last_start": pd.Timestamp(table["reference_time"].iloc[-1]).isoformat(),
        "native_grid": True,
        "grid_shape": [int(cube.sizes["y"]), int(cube.sizes["x"])],
        "source_pixel_size_m": cube_pixel_size(cube),
        "training_pixel_size_m": trained,
    }
    plan.summary["zero_shot"] = zero_shot
    # Starts are window_stride source steps apart: window_stride / frame_step in model steps.
    plan.summary["window_stride"] = window_stride / frame_step
    plan.notes = zero_shot_notes(zero_shot)
    return score_and_write(plan, scheduler=scheduler, progress=progress)


__all__ = [
    "SOURCE_METHODS",
    "default_out_dir",
    "ensure_cube",
    "evaluate_source",
    "source_windows",
    "zero_shot_notes",
]
