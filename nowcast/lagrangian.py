"""Lagrangian frame for advection-aware models (the L-CNN idea, Ritvanen et al. 2023).

Input frames are advected to the time of the last input frame along the pysteps Lucas-Kanade
motion estimated from the inputs only; target frames are advected back by their lead time. A
network trained on such pairs only has to learn growth and decay; its outputs are advected forward
again. Lagrangian persistence (all outputs equal to the last input) is then exactly pysteps'
extrapolation nowcast, which a residual ConvLSTM reproduces before any training.
"""

from __future__ import annotations

import numpy as np
from pysteps import extrapolation

from .nowcasts.extrapolation import motion_field

__all__ = [
    "motion_field",
    "advect",
    "inputs_to_lagrangian",
    "targets_to_lagrangian",
    "outputs_from_lagrangian",
]


def advect(field: np.ndarray, velocity: np.ndarray, steps: int) -> np.ndarray:
    """Advect one field by ``steps`` timesteps (negative: backwards) with pysteps.

    Integer steps go through pysteps' step-by-step semi-Lagrangian scheme, so advecting the
    last frame by k steps gives exactly lead k of the extrapolation nowcast.

    Parameters
    ----------
    field : numpy.ndarray
        Rain rate (y, x); NaN is treated as 0 while advecting.
    velocity : numpy.ndarray
        Motion (2, y, x) in pixels per timestep.
    steps : int
        Number of timesteps.

    Returns
    -------
    numpy.ndarray
        The advected field (y, x); pixels advected in from outside the grid are 0.
    """
    field = np.nan_to_num(np.asarray(field, dtype=np.float64), nan=0.0)
    if steps == 0:
        return field
    direction = 1.0 if steps > 0 else -1.0
    extrapolate = extrapolation.get_method("semilagrangian")
    advected = extrapolate(field, direction * velocity, abs(int(steps)), outval=0.0)
    return np.nan_to_num(advected[-1], nan=0.0)


def inputs_to_lagrangian(frames: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect input frames (time, y, x) forward to the time of the last frame."""
    n_frames = frames.shape[0]
    return np.stack(
        [advect(frame, velocity, n_frames - 1 - index) for index, frame in enumerate(frames)]
    )


def targets_to_lagrangian(targets: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect target frames (lead, y, x) back to the reference time (lead k by k steps)."""
    return np.stack([advect(frame, velocity, -(k + 1)) for k, frame in enumerate(targets)])


def outputs_from_lagrangian(outputs: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect Lagrangian outputs (lead, y, x) forward to their valid times."""
    return np.stack([advect(frame, velocity, k + 1) for k, frame in enumerate(outputs)])
