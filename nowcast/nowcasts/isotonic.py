"""Isotonic curves of forecast intensities: fitting and applying them (scikit-learn).

Per lead time, a monotone regression of the observed on the forecast rain rate maps forecast
intensities back to what was observed at them; being monotone it keeps the forecast's ranking
and spatial structure. :mod:`nowcast.calibration` fits the curves on validation windows and
writes them to a calibration file; forecast-method variants apply them
(``postprocess: {method: isotonic, file: ...}``, :mod:`nowcast.nowcasts.variants`).
"""

from __future__ import annotations

import numpy as np


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
