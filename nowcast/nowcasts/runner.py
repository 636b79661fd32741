"""Forecast one window: its inputs, its observations and every method's forecast.

The one place where a stage turns a window (a cube and a reference time) into forecasts.
Evaluate maps :func:`forecast_window` over its Dask workers; blend fitting, calibration, export
and predict call it in-process, so every stage reads the same frames, shares the motion the same
way and builds the variants (:mod:`nowcast.nowcasts.variants`) with the same functions.

Motion is estimated once per window, at the resolution the run needs, and shared by every
method that advects:

- when a pysteps method that advects runs (``extrapolation``, ``sprog``, ``steps``,
  ``model_steps``, ...: :data:`~nowcast.nowcasts.interface.FULL_MOTION_METHODS`), the
  full-resolution Lucas-Kanade field (:func:`nowcast.advection.motion.motion_field`), also
  handed to a Lagrangian-frame model;
- otherwise nothing is estimated here: a Lagrangian-frame model computes its own coarse field
  (:func:`nowcast.advection.motion.coarse_motion_field`), which agrees with the full field at its
  nodes only to float rounding, so a model run alone gives the values it gives on its own.

A method given its own ``motion_method`` in ``method_kwargs`` estimates its own motion.

The learned ensemble ``ensemble`` is built from ``method_kwargs["ensemble"]``: its
``checkpoint`` (a stochastic model's, loaded once per process and checkpoint version; by default
the packaged :data:`~nowcast.training.checkpoint.PRETRAINED_ENSEMBLE_CHECKPOINT`) and
optionally ``n_members``, ``member_batch``, ``seed`` and ``noise_gain``, which go to each
call. The deterministic model perturbed with STEPS noise, ``model_steps``, is built from
``method_kwargs["model_steps"]["checkpoint"]`` (a deterministic model's), by default the run's
``checkpoint``; its other keys (``n_ens_members``, ``seed``, pysteps settings) go to each call,
and its model advects along the shared motion it is given.

Forecasts are passed on as the methods return them: dimensions beyond ``(lead_time, y, x)``
reach the caller untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import xarray as xr

from nowcast.advection.motion import motion_field
from nowcast.config import ConfigError
from nowcast.nowcasts.forecast import make_forecast
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import FULL_MOTION_METHODS, get_method, uses_motion
from nowcast.nowcasts.variants import base_methods, forecast_variants
from nowcast.sources.cube import open_cube
from nowcast.training.checkpoint import PRETRAINED_ENSEMBLE_CHECKPOINT as PRETRAINED_ENSEMBLE
from nowcast.windows import cube_time_indices, valid_times


@dataclasses.dataclass(frozen=True)
class ForecastRun:
    """What to forecast from every window of a run (small: sent to every Dask task).

    Attributes
    ----------
    methods : tuple of str
        Registered method names and variant names, in output order.
    method_kwargs : dict
        Extra keyword arguments per registered method.
    checkpoint : str or None
        Model checkpoint, when a method needs the model.
    device : str or None
        Device of the model; None picks CUDA when available.
    n_input_frames : int
        Input frames read per window.
    n_leadtimes : int
        Lead times forecast (and observed).
    timestep_minutes : int
        Minutes between input frames, and between lead times.
    variants : dict
        The variants among ``methods`` (name to :class:`~nowcast.nowcasts.variants.MethodSpec`).
    checkpoint_calibration : bool
        Apply an isotonic calibration stored in the checkpoint itself (deprecated; see
        :class:`~nowcast.nowcasts.model.ModelNowcast`). False runs the raw model.
    """

    methods: tuple[str, ...]
    method_kwargs: dict
    checkpoint: str | None
    device: str | None
    n_input_frames: int
    n_leadtimes: int
    timestep_minutes: int
    variants: dict = dataclasses.field(default_factory=dict)
    checkpoint_calibration: bool = True

    @property
    def lead_times(self) -> np.ndarray:
        """Lead times in minutes."""
        return self.timestep_minutes * np.arange(1, self.n_leadtimes + 1, dtype=float)


@dataclasses.dataclass
class WindowForecast:
    """The forecasts of one window and what they were made from.

    Attributes
    ----------
    inputs : xarray.DataArray
        Input frames (time, y, x), as :func:`nowcast.nowcasts.inputs.cube_inputs` reads them.
    observed : xarray.DataArray or None
        Observations at the lead times (lead_time, y, x), method attribute ``observed``; None
        when not read (predict).
    motion : numpy.ndarray or None
        The full-resolution motion (2, y, x) shared by the methods, None when none was needed
        (see the module docstring).
    forecasts : dict of str to xarray.DataArray
        Method or variant name to forecast, in the order of :attr:`ForecastRun.methods`.
    seconds : dict of str to float
        Wall seconds of ``read`` (inputs and observations) and ``forecast`` (motion, methods
        and variants).
    """

    inputs: xr.DataArray
    observed: xr.DataArray | None
    motion: np.ndarray | None
    forecasts: dict[str, xr.DataArray]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def reference_time(self) -> np.datetime64:
        """Time of the last input frame."""
        return np.datetime64(self.inputs["time"].values[-1], "ns")


def model_method(checkpoint: str, device: str | None = None, calibrated: bool = True):
    """The model method of a checkpoint, loaded once per process and checkpoint version.

    Parameters
    ----------
    checkpoint : str
        Checkpoint path; a rewritten file (new modification time) is loaded again.
    device : str, optional
        Device; None picks CUDA when available.
    calibrated : bool, optional
        See :attr:`ForecastRun.checkpoint_calibration`.

    Returns
    -------
    nowcast.nowcasts.model.ModelNowcast
    """
    return _cached_model(str(checkpoint), device, calibrated, os.path.getmtime(checkpoint))


@functools.lru_cache(maxsize=4)
def _cached_model(checkpoint: str, device: str | None, calibrated: bool, modified: float):
    return get_method("model")(checkpoint=checkpoint, device=device, calibrated=calibrated)


def ensemble_method(checkpoint: str, device: str | None = None):
    """The learned ensemble of a stochastic model's checkpoint, loaded once per process and
    checkpoint version (as :func:`model_method`).

    Parameters
    ----------
    checkpoint : str
        Checkpoint path of a stochastic model.
    device : str, optional
        Device; None picks CUDA when available.

    Returns
    -------
    nowcast.nowcasts.model.EnsembleNowcast
        Its ``n_members``, ``member_batch`` and ``seed`` are the defaults; a call overrides them.

    Raises
    ------
    ConfigError
        If the checkpoint's model is deterministic.
    """
    return _cached_ensemble(str(checkpoint), device, os.path.getmtime(checkpoint))


@functools.lru_cache(maxsize=4)
def _cached_ensemble(checkpoint: str, device: str | None, modified: float):
    return get_method("ensemble")(checkpoint=checkpoint, device=device)


def model_steps_method(checkpoint: str, device: str | None = None, calibrated: bool = True):
    """The deterministic model of a checkpoint perturbed with STEPS noise, loaded once per
    process and checkpoint version (as :func:`model_method`, whose model it shares).

    Parameters
    ----------
    checkpoint : str
        Checkpoint path of a deterministic model.
    device : str, optional
        Device; None picks CUDA when available.
    calibrated : bool, optional
        See :attr:`ForecastRun.checkpoint_calibration`.

    Returns
    -------
    nowcast.nowcasts.model_steps.ModelStepsNowcast

    Raises
    ------
    ConfigError
        If the checkpoint's model is stochastic.
    """
    return _cached_model_steps(str(checkpoint), device, calibrated, os.path.getmtime(checkpoint))


@functools.lru_cache(maxsize=4)
def _cached_model_steps(checkpoint: str, device: str | None, calibrated: bool, modified: float):
    model = model_method(checkpoint, device, calibrated)
    return get_method("model_steps")(model=model)


#: ``method_kwargs`` keys, per method, that build the method rather than go to its calls.
BUILD_KEYS = {"ensemble": ("checkpoint",), "model_steps": ("checkpoint",)}


def _methods(names: list[str], run: ForecastRun) -> dict[str, Callable]:
    methods = {}
    for name in names:
        if name == "model":
            if run.checkpoint is None:
                raise ValueError("method 'model' needs a checkpoint")
            methods[name] = model_method(run.checkpoint, run.device, run.checkpoint_calibration)
        elif name == "ensemble":
            checkpoint = run.method_kwargs.get("ensemble", {}).get("checkpoint")
            if not checkpoint and PRETRAINED_ENSEMBLE.is_file():
                checkpoint = str(PRETRAINED_ENSEMBLE)
            if not checkpoint:
                raise ConfigError(
                    "method 'ensemble' needs method_kwargs: {ensemble: {checkpoint: PATH}} "
                    f"(a stochastic model's checkpoint; the packaged {PRETRAINED_ENSEMBLE} "
                    "is missing)"
                )
            methods[name] = ensemble_method(checkpoint, run.device)
        elif name == "model_steps":
            checkpoint = run.method_kwargs.get("model_steps", {}).get("checkpoint")
            checkpoint = checkpoint or run.checkpoint
            if not checkpoint:
                raise ConfigError(
                    "method 'model_steps' needs a deterministic model's checkpoint: set "
                    "method_kwargs: {model_steps: {checkpoint: PATH}}"
                )
            methods[name] = model_steps_method(checkpoint, run.device, run.checkpoint_calibration)
        else:
            methods[name] = get_method(name)
    return methods


def _call_kwargs(name: str, run: ForecastRun) -> dict:
    """The method's ``method_kwargs`` less those that built it."""
    kwargs = dict(run.method_kwargs.get(name, {}))
    for key in BUILD_KEYS.get(name, ()):
        kwargs.pop(key, None)
    return kwargs


