"""Helpers shared by the forecast methods: input checks, no-data mask and the Forecast wrapper."""

from __future__ import annotations

import numpy as np
import xarray as xr

from nowcast.nowcasts.forecast import make_ensemble_forecast, make_forecast
from nowcast.sources.cube import pixel_size
from nowcast.windows import cube_time_indices, input_times


def check_inputs(inputs: xr.DataArray, n_leadtimes: int, min_frames: int = 1) -> None:
    """Raise ValueError unless ``inputs`` is a (time, y, x) rain-rate stack usable for a forecast.

    Parameters
    ----------
    inputs : xarray.DataArray
        Input frames, rain rate in mm/h, dims (time, y, x) with a ``time`` coordinate.
    n_leadtimes : int
        Number of lead times asked for.
    min_frames : int, optional
        Fewest input frames the method needs, by default 1.
    """
    if not isinstance(inputs, xr.DataArray) or inputs.dims != ("time", "y", "x"):
        dims = getattr(inputs, "dims", None)
        raise ValueError(f"inputs must be an xarray.DataArray with dims (time, y, x), got {dims}")
    if "time" not in inputs.coords:
        raise ValueError("inputs need a 'time' coordinate (the last one is the reference time)")
    if inputs.sizes["time"] < min_frames:
        raise ValueError(f"this method needs {min_frames} input frames, got {inputs.sizes['time']}")
    if int(n_leadtimes) < 1:
        raise ValueError(f"n_leadtimes must be >= 1, got {n_leadtimes}")


def input_timestep(inputs: xr.DataArray, timestep_minutes: float | None = None) -> float:
    """The minutes between input frames, which is also the forecast's lead-time step.

    Parameters
    ----------
    inputs : xarray.DataArray
        Input frames with a ``time`` coordinate.
    timestep_minutes : float, optional
        Given timestep; required when there is a single input frame, checked otherwise.

    Returns
    -------
    float
        Timestep in minutes.

    Raises
    ------
    ValueError
        If the input times are not regular, or disagree with ``timestep_minutes``.
    """
    times = np.asarray(inputs["time"].values, dtype="datetime64[ns]")
    if times.size < 2:
        if timestep_minutes is None:
            raise ValueError("a single input frame needs timestep_minutes")
        return float(timestep_minutes)
    steps = np.unique(np.diff(times)) / np.timedelta64(1, "m")
    if steps.size != 1 or steps[0] <= 0:
        raise ValueError(f"input times are not regular: steps of {steps.tolist()} minutes")
    if timestep_minutes is not None and not np.isclose(steps[0], timestep_minutes):
        raise ValueError(
            f"input frames are {steps[0]:g} min apart but timestep_minutes={timestep_minutes}"
        )
    return float(steps[0])


def input_pixel_size_km(inputs: xr.DataArray, pixel_size_km: float | None = None) -> float:
    """The grid's pixel size in km: ``pixel_size_km`` when given, else the spacing of ``x``.

    Parameters
    ----------
    inputs : xarray.DataArray
        Input frames with an ``x`` coordinate in metres (as the cube's).
    pixel_size_km : float, optional
        Given pixel size.

    Raises
    ------
    ValueError
        If the size is not positive, or is not given for a grid of one column.
    """
    if pixel_size_km is None:
        pixel_size_km = pixel_size(inputs["x"].values) / 1000.0
    if not np.isfinite(pixel_size_km) or pixel_size_km <= 0:
        raise ValueError(f"pixel size must be a positive number of km, got {pixel_size_km}")
    return float(pixel_size_km)


def reference_time(inputs: xr.DataArray) -> np.datetime64:
    """The forecast reference time: the time of the last input frame."""
    return np.datetime64(inputs["time"].values[-1], "ns")


def no_data_mask(inputs: xr.DataArray) -> np.ndarray:
    """Boolean (y, x) mask of the pixels without data in the last input frame.

    The radar's no-data area (outside its range) is static, so the last frame's NaN pixels are
    kept as no-data in every lead time of a forecast.
    """
    return ~np.isfinite(np.asarray(inputs.values[-1]))


def to_forecast(
    values: np.ndarray, inputs: xr.DataArray, timestep_minutes: float, method: str
) -> xr.DataArray:
    """Wrap forecast values as the Forecast contract, with the inputs' no-data mask applied.

    Parameters
    ----------
    values : numpy.ndarray
        Forecast rain rate (n_leadtimes, y, x) in mm/h.
    inputs : xarray.DataArray
        The input frames (they give the grid, the CRS and the reference time).
    timestep_minutes : float
        Lead-time step.
    method : str
        Method name, recorded in the ``method`` attribute.

    Returns
    -------
    xarray.DataArray
        See :func:`nowcast.nowcasts.forecast.make_forecast`.
    """
    values = np.array(values, dtype=np.float32)
    values[:, no_data_mask(inputs)] = np.nan
    return make_forecast(values, reference_time(inputs), timestep_minutes, inputs, method=method)


def to_ensemble_forecast(
    values: np.ndarray, inputs: xr.DataArray, timestep_minutes: float, method: str
) -> xr.DataArray:
    """:func:`to_forecast` for members (n_members, n_leadtimes, y, x): dims (realization, ...).

    The last input frame's no-data area is NaN in every member and lead time.
    """
    values = np.array(values, dtype=np.float32)
    values[:, :, no_data_mask(inputs)] = np.nan
    return make_ensemble_forecast(
        values, reference_time(inputs), timestep_minutes, inputs, method=method
    )


def cube_inputs(
    cube: xr.Dataset, reference_time, n_input_frames: int, timestep_minutes: int | None = None
) -> xr.DataArray:
    """Read the input frames of one forecast from a cube, ready for any forecast method.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube opened with :func:`nowcast.sources.cube.open_cube`.
    reference_time : datetime-like
        Time of the last input frame.
    n_input_frames : int
        Number of input frames.
    timestep_minutes : int, optional
        Minutes between input frames, by default the cube's timestep (a multiple of it reads a
        resampled sequence).

    Returns
    -------
    xarray.DataArray
        Rain rate (time, y, x) in memory, with the cube's CRS in ``attrs["crs_wkt"]`` and its
        ``source`` in ``attrs["radar_source"]``.

    Raises
    ------
    nowcast.windows.FramesNotInCubeError
        (a KeyError) If a frame time is not in the cube, or the frames cross a segment boundary.
    """
    step = timestep_minutes or int(cube.attrs["timestep_minutes"])
    times = input_times(reference_time, n_input_frames, step)
    indices = cube_time_indices(cube, times, "input frames")
    # Synchronous: a few chunks, and it may run inside a Dask task.
    inputs = cube["rain_rate"].isel(time=indices).compute(scheduler="synchronous")
    inputs.attrs = {
        **inputs.attrs,
        "crs_wkt": cube["crs"].attrs["crs_wkt"],
        "radar_source": cube.attrs.get("source", ""),
    }
    if cube.attrs.get("institution"):
        inputs.attrs["institution"] = cube.attrs["institution"]
    return inputs
