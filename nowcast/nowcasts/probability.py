"""Probabilities of rain at or above thresholds: from an ensemble, and pysteps' local method.

A probability forecast is an ``xarray.DataArray`` named ``exceedance_probability``, dims
``(threshold, lead_time, y, x)``, float32 in [0, 1] (NaN = no data), with the Forecast's
coordinates and attributes and a ``threshold`` coordinate in mm/h. Events are ``rain >=
threshold``, as in pysteps' ``excprob``, ROC curve and reliability diagram.

- :func:`exceedance_probability`: the share of an ensemble's members at or above each threshold
  (pysteps ``postprocessing.ensemblestats.excprob``); a deterministic forecast gives 0 or 1.
- :func:`lagrangian_probability`: pysteps ``nowcasts.lagrangian_probability`` (Germann and
  Zawadzki, 2004), the share of a neighbourhood of the extrapolated last frame at or above the
  threshold, the neighbourhood growing with lead time. pysteps thresholds whatever units it is
  given; here the last frame in mm/h (no data as no rain, as for the extrapolation) with the
  thresholds in mm/h, so at a zero neighbourhood it is the extrapolation forecast's event.
  Pixels advected from outside the grid are left out of each neighbourhood (and are NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from nowcast import import_pysteps
from nowcast.advection.motion import N_MOTION_FRAMES, motion_field
from nowcast.nowcasts.forecast import (
    FORECAST_DIMS,
    ensemble_size,
    make_forecast,
    members,
)
from nowcast.nowcasts.inputs import (
    check_inputs,
    input_pixel_size_km,
    input_timestep,
    no_data_mask,
    reference_time,
)

excprob = import_pysteps("pysteps.postprocessing.ensemblestats").excprob
pysteps_lagrangian_probability = import_pysteps("pysteps.nowcasts.lagrangian_probability")

#: Default thresholds (mm/h).
THRESHOLDS = (1.0, 5.0, 10.0)
PROBABILITY_NAME = "exceedance_probability"
THRESHOLD = "threshold"
PROBABILITY_DIMS = (THRESHOLD, *FORECAST_DIMS)
#: Germann and Zawadzki's optimum scale grows by 1 km per minute of lead time.
GZ_KM_PER_MINUTE = 1.0
#: Forecast attributes a probability keeps.
_KEPT_ATTRS = ("crs_wkt", "method", "radar_source", "institution")


def make_probability(values, thresholds: Sequence[float], like: xr.DataArray) -> xr.DataArray:
    """Wrap probabilities (threshold, lead_time, y, x) in the layout of the module docstring.

    Parameters
    ----------
    values : array_like, shape (n_thresholds, n_lead, ny, nx)
        Probabilities in [0, 1]; NaN marks no data.
    thresholds : sequence of float
        Thresholds in mm/h.
    like : xarray.DataArray
        A forecast (deterministic or ensemble) of the same lead times and grid: its
        coordinates and its CRS, method and source attributes.

    Returns
    -------
    xarray.DataArray
    """
    values = np.asarray(values, dtype=np.float32)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    expected = (thresholds.size, *(like.sizes[dim] for dim in FORECAST_DIMS))
    if values.shape != expected:
        raise ValueError(f"probabilities have shape {values.shape}; expected {expected}")
    coords = {
        name: coord.variable
        for name, coord in like.coords.items()
        if set(coord.dims) <= set(FORECAST_DIMS)
    }
    coords[THRESHOLD] = xr.Variable(
        THRESHOLD,
        thresholds,
        {
            "long_name": "rain rate threshold (events are rain rate >= threshold)",
            "standard_name": "lwe_precipitation_rate",
            "units": "mm h-1",
        },
    )
    attrs = {key: like.attrs[key] for key in _KEPT_ATTRS if key in like.attrs}
    attrs.update(long_name="probability of rain rate >= threshold", units="1")
    return xr.DataArray(
        values, dims=PROBABILITY_DIMS, coords=coords, name=PROBABILITY_NAME, attrs=attrs
    )


def exceedance_probability(
    forecast: xr.DataArray, thresholds: Sequence[float] = THRESHOLDS, ignore_nan: bool = False
) -> xr.DataArray:
    """The share of members at or above each threshold (pysteps ``excprob``).

    Parameters
    ----------
    forecast : xarray.DataArray
        Ensemble (realization, lead_time, y, x) or deterministic (lead_time, y, x) forecast in
        mm/h.
    thresholds : sequence of float, optional
        Thresholds in mm/h, by default 1, 5 and 10.
    ignore_nan : bool, optional
        pysteps' ``ignore_nan``: False (default) makes a pixel NaN where any member is NaN;
        True takes the share among the members with data.

    Returns
    -------
    xarray.DataArray
        Probabilities (threshold, lead_time, y, x), ``attrs["ensemble_size"]`` the members.
    """
    ensemble = members(forecast)
    thresholds = [float(threshold) for threshold in thresholds]
    # One lead time at a time: excprob holds a float64 copy of its input per threshold.
    values = np.stack(
        [
            excprob(np.asarray(ensemble.values[:, lead]), thresholds, ignore_nan=ignore_nan)
            for lead in range(ensemble.sizes["lead_time"])
        ],
        axis=1,
    )
    result = make_probability(values, thresholds, ensemble)
    result.attrs["ensemble_size"] = ensemble_size(forecast)
    return result


def gz_slope(timestep_minutes: float, pixel_size_km: float) -> float:
    """Germann and Zawadzki's 1 km/min in pixels per timestep (20 at 10 min and 0.5 km)."""
    return GZ_KM_PER_MINUTE * float(timestep_minutes) / float(pixel_size_km)


