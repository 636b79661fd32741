"""STEPS (Bowler, Seed and Pierce, 2006; Seed, Pierce and Norman, 2013): pysteps' ensemble.

pysteps' conventions, as in its STEPS example: the cascade is built on dB fields (0.1 mm/h
threshold, -15 dB for no rain and for no data, ``precip_thr`` -10 dB), with 6 cascade levels,
nonparametric noise, ``bps`` velocity perturbations, the incremental mask and ``cdf`` probability
matching. The members are transformed back to mm/h; the last frame's no-data area stays no-data,
and pixels advected from outside the grid are NaN (pysteps' ``outval``), as for the extrapolation.

A window's members come from :func:`nowcast.nowcasts.seeds.window_seed`, so a rerun gives the
same members. pysteps draws every member's generators from that seed before the members run, so
they do not depend on ``num_workers`` or the Dask schedule either.

A window STEPS cannot forecast gives zeros (no data kept) named by ``attrs["steps_failed"]``:
pysteps 1.21.5 raises on some fields with a few wet pixels, and forecasts no rain when the
second-last frame is dry while the last is wet (it cannot fit its AR model). A dry last frame
gives pysteps' own zero forecast, which is a forecast and not a failure.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from nowcast import import_pysteps
from nowcast.advection.motion import DB_THRESHOLD, N_MOTION_FRAMES, motion_field, to_db
from nowcast.nowcasts.inputs import (
    check_inputs,
    input_pixel_size_km,
    input_timestep,
    reference_time,
    to_ensemble_forecast,
)

# One lock for every redirect of pysteps' prints in this package (see sprog).
from nowcast.nowcasts.pysteps_call import pysteps_call
from nowcast.nowcasts.seeds import window_seed

pysteps_steps = import_pysteps("pysteps.nowcasts.steps")
check_norain = import_pysteps("pysteps.utils.check_norain").check_norain
dB_transform = import_pysteps("pysteps.utils.transformation").dB_transform

#: pysteps' ``precip_thr``: the 0.1 mm/h threshold in dB.
PRECIP_THR_DB = 10.0 * np.log10(DB_THRESHOLD)
N_MEMBERS = 20
#: The attribute that names why a window's forecast is zeros.
FAILED_ATTR = "steps_failed"
#: What pysteps raises on a field it cannot model (LinAlgError is a ValueError).
PYSTEPS_FAILURES = (ValueError, ArithmeticError)


def forecast(
    inputs: xr.DataArray,
    n_leadtimes: int,
    timestep_minutes: float | None = None,
    pixel_size_km: float | None = None,
    n_ens_members: int = N_MEMBERS,
    seed: int | None = 0,
    motion_method: str = "LK",
    velocity: np.ndarray | None = None,
    num_workers: int = 1,
    ar_order: int = 2,
    n_cascade_levels: int = 6,
    noise_method: str = "nonparametric",
    vel_pert_method: str = "bps",
    mask_method: str = "incremental",
    probmatching_method: str = "cdf",
    **steps_kwargs,
) -> xr.DataArray:
    """STEPS ensemble nowcast from the last ``ar_order + 1`` frames.

    Parameters
    ----------
    inputs : xarray.DataArray
        Rain rate (time, y, x) in mm/h, at least ``ar_order + 1`` (and 3) frames; its
        ``radar_source`` attribute and last time seed the members.
    n_leadtimes : int
        Number of lead times.
    timestep_minutes : float, optional
        Lead-time step (pysteps' ``timestep``); by default the input frames' spacing.
    pixel_size_km : float, optional
        Pixel size (pysteps' ``kmperpixel``); by default the spacing of the inputs' ``x``
        coordinate, in metres, / 1000.
    n_ens_members : int, optional
        Number of members, by default 20.
    seed : int or None, optional
        The run's seed; the members are drawn from ``window_seed(seed, radar_source,
        reference_time)``. None draws unseeded (not reproducible) members.
    motion_method : str, optional
        pysteps motion method, by default ``"LK"``.
    velocity : numpy.ndarray, optional
        A precomputed motion field (2, y, x) in pixels per timestep (the window's shared one).
    num_workers : int, optional
        Members computed in parallel, by default 1. pysteps' Dask path runs on the synchronous
        scheduler for 1 and on local threads otherwise, never on a distributed client.
    ar_order, n_cascade_levels, noise_method, vel_pert_method, mask_method, probmatching_method
        pysteps' STEPS settings, by default 2, 6, ``"nonparametric"``, ``"bps"``,
        ``"incremental"`` and ``"cdf"``.
    **steps_kwargs
        Passed to pysteps' ``steps.forecast`` (e.g. ``norain_thr``, ``noise_kwargs``).

    Returns
    -------
    xarray.DataArray
        Members (realization, lead_time, y, x) in mm/h, with ``attrs["window_seed"]`` when
        seeded and ``attrs["steps_failed"]`` (the reason) when the window gave zeros.

    Raises
    ------
    ValueError
        If the inputs or the settings are not usable (too few frames, ``n_ens_members`` < 1).
    """
    check_inputs(inputs, n_leadtimes, max(ar_order + 1, N_MOTION_FRAMES))
    if int(n_ens_members) < 1 or int(num_workers) < 1:
        raise ValueError(
            f"n_ens_members and num_workers must be >= 1, got {n_ens_members}, {num_workers}"
        )
    settings = dict(
        n_ens_members=int(n_ens_members),
        n_cascade_levels=n_cascade_levels,
        precip_thr=PRECIP_THR_DB,
        kmperpixel=input_pixel_size_km(inputs, pixel_size_km),
        timestep=input_timestep(inputs, timestep_minutes),
        noise_method=noise_method,
        vel_pert_method=vel_pert_method,
        mask_method=mask_method,
        probmatching_method=probmatching_method,
        ar_order=ar_order,
        seed=None if seed is None else window_seed(seed, _source(inputs), reference_time(inputs)),
        num_workers=int(num_workers),
        **steps_kwargs,
    )
    rain_rate = np.clip(np.asarray(inputs.values, dtype=np.float64), 0.0, None)
    if velocity is None:
        velocity = motion_field(rain_rate, motion_method)
    # No data is no rain, as for the extrapolation.
    db = to_db(rain_rate[-(ar_order + 1) :])
    failure = dry_earlier_frame(db, settings)
    try:
        values_db = _pysteps_forecast(db, velocity, int(n_leadtimes), settings)
    except PYSTEPS_FAILURES as error:
        failure = f"pysteps raised {type(error).__name__}: {error}"
        shape = (settings["n_ens_members"], int(n_leadtimes), *db.shape[1:])
        values = np.zeros(shape)
    else:
        values, _ = dB_transform(values_db, threshold=PRECIP_THR_DB, inverse=True)
    result = to_ensemble_forecast(values, inputs, settings["timestep"], "steps")
    if settings["seed"] is not None:
        result.attrs["window_seed"] = settings["seed"]
    if failure:
        result.attrs[FAILED_ATTR] = failure
    return result


def _source(inputs: xr.DataArray) -> str:
    return str(inputs.attrs.get("radar_source", ""))


def dry_earlier_frame(db: np.ndarray, settings: dict) -> str | None:
    """Why pysteps will forecast no rain from a wet last frame, or None.

    pysteps' ``check_previous_radar_obs`` replaces the inputs with no rain when the last frame
    is wet and the one before it is dry (it cannot fit its AR model); it only prints a warning.
    The same test, with its window function and thresholds, names that case here.

    Parameters
    ----------
    db : numpy.ndarray
        Input frames (time, y, x) in dB.
    settings : dict
        The keyword arguments of pysteps' ``steps.forecast``.
    """
    win_fun = (settings.get("noise_kwargs") or {}).get("win_fun", "tukey")
    dry = [
        check_norain(frame, settings["precip_thr"], settings.get("norain_thr", 0.0), win_fun, False)
        for frame in db
    ]
    if len(dry) >= 2 and not dry[-1] and dry[-2]:
        return "the second-last input frame is dry: pysteps cannot fit its AR model"
    return None


def _pysteps_forecast(
    db: np.ndarray, velocity: np.ndarray, n_leadtimes: int, settings: dict
) -> np.ndarray:
    # pysteps' members run on a local pool when num_workers > 1 (pysteps_call says why).
    scheduler = "synchronous" if settings["num_workers"] == 1 else "threads"
    with pysteps_call(scheduler):
        return pysteps_steps.forecast(db, velocity, n_leadtimes, **settings)
