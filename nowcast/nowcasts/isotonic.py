"""Isotonic curves of forecast intensities: fitting and applying them (scikit-learn).

Per lead time, a monotone regression of the observed on the forecast rain rate maps forecast
intensities back to what was observed at them; being monotone it keeps the forecast's ranking
and spatial structure. :mod:`nowcast.evaluate.calibration` fits the curves on validation windows and
writes them to a calibration file; forecast-method variants apply them
(``postprocess: {method: isotonic, file: ...}``, :mod:`nowcast.nowcasts.variants`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from nowcast.config import ConfigError
from nowcast.storage import file_sha256
from nowcast.training.checkpoint import load_checkpoint

#: ``kind`` of a calibration file.
CALIBRATION_KIND = "nowcast-isotonic-calibration"


def fit_isotonic(forecast: np.ndarray, observed: np.ndarray) -> dict:
    """Fit observed = f(forecast), f monotone increasing and >= 0.

    Returns
    -------
    dict
        ``{"x": [...], "y": [...]}``: the regression's thresholds (``X_thresholds_``,
        ``y_thresholds_``).
    """
    from sklearn.isotonic import IsotonicRegression  # lazy: scikit-learn costs start-up time

    model = IsotonicRegression(y_min=0.0, increasing=True, out_of_bounds="clip")
    model.fit(forecast, observed)
    return {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()}


def apply_calibration(rain_rate: np.ndarray, calibration: list[dict]) -> np.ndarray:
    """Apply per-lead isotonic curves to a forecast (lead, y, x); NaN stays NaN.

    ``numpy.interp`` between the thresholds is what ``IsotonicRegression.predict`` computes
    (with ``out_of_bounds="clip"``), without keeping the fitted estimator.
    """
    calibrated = np.array(rain_rate, dtype=np.float32, copy=True)
    for lead, curve in enumerate(calibration[: calibrated.shape[0]]):
        calibrated[lead] = np.interp(calibrated[lead], curve["x"], curve["y"])
    return np.where(np.isfinite(rain_rate), calibrated, np.nan).astype(np.float32)


def load_calibration(path: str | Path, checkpoint: str | Path) -> list[dict]:
    """The curves of a calibration file, checked against the checkpoint they calibrate.

    Parameters
    ----------
    path : str or Path
        A file written by :func:`calibrate`, or a legacy checkpoint with a ``calibration`` key.
    checkpoint : str or Path
        The checkpoint the curves are applied to.

    Raises
    ------
    ConfigError
        If the file is missing or not a calibration, or was fitted on another checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file not found: {path}; run `nowcast calibrate CONFIG`")
    if path.suffix == ".pt":
        curves = load_checkpoint(path).get("calibration")
        if not curves:
            raise ConfigError(f"{path}: a checkpoint without a calibration is no calibration file")
        warnings.warn(
            f"{path}: a calibration stored in a checkpoint is deprecated; `nowcast calibrate` "
            "writes a separate calibration file",
            DeprecationWarning,
            stacklevel=2,
        )
        fitted_on = file_sha256(path)
    else:
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not a calibration file ({err})") from None
        if not isinstance(payload, dict) or payload.get("kind") != CALIBRATION_KIND:
            raise ConfigError(f"{path}: not a calibration file (kind is not {CALIBRATION_KIND})")
        curves, fitted_on = payload["curves"], payload["checkpoint_sha256"]
    applied_to = file_sha256(checkpoint)
    if applied_to != fitted_on:
        raise ConfigError(
            f"{path} was fitted on checkpoint sha256 {fitted_on[:12]}…, not on {checkpoint} "
            f"(sha256 {applied_to[:12]}…); run `nowcast calibrate` for this checkpoint"
        )
    return curves
