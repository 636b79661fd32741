"""Eulerian persistence: the last observed frame, unchanged, at every lead time."""

from __future__ import annotations

import numpy as np
import xarray as xr

from nowcast import import_pysteps
from nowcast.nowcasts.inputs import check_inputs, input_timestep, to_forecast

eulerian_persistence = import_pysteps("pysteps.extrapolation.interface").eulerian_persistence


def forecast(
    inputs: xr.DataArray, n_leadtimes: int, timestep_minutes: float | None = None
) -> xr.DataArray:
    """Repeat the last input frame (pysteps ``eulerian_persistence``).

    Parameters
    ----------
    inputs : xarray.DataArray
        Rain rate (time, y, x) in mm/h with a ``time`` coordinate and a CRS (``attrs["crs_wkt"]``
        or a ``crs`` coordinate); the last frame is the reference time.
    n_leadtimes : int
        Number of lead times.
    timestep_minutes : float, optional
        Lead-time step; by default the input frames' spacing (required for a single frame).

    Returns
    -------
    xarray.DataArray
        Forecast (lead_time, y, x) in mm/h, NaN where the last frame has no data.
    """
    check_inputs(inputs, n_leadtimes)
    step = input_timestep(inputs, timestep_minutes)
    last = np.asarray(inputs.values[-1], dtype=np.float32)
    values = eulerian_persistence(last, None, int(n_leadtimes))
    return to_forecast(values, inputs, step, "persistence")
