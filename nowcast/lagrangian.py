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
from scipy.ndimage import map_coordinates

from .nowcasts.extrapolation import motion_field

__all__ = [
    "motion_field",
    "displacements",
    "warp",
    "advect",
    "inputs_to_lagrangian",
    "targets_to_lagrangian",
    "outputs_from_lagrangian",
]


def displacements(velocity: np.ndarray, n_steps: int) -> list[np.ndarray]:
    """Cumulative semi-Lagrangian displacements after 1, ..., ``n_steps`` timesteps (pysteps).

    Each step continues from the previous displacement (``displacement_prev``), which is what
    pysteps' ``extrapolate`` does internally for a multi-step call.
    """
    extrapolate = extrapolation.get_method("semilagrangian")
    result, displacement = [], None
    for _ in range(n_steps):
        _, displacement = extrapolate(
            None, velocity, 1, displacement_prev=displacement, return_displacement=True
        )
        result.append(displacement)
    return result


def warp(field: np.ndarray, displacement: np.ndarray, outval: float = 0.0) -> np.ndarray:
    """Interpolate ``field`` at the displaced grid, as pysteps' ``extrapolate`` does.

    This is the single ``map_coordinates`` call at the end of pysteps' semi-Lagrangian step,
    written out so that one displacement serves every frame of a window: advecting all frames
    through ``extrapolate`` would recompute the same trajectories once per frame.
    """
    rows, cols = np.indices(field.shape, dtype=np.float64)
    coords = [rows + displacement[1], cols + displacement[0]]
    field = np.nan_to_num(np.asarray(field, dtype=np.float64), nan=0.0)
    return map_coordinates(field, coords, mode="constant", cval=outval, order=1, prefilter=False)


def advect(field: np.ndarray, velocity: np.ndarray, steps: int) -> np.ndarray:
    """Advect one field by ``steps`` timesteps (negative: backwards) with pysteps.

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
    if steps == 0:
        return np.nan_to_num(np.asarray(field, dtype=np.float64), nan=0.0)
    direction = 1.0 if steps > 0 else -1.0
    return warp(field, displacements(direction * velocity, abs(int(steps)))[-1])


def inputs_to_lagrangian(frames: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect input frames (time, y, x) forward to the time of the last frame."""
    n_frames = frames.shape[0]
    forward = displacements(velocity, n_frames - 1)
    return np.stack(
        [
            warp(frame, forward[n_frames - 2 - index])
            if index < n_frames - 1
            else np.nan_to_num(np.asarray(frame, dtype=np.float64), nan=0.0)
            for index, frame in enumerate(frames)
        ]
    )


def targets_to_lagrangian(targets: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect target frames (lead, y, x) back to the reference time (lead k by k steps)."""
    backward = displacements(-velocity, targets.shape[0])
    return np.stack([warp(frame, backward[k]) for k, frame in enumerate(targets)])


def outputs_from_lagrangian(outputs: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect Lagrangian outputs (lead, y, x) forward to their valid times."""
    forward = displacements(velocity, outputs.shape[0])
    return np.stack([warp(frame, forward[k]) for k, frame in enumerate(outputs)])