def _takes_motion(name: str, method: Callable, run: ForecastRun) -> bool:
    # A method advects along the shared motion unless its kwargs choose another estimate.
    return uses_motion(name, method) and "motion_method" not in run.method_kwargs.get(name, {})


def shared_motion(
    inputs: xr.DataArray, names: Iterable[str], methods: Mapping[str, Callable], run: ForecastRun
) -> np.ndarray | None:
    """The full-resolution motion of ``inputs`` when a pysteps method advects, else None.

    Parameters
    ----------
    inputs : xarray.DataArray
        Input frames (time, y, x).
    names : iterable of str
        Registered methods that run.
    methods : mapping of str to callable
        The built methods (a Lagrangian-frame model says it advects).
    run : ForecastRun
        Its ``method_kwargs``: a method with its own ``motion_method`` is left out.
    """
    advecting = [name for name in names if _takes_motion(name, methods[name], run)]
    if not any(name in FULL_MOTION_METHODS for name in advecting):
        return None
    return motion_field(np.asarray(inputs.values))


def forecast_inputs(
    inputs: xr.DataArray, run: ForecastRun, observed: xr.DataArray | None = None
) -> WindowForecast:
    """Every method and variant of ``run`` from the same inputs.

    The bases of the variants run once each, even when several variants share them; the motion
    is estimated at most once (:func:`shared_motion`) and passed to every method that advects.

    Parameters
    ----------
    inputs : xarray.DataArray
        Input frames (time, y, x) in mm/h.
    run : ForecastRun
        Methods, variants and lead times.
    observed : xarray.DataArray, optional
        Observations of the window, kept in the result.

    Returns
    -------
    WindowForecast
    """
    start = time.perf_counter()
    names = base_methods(run.methods, run.variants)
    methods = _methods(names, run)
    motion = shared_motion(inputs, names, methods, run)
    forecasts = {}
    for name in names:
        kwargs = _call_kwargs(name, run)
        if motion is not None and _takes_motion(name, methods[name], run):
            kwargs.setdefault("velocity", motion)
        forecasts[name] = methods[name](inputs, run.n_leadtimes, **kwargs)
        forecasts[name].attrs["method"] = name
    forecasts = forecast_variants(run.methods, run.variants, forecasts, inputs)
    seconds = {"forecast": time.perf_counter() - start}
    return WindowForecast(inputs, observed, motion, forecasts, seconds)


