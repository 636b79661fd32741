"""S-PROG (Seed, 2003): extrapolation with scale-dependent AR(2) smoothing of a cascade (pysteps).

The cascade is built on dB fields (0.1 mm/h threshold, -15 dB for no rain and for no data, as
for the extrapolation) and the forecast transformed back to mm/h. The last frame's no-data area
stays no-data, as for every method here.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from nowcast import import_pysteps
from nowcast.advection.motion import DB_THRESHOLD, DB_ZEROVALUE, N_MOTION_FRAMES, motion_field
from nowcast.nowcasts.inputs import check_inputs, input_timestep, to_forecast
from nowcast.nowcasts.pysteps_call import pysteps_call

pysteps_sprog = import_pysteps("pysteps.nowcasts.sprog")
dB_transform = import_pysteps("pysteps.utils.transformation").dB_transform


def forecast(
    inputs: xr.DataArray,
    n_leadtimes: int,
    timestep_minutes: float | None = None,
    n_cascade_levels: int = 6,
    ar_order: int = 2,
    motion_method: str = "LK",
    velocity: np.ndarray | None = None,
    **sprog_kwargs,
) -> xr.DataArray:
    """S-PROG nowcast from the last ``ar_order + 1`` frames.

    Parameters
    ----------
    inputs : xarray.DataArray
        Rain rate (time, y, x) in mm/h, at least ``ar_order + 1`` (and 3) frames.
    n_leadtimes : int
        Number of lead times.
    timestep_minutes : float, optional
        Lead-time step; by default the input frames' spacing.
    n_cascade_levels : int, optional
        Cascade levels, by default 6.
    ar_order : int, optional
        Order of the autoregressive model, by default 2.
    motion_method : str, optional
        pysteps motion method, by default ``"LK"``.
    velocity : numpy.ndarray, optional
        A precomputed motion field (2, y, x) in pixels per timestep.
    **sprog_kwargs
        Passed to pysteps' ``sprog.forecast``.

    Returns
    -------
    xarray.DataArray
        Forecast (lead_time, y, x) in mm/h.
    """
    check_inputs(inputs, n_leadtimes, max(ar_order + 1, N_MOTION_FRAMES))
    step = input_timestep(inputs, timestep_minutes)
    rain_rate = np.clip(np.asarray(inputs.values, dtype=np.float64), 0.0, None)
    if velocity is None:
        velocity = motion_field(rain_rate, motion_method)
    db, _ = dB_transform(
        rain_rate[-(ar_order + 1) :], threshold=DB_THRESHOLD, zerovalue=DB_ZEROVALUE
    )
    # No data is no rain, as for the extrapolation: rain is not advected out of the no-data area.
    db[~np.isfinite(db)] = DB_ZEROVALUE
    db_threshold = 10.0 * np.log10(DB_THRESHOLD)
    with pysteps_call():
        values_db = pysteps_sprog.forecast(
            db,
            velocity,
            int(n_leadtimes),
            precip_thr=db_threshold,
            n_cascade_levels=n_cascade_levels,
            ar_order=ar_order,
            **sprog_kwargs,
        )
    values, _ = dB_transform(values_db, threshold=db_threshold, inverse=True)
    return to_forecast(values, inputs, step, "sprog")
