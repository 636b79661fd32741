"""Isotonic calibration of forecast intensities on the validation split (scikit-learn).

A network trained with a squared error on little data smears light rain over dry areas and damps
peaks. Per lead time, an isotonic (monotone) regression of the observed on the forecast rain
rate, fitted on the validation windows only, maps forecast intensities back to what was observed
at them. Being monotone it keeps the forecast's ranking and spatial structure; it removes the
systematic drizzle that inflates the frequency bias.

The fitted curves are stored in the checkpoint (``calibration``: per lead time the isotonic
thresholds ``x``/``y``) and applied by :class:`nowcast.nowcasts.model.ModelNowcast` with
``numpy.interp``, which is what ``IsotonicRegression.predict`` computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.isotonic import IsotonicRegression

from .checkpoint import load_checkpoint, save_checkpoint
from .experiment import ExperimentConfig
from .nowcasts.utils import window_inputs
from .patch_store import PatchStore
from .windows import cube_time_indices, valid_times

#: (forecast, observation) pairs kept per lead time and window, to bound memory and fit time.
MAX_PAIRS_PER_WINDOW = 50_000


def fit_isotonic(forecast: np.ndarray, observed: np.ndarray) -> dict:
    """Fit observed = f(forecast), f monotone increasing and >= 0.

    Returns
    -------
    dict
        ``{"x": [...], "y": [...]}``: the regression's thresholds (``X_thresholds_``,
        ``y_thresholds_``).
    """
    model = IsotonicRegression(y_min=0.0, increasing=True, out_of_bounds="clip")
    model.fit(forecast, observed)
    return {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}


def apply_calibration(rain_rate: np.ndarray, calibration: list[dict]) -> np.ndarray:
    """Apply per-lead isotonic curves to a forecast (lead, y, x); NaN stays NaN."""
    calibrated = np.array(rain_rate, dtype=np.float32, copy=True)
    for lead, curve in enumerate(calibration[: calibrated.shape[0]]):
        calibrated[lead] = np.interp(calibrated[lead], curve["x"], curve["y"])
    return np.where(np.isfinite(rain_rate), calibrated, np.nan).astype(np.float32)


def remove_calibration(checkpoint: str | Path) -> bool:
    """Drop a checkpoint's calibration (atomically); True if it had one."""
    state = load_checkpoint(checkpoint)
    if state.pop("calibration", None) is None:
        return False
    save_checkpoint(checkpoint, state)
    return True


def calibrate(
    experiment: ExperimentConfig, checkpoint: str | Path | None = None, seed: int = 0
) -> dict:
    """Fit the isotonic calibration of a checkpoint on the experiment's validation windows
    and store it in the checkpoint (atomically).

    Parameters
    ----------
    experiment : ExperimentConfig
    checkpoint : str or Path, optional
        Default ``<run_dir>/checkpoints/best.pt``.
    seed : int
        Seed of the pair subsampling.

    Returns
    -------
    dict
        ``{"checkpoint", "n_windows", "n_pairs"}``.
    """
    from .nowcasts.model import ModelNowcast

    checkpoint = Path(checkpoint or Path(experiment.run_path) / "checkpoints" / "best.pt")
    remove_calibration(checkpoint)  # calibrate the raw model, never a calibrated one
    state = load_checkpoint(checkpoint)
    method = ModelNowcast(checkpoint=checkpoint)
    windows = PatchStore.open(experiment.patch_store).windows("val")
    rng = np.random.default_rng(seed)
    step = int(method.timestep_minutes)
    n_leads = method.n_target_frames
    pairs = [([], []) for _ in range(n_leads)]
    batches = window_inputs(experiment.cube_root, windows, method.n_input_frames, step)
    for window, cube, inputs in batches:
        forecast = method(inputs, n_leads).values
        leads = cube_time_indices(cube, valid_times(window.reference_time, n_leads, step))
        observed = cube["rain_rate"].isel(time=leads).values
        for lead in range(n_leads):
            fc, obs = forecast[lead].ravel(), observed[lead].ravel()
            ok = np.flatnonzero(np.isfinite(fc) & np.isfinite(obs))
            keep = rng.choice(ok, size=min(MAX_PAIRS_PER_WINDOW, ok.size), replace=False)
            pairs[lead][0].append(fc[keep])
            pairs[lead][1].append(obs[keep])
    state["calibration"] = [
        fit_isotonic(np.concatenate(fc), np.concatenate(obs)) for fc, obs in pairs
    ]
    save_checkpoint(checkpoint, state)
    return {
        "checkpoint": str(checkpoint),
        "n_windows": len(windows),
        "n_pairs": int(sum(np.concatenate(fc).size for fc, _ in pairs)),
    }
