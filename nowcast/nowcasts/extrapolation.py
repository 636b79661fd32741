"""Lagrangian persistence: Lucas-Kanade motion and semi-Lagrangian extrapolation (pysteps).

The recipe of the pysteps extrapolation example: the motion field is estimated on the last three
frames transformed to dB (``dB_transform`` with a 0.1 mm/h threshold, no rain and no data set to
-15 dB), and the last frame's rain rate (no data set to 0) is advected with it. Pixels advected
from outside the grid are NaN (pysteps' ``outval``), and the last frame's no-data area stays
no-data.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from nowcast import import_pysteps
from nowcast.advection.motion import (
    N_MOTION_FRAMES,
    motion_field,
)
from nowcast.nowcasts.inputs import check_inputs, input_timestep, to_forecast

extrapolation = import_pysteps("pysteps.extrapolation")


def forecast(
    inputs: xr.DataArray,
    n_leadtimes: int,
    timestep_minutes: float | None = None,
    motion_method: str = "LK",
    velocity: np.ndarray | None = None,
    **extrapolation_kwargs,
) -> xr.DataArray:
    """Advect the last frame along the Lucas-Kanade motion field.

    Parameters
    ----------
    inputs : xarray.DataArray
        Rain rate (time, y, x) in mm/h, at least 3 frames unless ``velocity`` is given.
    n_leadtimes : int
        Number of lead times.
    timestep_minutes : float, optional
        Lead-time step; by default the input frames' spacing.
    motion_method : str, optional
        pysteps motion method, by default ``"LK"``.
    velocity : numpy.ndarray, optional
        A precomputed motion field (2, y, x) in pixels per timestep (skips the estimation).
    **extrapolation_kwargs
        Passed to pysteps' semi-Lagrangian ``extrapolate`` (e.g. ``interp_order``).

    Returns
    -------
    xarray.DataArray
        Forecast (lead_time, y, x) in mm/h.
    """
    check_inputs(inputs, n_leadtimes, 1 if velocity is not None else N_MOTION_FRAMES)
    step = input_timestep(inputs, timestep_minutes)
    rain_rate = np.asarray(inputs.values, dtype=np.float64)
    if velocity is None:
        velocity = motion_field(rain_rate, motion_method)
    last = np.nan_to_num(np.clip(rain_rate[-1], 0.0, None), nan=0.0)
    extrapolate = extrapolation.get_method("semilagrangian")
    values = extrapolate(last, velocity, int(n_leadtimes), **extrapolation_kwargs)
    return to_forecast(values, inputs, step, "extrapolation")