def lagrangian_probability(
    inputs: xr.DataArray,
    n_leadtimes: int,
    timestep_minutes: float | None = None,
    pixel_size_km: float | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    slope: float | None = None,
    motion_method: str = "LK",
    velocity: np.ndarray | None = None,
    **probability_kwargs,
) -> xr.DataArray:
    """Local Lagrangian exceedance probabilities (pysteps ``lagrangian_probability``).

    Parameters
    ----------
    inputs : xarray.DataArray
        Rain rate (time, y, x) in mm/h, at least 3 frames unless ``velocity`` is given.
    n_leadtimes : int
        Number of lead times.
    timestep_minutes : float, optional
        Lead-time step; by default the input frames' spacing.
    pixel_size_km : float, optional
        Pixel size; by default the spacing of the inputs' ``x`` coordinate (metres) / 1000.
    thresholds : sequence of float, optional
        Thresholds in mm/h, by default 1, 5 and 10.
    slope : float, optional
        Growth of the neighbourhood's diameter in pixels per timestep; by default
        :func:`gz_slope` (pysteps' default of 5 fits 1 km at 5 min).
    motion_method : str, optional
        pysteps motion method, by default ``"LK"``.
    velocity : numpy.ndarray, optional
        A precomputed motion field (2, y, x) in pixels per timestep (the window's shared one).
    **probability_kwargs
        Passed to pysteps' ``lagrangian_probability.forecast`` (``extrap_method``,
        ``extrap_kwargs``).

    Returns
    -------
    xarray.DataArray
        Probabilities (threshold, lead_time, y, x), method ``lagrangian_probability``, with
        ``attrs["slope"]``.
    """
    check_inputs(inputs, n_leadtimes, 1 if velocity is not None else N_MOTION_FRAMES)
    step = input_timestep(inputs, timestep_minutes)
    if slope is None:
        slope = gz_slope(step, input_pixel_size_km(inputs, pixel_size_km))
    rain_rate = np.asarray(inputs.values, dtype=np.float64)
    if velocity is None:
        velocity = motion_field(rain_rate, motion_method)
    last = np.nan_to_num(np.clip(rain_rate[-1], 0.0, None), nan=0.0)
    values = np.stack(
        [
            pysteps_lagrangian_probability.forecast(
                last,
                velocity,
                int(n_leadtimes),
                float(threshold),
                slope=slope,
                **probability_kwargs,
            )
            for threshold in thresholds
        ]
    )
    values[:, :, no_data_mask(inputs)] = np.nan
    like = make_forecast(
        values[0], reference_time(inputs), step, inputs, method="lagrangian_probability"
    )
    result = make_probability(values, thresholds, like)
    result.attrs["slope"] = float(slope)
    return result
