"""The deterministic model perturbed with STEPS noise (pysteps' blended STEPS, one "model").

pysteps 1.21.5's ``blending.steps.forecast`` takes an external nowcast (``precip_nowcast`` with
``nowcasting_method="external_nowcast"``) in place of its own extrapolation cascade, and needs
(NWP) model fields besides. Here both are the trained network's deterministic forecast
(:class:`~nowcast.nowcasts.model.ModelNowcast`), as one model member, with the window's shared
Lucas-Kanade motion as that member's motion at every lead time. pysteps then adds its
nonparametric noise cascade to the forecast's cascade, moves the noise along ``bps``-perturbed
motion, applies the incremental mask and matches each member's distribution (``cdf``) to the
forecast's. Each array starts with the analysis at lead time 0 (pysteps' t = 0), the last
observed frame, which pysteps correlates with the observation to weigh the model's cascade.

The conventions are those of :mod:`nowcast.nowcasts.steps`: dB fields (0.1 mm/h threshold,
-15 dB for no rain and for no data, in the inputs and in the model's forecast alike,
``precip_thr`` -10 dB), 6 cascade levels, ``kmperpixel`` and ``timestep`` from the inputs, the
members seeded by :func:`nowcast.nowcasts.seeds.window_seed` and drawn on a local Dask
scheduler. The members are transformed back to mm/h, and the last input frame's no-data area is
NaN in every member and lead time.

pysteps records the model's skill at t = 0 in files (``outdir_path_skill``) and regresses it
towards the climatological skill those files accumulate. Each forecast writes them to its own
temporary folder, removed afterwards, so every window regresses towards pysteps' default skill
(BPS 2006) whatever windows ran before it, and nothing is left on disk.

A window pysteps cannot forecast gives zeros (no data kept) named by ``attrs["steps_failed"]``
(:data:`nowcast.nowcasts.steps.FAILED_ATTR`, which the evaluation reports).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd
import xarray as xr

from nowcast import import_pysteps
from nowcast.advection.motion import N_MOTION_FRAMES, motion_field, to_db
from nowcast.config import ConfigError
from nowcast.nowcasts.inputs import (
    check_inputs,
    input_pixel_size_km,
    input_timestep,
    reference_time,
    to_ensemble_forecast,
)
from nowcast.nowcasts.model import ModelNowcast
from nowcast.nowcasts.pysteps_call import pysteps_call
from nowcast.nowcasts.seeds import window_seed
from nowcast.nowcasts.steps import FAILED_ATTR, N_MEMBERS, PRECIP_THR_DB, PYSTEPS_FAILURES
from nowcast.windows import counted_back, frames_per_model_step

blending_steps = import_pysteps("pysteps.blending.steps")
dB_transform = import_pysteps("pysteps.utils.transformation").dB_transform

METHOD = "model_steps"
#: Prefix of the temporary folder of pysteps' skill files.
SKILL_DIR_PREFIX = "nowcast-model-steps-"


class ModelStepsNowcast:
    """The forecast method ``model_steps``: a deterministic model's forecast with STEPS noise.

    Parameters
    ----------
    checkpoint : str or path-like, optional
        A deterministic model's checkpoint (the runner passes ``model`` instead: the model
        method it caches, :func:`nowcast.nowcasts.runner.model_method`).
    model : nowcast.nowcasts.model.ModelNowcast, optional
        An already built deterministic model method instead of a checkpoint.
    device : str, optional
        Device of the model; None picks CUDA when available.
    calibrated : bool, optional
        Apply the deprecated calibration stored in an old checkpoint, by default True (as the
        ``model`` method).

    Attributes
    ----------
    model : nowcast.nowcasts.model.ModelNowcast
        The deterministic model method.
    uses_motion : bool
        True: the members advect their noise along the inputs' Lucas-Kanade motion.

    Raises
    ------
    ConfigError
        If the checkpoint's model is stochastic (one line naming it).
    ValueError
        If neither or both of ``checkpoint`` and ``model`` are given.
    """

    uses_motion = True

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        model=None,
        device: str | None = None,
        calibrated: bool = True,
    ) -> None:
        if (checkpoint is None) == (model is None):
            raise ValueError("give either a checkpoint path or a built model method")
        if model is None:
            model = ModelNowcast(checkpoint, device=device, calibrated=calibrated)
        if getattr(model, "stochastic", False):
            name = getattr(model, "checkpoint", None) or getattr(model, "model_name", "model")
            raise ConfigError(
                f"{name}: model_steps perturbs a deterministic model's forecast, but "
                f"'{model.model_name}' is stochastic; give a deterministic checkpoint "
                "(or use the ensemble method for a stochastic one)"
            )
        self.model = model

    def __call__(self, inputs: xr.DataArray, n_leadtimes: int, **kwargs) -> xr.DataArray:
        """:func:`forecast` with this method's model; ``kwargs`` as there."""
        return forecast(inputs, n_leadtimes, self.model, **kwargs)


