"""Full-resolution reference of the Lagrangian frame: pysteps trajectories, scipy reads.

What nowcast shipped before the frame transport moved to :mod:`nowcast.advection.warp` (torch,
coarse
motion): kept here as the independent reference the torch transport is tested against. The
trajectories are pysteps' own (``extrapolate(..., return_displacement=True)``) and the reads
the ``map_coordinates`` call at the end of pysteps' semi-Lagrangian step.
"""

from __future__ import annotations

import numpy as np
from pysteps import extrapolation
from scipy.ndimage import map_coordinates

from nowcast.advection.motion import motion_field


def displacements(velocity: np.ndarray, n_steps: int) -> list[np.ndarray]:
    """Cumulative semi-Lagrangian displacements after 1, ..., ``n_steps`` timesteps (pysteps)."""
    extrapolate = extrapolation.get_method("semilagrangian")
    result, displacement = [], None
    for _ in range(n_steps):
        _, displacement = extrapolate(
            None, velocity, 1, displacement_prev=displacement, return_displacement=True
        )
        result.append(displacement)
    return result


def warp(field: np.ndarray, displacement: np.ndarray, outval: float = 0.0) -> np.ndarray:
    """Interpolate ``field`` at the displaced grid, as pysteps' ``extrapolate`` does."""
    rows, cols = np.indices(field.shape, dtype=np.float64)
    coords = [rows + displacement[1], cols + displacement[0]]
    field = np.nan_to_num(np.asarray(field, dtype=np.float64), nan=0.0)
    return map_coordinates(field, coords, mode="constant", cval=outval, order=1, prefilter=False)


def window_moves(velocity: np.ndarray, n_input: int, n_target: int) -> list:
    """Displacement bringing each frame of a window to the reference time (the last input)."""
    forward = displacements(velocity, n_input - 1)
    moves = [forward[n_input - 2 - i] for i in range(n_input - 1)]
    if n_input:
        moves.append(None)
    return moves + displacements(-velocity, n_target)


def move_frames(frames: np.ndarray, moves: list) -> np.ndarray:
    """Warp each frame (time, y, x) by its displacement (None: unchanged, NaN as 0)."""
    return np.stack(
        [
            np.nan_to_num(np.asarray(frame, dtype=np.float64), nan=0.0)
            if move is None
            else warp(frame, move)
            for frame, move in zip(frames, moves, strict=True)
        ]
    )


def outputs_from_lagrangian(outputs: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect Lagrangian outputs (lead, y, x) forward to their valid times."""
    return move_frames(outputs, displacements(velocity, outputs.shape[0]))


def lagrangian_window(
    frames: np.ndarray, n_input: int, velocity: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One full-domain window moved into the Lagrangian frame of its inputs.

    Rain rate and the validity mask are advected along the same trajectories; a pixel is valid
    where its advected validity is ~1 and the reference pixel is valid.

    Returns
    -------
    rain_rate, valid : numpy.ndarray
        (n_frames, y, x), NaN where not valid.
    """
    frames = np.asarray(frames, dtype=np.float64)
    if velocity is None:
        velocity = motion_field(frames[:n_input])
    moves = window_moves(velocity, n_input, frames.shape[0] - n_input)
    moved = move_frames(frames, moves)
    moved_valid = move_frames(np.isfinite(frames).astype(np.float64), moves)
    valid = (moved_valid > 0.99) & np.isfinite(frames[n_input - 1])[None]
    return np.where(valid, moved, np.nan).astype(np.float32), valid
