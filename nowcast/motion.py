"""The Lucas-Kanade motion field of a rain-rate stack (pysteps), as every stage estimates it.

The recipe of the pysteps extrapolation example: the last three frames in dB (``dB_transform``
with a 0.1 mm/h threshold, no rain and no data at -15 dB) go to pysteps' Lucas-Kanade method.
The extrapolation and S-PROG baselines, the Lagrangian-frame model and the Lagrangian patch store
all use this one function, so they share one motion (an evaluation computes it once per window).
"""

from __future__ import annotations

import numpy as np
from pysteps import motion
from pysteps.utils.transformation import dB_transform

#: Rain rate (mm/h) below which a pixel is "no rain" in the dB transform.
DB_THRESHOLD = 0.1
#: dB value of no rain and of no data when estimating motion.
DB_ZEROVALUE = -15.0
#: Frames the motion field is estimated from.
N_MOTION_FRAMES = 3


def to_db(rain_rate: np.ndarray) -> np.ndarray:
    """Rain rate (mm/h) to dB, with no rain and no data at :data:`DB_ZEROVALUE`.

    Parameters
    ----------
    rain_rate : numpy.ndarray
        Rain rate, any shape; NaN is no data.

    Returns
    -------
    numpy.ndarray
        float64 dB values, all finite.
    """
    rain_rate = np.clip(np.asarray(rain_rate, dtype=np.float64), 0.0, None)
    db, _ = dB_transform(rain_rate, threshold=DB_THRESHOLD, zerovalue=DB_ZEROVALUE)
    return np.where(np.isfinite(db), db, DB_ZEROVALUE)


def motion_field(rain_rate: np.ndarray, method: str = "LK", **kwargs) -> np.ndarray:
    """Estimate the advection field from the last frames of a rain-rate stack.

    Parameters
    ----------
    rain_rate : numpy.ndarray
        Rain rate (time, y, x) in mm/h; the last :data:`N_MOTION_FRAMES` frames are used.
    method : str, optional
        pysteps motion method, by default ``"LK"`` (Lucas-Kanade).
    **kwargs
        Passed to the pysteps motion method.

    Returns
    -------
    numpy.ndarray
        Motion (2, y, x) in pixels per timestep (x then y component).
    """
    frames = to_db(rain_rate[-N_MOTION_FRAMES:])
    return motion.get_method(method)(frames, **kwargs)