def forecast(
    inputs: xr.DataArray,
    n_leadtimes: int,
    model,
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
    pixel_size_km: float | None = None,
    **blending_kwargs,
) -> xr.DataArray:
    """Members of a deterministic model's forecast perturbed with STEPS noise (pysteps).

    Parameters
    ----------
    inputs : xarray.DataArray
        Rain rate (time, y, x) in mm/h, NaN for no data, with a ``time`` coordinate; enough
        frames for the model and at least ``ar_order + 1`` (and 3) at the model's timestep.
        Frames at a step k times shorter are read every k-th, counted back from the last, as
        the model reads them. Its ``radar_source`` attribute and last time seed the members.
    n_leadtimes : int
        Number of lead times, at most the model's ``n_target_frames``; they are at the model's
        timestep (pysteps' ``timestep``).
    model : nowcast.nowcasts.model.ModelNowcast
        The deterministic model method.
    n_ens_members : int, optional
        Number of members, by default 20.
    seed : int or None, optional
        The run's seed; the members are drawn from ``window_seed(seed, radar_source,
        reference_time)``. None draws unseeded (not reproducible) members.
    motion_method : str, optional
        pysteps motion method when ``velocity`` is not given, by default ``"LK"``.
    velocity : numpy.ndarray, optional
        The window's shared motion (2, y, x) in pixels per timestep: the model advects along it
        (a Lagrangian-frame model) and pysteps moves the noise along it. Ignored (estimated
        again) when the inputs are resampled to the model's timestep.
    num_workers : int, optional
        Members computed in parallel, by default 1: pysteps' Dask path runs on the synchronous
        scheduler for 1 and on local threads otherwise, never on a distributed client.
    ar_order, n_cascade_levels, noise_method, vel_pert_method, mask_method, probmatching_method
        pysteps' STEPS settings, by default 2, 6, ``"nonparametric"``, ``"bps"``,
        ``"incremental"`` and ``"cdf"``.
    pixel_size_km : float, optional
        Pixel size (pysteps' ``kmperpixel``); by default the spacing of the inputs' ``x``
        coordinate, in metres, / 1000.
    **blending_kwargs
        Passed to pysteps' ``blending.steps.forecast`` (e.g. ``norain_thr``,
        ``noise_kwargs``, ``weights_method``); not ``outdir_path_skill``, which is always a
        temporary folder.

    Returns
    -------
    xarray.DataArray
        Members (realization, lead_time, y, x) in mm/h, method ``model_steps``, with
        ``attrs["window_seed"]`` when seeded, ``attrs["model_checkpoint"]`` when the model came
        from a checkpoint and ``attrs["steps_failed"]`` (the reason) when pysteps could not
        forecast the window and the members are zeros.

    Raises
    ------
    ValueError
        If the inputs or the settings are not usable (too few frames, ``n_ens_members`` < 1,
        more lead times than the model predicts, ``outdir_path_skill`` given).
    """
    if int(n_ens_members) < 1 or int(num_workers) < 1:
        raise ValueError(
            f"n_ens_members and num_workers must be >= 1, got {n_ens_members}, {num_workers}"
        )
    if "outdir_path_skill" in blending_kwargs:
        raise ValueError("model_steps writes pysteps' skill files to a temporary folder of its own")
    check_inputs(inputs, n_leadtimes, max(ar_order + 1, N_MOTION_FRAMES))
    inputs, resampled = _at_model_step(inputs, model)
    if resampled:
        velocity = None
    check_inputs(inputs, n_leadtimes, max(ar_order + 1, N_MOTION_FRAMES))
    rain_rate = np.clip(np.asarray(inputs.values, dtype=np.float64), 0.0, None)
    if velocity is None:
        velocity = motion_field(rain_rate, motion_method)
    deterministic = model(inputs, int(n_leadtimes), velocity=velocity)
    timestep = float(deterministic["lead_time"].values[0] / np.timedelta64(1, "m"))
    settings = dict(
        n_ens_members=int(n_ens_members),
        n_cascade_levels=n_cascade_levels,
        precip_thr=PRECIP_THR_DB,
        kmperpixel=input_pixel_size_km(inputs, pixel_size_km),
        timestep=timestep,
        nowcasting_method="external_nowcast",
        noise_method=noise_method,
        vel_pert_method=vel_pert_method,
        mask_method=mask_method,
        probmatching_method=probmatching_method,
        ar_order=ar_order,
        seed=None if seed is None else window_seed(seed, _source(inputs), reference_time(inputs)),
        num_workers=int(num_workers),
        **blending_kwargs,
    )
    # No data is no rain in the inputs and in the model's forecast alike (as in steps), so
    # pysteps sees one field without holes; the no-data area is put back on the members.
    db = to_db(rain_rate[-(ar_order + 1) :])
    model_db = np.concatenate([db[-1:], to_db(deterministic.values)])
    failure = None
    try:
        values_db = _pysteps_forecast(db, model_db, velocity, reference_time(inputs), settings)
    except PYSTEPS_FAILURES as error:
        failure = f"pysteps raised {type(error).__name__}: {error}"
    else:
        if not np.isfinite(values_db).all():
            failure = "pysteps returned non-finite members"
    if failure:
        values = np.zeros((settings["n_ens_members"], *deterministic.shape))
    else:
        values, _ = dB_transform(values_db, threshold=PRECIP_THR_DB, inverse=True)
    result = to_ensemble_forecast(values, inputs, timestep, METHOD)
    if settings["seed"] is not None:
        result.attrs["window_seed"] = settings["seed"]
    if "model_checkpoint" in deterministic.attrs:
        result.attrs["model_checkpoint"] = deterministic.attrs["model_checkpoint"]
    if failure:
        result.attrs[FAILED_ATTR] = failure
    return result


