"""Forecast methods: persistence, pysteps extrapolation, S-PROG and STEPS, and trained models.

Every method takes the input frames as an ``xarray.DataArray`` of rain rate (time, y, x) in mm/h
(with a ``time`` coordinate and the cube's CRS, see :func:`cube_inputs`) and a number of lead
times, and returns the in-memory Forecast (``docs/architecture.md``): a DataArray (lead_time, y,
x) in mm/h whose reference time is the last input time, or (realization, lead_time, y, x) for an
ensemble (:mod:`nowcast.nowcasts.forecast`). The no-data area of the last input frame is NaN in
every lead time. ``lagrangian_probability`` returns probabilities (threshold, lead_time, y, x)
instead (:mod:`nowcast.nowcasts.probability`).

====================== =======================================================================
name                   method
====================== =======================================================================
persistence            Eulerian persistence
extrapolation          Lucas-Kanade motion + semi-Lagrangian extrapolation (pysteps)
sprog                  S-PROG (pysteps) on dB fields with the Lucas-Kanade motion
steps                  STEPS ensemble (pysteps) on dB fields with the Lucas-Kanade motion
lagrangian_probability local Lagrangian exceedance probabilities (pysteps)
model                  a trained network: ``get_method("model")(checkpoint=path)`` -> callable
ensemble               a trained stochastic network's members (``n_members``, ``member_batch``,
                       ``seed``), each with its motion perturbed as STEPS' ``bps`` does
model_steps            a trained deterministic network's forecast perturbed with STEPS noise
                       (pysteps' blended STEPS, ``n_ens_members``, ``seed``), built from a
                       checkpoint like ``model``
====================== =======================================================================

:func:`forecast_window` (:mod:`nowcast.nowcasts.runner`) forecasts one window of a cube with
every method and variant of a :class:`ForecastRun`, as every stage does.
"""

from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import (
    BASELINES,
    METHOD_NEEDS,
    get_method,
    registered_methods,
    uses_motion,
)
from nowcast.nowcasts.model import ModelNowcast
from nowcast.nowcasts.runner import ForecastRun, WindowForecast, forecast_window

__all__ = [
    "BASELINES",
    "METHOD_NEEDS",
    "ForecastRun",
    "ModelNowcast",
    "WindowForecast",
    "cube_inputs",
    "forecast_window",
    "get_method",
    "registered_methods",
    "uses_motion",
]
