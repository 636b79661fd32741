"""The calibrate stage: isotonic curves of a checkpoint, fitted on the validation windows.

A network trained with a squared error on little data smears light rain over dry areas and damps
peaks. :func:`calibrate` runs the raw model on the validation split's full-domain windows and
fits, per lead time, an isotonic regression of the observed on the forecast rain rate
(:mod:`nowcast.nowcasts.isotonic`). The curves go to a separate **calibration file** (JSON,
written atomically) that records the sha256 of the checkpoint it was fitted on; the checkpoint
itself is never modified. Evaluate, export and predict apply a calibration only where a config
or a command names the file, through a forecast-method variant::

    forecast_methods:
      model_isotonic:
        method: model
        postprocess: {method: isotonic, file: runs/bom/calibration.json}

:func:`load_calibration` refuses a file fitted on another checkpoint. A checkpoint written before
calibration files existed, with a ``calibration`` key, is read as if it were a calibration file
(name the checkpoint as the file), with a deprecation message.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nowcast import __version__, storage
from nowcast.config import ConfigError, ExperimentConfig, load_experiment
from nowcast.evaluate.scoring import cube_windows
from nowcast.nowcasts.isotonic import CALIBRATION_KIND, fit_isotonic
from nowcast.nowcasts.runner import ForecastRun, forecast_windows, model_method
from nowcast.patches.reader import PatchStore
from nowcast.sources.cube import cube_path
from nowcast.storage import atomic_write_file, file_sha256

#: (forecast, observation) pairs kept per lead time and window, to bound memory and fit time.
MAX_PAIRS_PER_WINDOW = 50_000
#: File name of a calibration in the run folder.
CALIBRATION_FILE = "calibration.json"


def calibration_path(experiment: ExperimentConfig) -> Path:
    """``<run_dir>/calibration.json``."""
    return Path(experiment.run_path) / CALIBRATION_FILE


def _pairs(experiment: ExperimentConfig, run: ForecastRun, seed: int) -> tuple[list, int]:
    """(forecast, observed) samples per lead on the validation windows, and the window count.

    The windows are the patch store's, or those the store would list (from the cubes) when
    there is no store yet.
    """
    if storage.exists(experiment.patch_store):
        windows = PatchStore.open(experiment.patch_store).windows("val")
    else:
        windows, _ = cube_windows(experiment, "val")
    if windows.empty:
        raise ConfigError(f"calibrate: {experiment.name} has no validation windows")
    rng = np.random.default_rng(seed)
    pairs = [([], []) for _ in range(run.n_leadtimes)]
    starts = (
        (cube_path(experiment.cube_root, window.source), window.reference_time)
        for window in windows.itertuples()
    )
    for window in forecast_windows(starts, run):
        forecast = window.forecasts["model"].values
        observed = window.observed.values
        for lead in range(run.n_leadtimes):
            fc, obs = forecast[lead].ravel(), observed[lead].ravel()
            ok = np.flatnonzero(np.isfinite(fc) & np.isfinite(obs))
            keep = rng.choice(ok, size=min(MAX_PAIRS_PER_WINDOW, ok.size), replace=False)
            pairs[lead][0].append(fc[keep])
            pairs[lead][1].append(obs[keep])
    return pairs, len(windows)


def calibrate(
    config: str | Path | ExperimentConfig,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Fit the isotonic calibration of a checkpoint on the validation windows; write the file.

    Parameters
    ----------
    config : str, Path or ExperimentConfig
        The experiment (its patch store, or its cubes, give the validation windows).
    checkpoint : str or Path, optional
        Default ``<run_dir>/checkpoints/best.pt``; read only.
    out : str or Path, optional
        The calibration file; default ``<run_dir>/calibration.json``.
    seed : int
        Seed of the pair subsampling.

    Returns
    -------
    dict
        ``{"path", "checkpoint", "checkpoint_sha256", "n_windows", "n_pairs"}``.
    """
    experiment = config if isinstance(config, ExperimentConfig) else load_experiment(config)
    checkpoint = Path(checkpoint or Path(experiment.run_path) / "checkpoints" / "best.pt")
    if not checkpoint.is_file():
        raise ConfigError(f"calibrate: checkpoint not found: {checkpoint}; run `nowcast train`")
    # The raw model: a legacy calibration stored in the checkpoint is not applied here.
    model = model_method(str(checkpoint), calibrated=False)
    run = ForecastRun(
        methods=("model",),
        method_kwargs={},
        checkpoint=str(checkpoint),
        device=None,
        n_input_frames=model.n_input_frames,
        n_leadtimes=model.n_target_frames,
        timestep_minutes=int(model.timestep_minutes),
        checkpoint_calibration=False,
    )
    pairs, n_windows = _pairs(experiment, run, seed)
    curves = [fit_isotonic(np.concatenate(fc), np.concatenate(obs)) for fc, obs in pairs]
    path = Path(out or calibration_path(experiment))
    payload = {
        "kind": CALIBRATION_KIND,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "experiment": experiment.name,
        "split": "val",
        "n_windows": n_windows,
        "n_pairs": int(sum(np.concatenate(fc).size for fc, _ in pairs)),
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "nowcast_version": __version__,
        "curves": curves,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(json.dumps(payload)))
    keys = ("checkpoint", "checkpoint_sha256", "n_windows", "n_pairs")
    return {"path": str(path), **{key: payload[key] for key in keys}}