def _source(inputs: xr.DataArray) -> str:
    return str(inputs.attrs.get("radar_source", ""))


def _at_model_step(inputs: xr.DataArray, model) -> tuple[xr.DataArray, bool]:
    """The inputs at the model's timestep (every k-th frame counted back from the last), and
    whether they were resampled, so that pysteps' timestep is the model's lead-time step."""
    model_step = getattr(model, "timestep_minutes", None)
    if model_step is None:
        return inputs, False
    k = frames_per_model_step(model_step, input_timestep(inputs), _source(inputs) or "the inputs")
    if k == 1:
        return inputs, False
    n_frames = inputs.sizes["time"]
    return inputs.isel(time=counted_back(n_frames, (n_frames - 1) // k + 1, k)), True


def _pysteps_forecast(
    db: np.ndarray,
    model_db: np.ndarray,
    velocity: np.ndarray,
    issued,
    settings: dict,
) -> np.ndarray:
    """pysteps' blended STEPS with the model's forecast ``model_db`` (t = 0 .. n, dB) as both the
    external nowcast and the one model member, in dB (members, lead_time, y, x)."""
    n_leadtimes = model_db.shape[0] - 1
    precip_model = model_db[None]
    # The same motion at every lead time (t = 0 .. n), without copying it.
    velocity_models = np.broadcast_to(velocity, (1, n_leadtimes + 1, *velocity.shape))
    # pysteps' members run on a local pool when num_workers > 1 (pysteps_call says why).
    scheduler = "synchronous" if settings["num_workers"] == 1 else "threads"
    # The model's field at t = 0 is the observation, so its skill there is 1 and pysteps' BPS
    # weights of t = 0 divide by zero; no member uses them (a non-finite member is a failure).
    with (
        tempfile.TemporaryDirectory(prefix=SKILL_DIR_PREFIX) as skill_dir,
        pysteps_call(scheduler),
        np.errstate(divide="ignore", invalid="ignore"),
    ):
        return blending_steps.forecast(
            precip=db,
            precip_models=precip_model.copy(),
            velocity=velocity,
            velocity_models=velocity_models,
            timesteps=n_leadtimes,
            issuetime=pd.Timestamp(issued).to_pydatetime(),
            precip_nowcast=precip_model,
            outdir_path_skill=skill_dir,
            **settings,
        )