def observed_frames(
    cube: xr.Dataset, reference_time, n_leadtimes: int, timestep_minutes: int
) -> xr.DataArray:
    """The observations at the lead times of a forecast, in the Forecast layout.

    Returns
    -------
    xarray.DataArray
        Rain rate (lead_time, y, x) with the method attribute ``observed``.

    Raises
    ------
    nowcast.windows.FramesNotInCubeError
        (a KeyError) If a valid time is not in the cube.
    """
    times = valid_times(reference_time, n_leadtimes, timestep_minutes)
    indices = cube_time_indices(cube, times, "observations")
    values = cube["rain_rate"].isel(time=indices).compute(scheduler="synchronous")
    return make_forecast(
        values.values, pd.Timestamp(reference_time), timestep_minutes, cube, method="observed"
    )


def forecast_window(
    cube: xr.Dataset, reference_time, run: ForecastRun, observe: bool = True
) -> WindowForecast:
    """Read one window's inputs (and observations) from a cube and forecast every method.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube opened with :func:`nowcast.sources.cube.open_cube` (or built in memory).
    reference_time : datetime-like
        Time of the last input frame.
    run : ForecastRun
        Frames to read, methods, variants and lead times.
    observe : bool, optional
        Also read the observations at the lead times, by default True.

    Returns
    -------
    WindowForecast

    Raises
    ------
    nowcast.windows.FramesNotInCubeError
        (a KeyError) If an input frame, or an observation when ``observe``, is not in the cube.
    """
    start = time.perf_counter()
    inputs = cube_inputs(cube, reference_time, run.n_input_frames, run.timestep_minutes)
    observed = None
    if observe:
        observed = observed_frames(cube, reference_time, run.n_leadtimes, run.timestep_minutes)
    read = time.perf_counter() - start
    window = forecast_inputs(inputs, run, observed)
    window.seconds = {"read": read, **window.seconds}
    return window


def forecast_windows(
    windows: Iterable[tuple[str, object]], run: ForecastRun, observe: bool = True
) -> Iterator[WindowForecast]:
    """:func:`forecast_window` for each ``(cube_path, reference_time)``, one at a time.

    Each cube is opened once; a window's forecasts are yielded before the next window is read,
    so a caller that writes or reduces them as they come holds one window at a time.
    """
    cubes: dict[str, xr.Dataset] = {}
    for path, reference_time in windows:
        if path not in cubes:
            cubes[path] = open_cube(path)
        yield forecast_window(cubes[path], reference_time, run, observe)
