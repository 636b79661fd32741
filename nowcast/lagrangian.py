"""Lagrangian frame for advection-aware models (the L-CNN idea, Ritvanen et al. 2023).

Input frames are advected to the time of the last input frame along the pysteps Lucas-Kanade
motion estimated from the inputs only; target frames are advected back by their lead time. A
network trained on such pairs only has to learn growth and decay; its outputs are advected forward
again. Lagrangian persistence (all outputs equal to the last input) is then exactly pysteps'
extrapolation nowcast, which a residual ConvLSTM reproduces before any training.
"""

from __future__ import annotations

import math

import numpy as np
from pysteps import extrapolation
from scipy.ndimage import map_coordinates

from .motion import motion_field

__all__ = [
    "motion_field",
    "displacements",
    "warp",
    "window_moves",
    "move_frames",
    "inputs_to_lagrangian",
    "targets_to_lagrangian",
    "outputs_from_lagrangian",
    "coarse_grid_shape",
    "coarse_motion",
    "trajectory_margin",
    "lagrangian_window",
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


def window_moves(velocity: np.ndarray, n_input: int, n_target: int) -> list:
    """Displacement bringing each frame of a window to the reference time (the last input).

    Input ``i`` moves forward by ``n_input - 1 - i`` steps, the reference frame stays (None)
    and target ``k`` moves back by ``k + 1`` steps.
    """
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


def inputs_to_lagrangian(frames: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect input frames (time, y, x) forward to the time of the last frame."""
    return move_frames(frames, window_moves(velocity, frames.shape[0], 0))


def targets_to_lagrangian(targets: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect target frames (lead, y, x) back to the reference time (lead k by k steps)."""
    return move_frames(targets, window_moves(velocity, 0, targets.shape[0]))


def outputs_from_lagrangian(outputs: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Advect Lagrangian outputs (lead, y, x) forward to their valid times."""
    return move_frames(outputs, displacements(velocity, outputs.shape[0]))


def coarse_grid_shape(shape: tuple[int, int], stride: int) -> tuple[int, int]:
    """Nodes per axis of the coarse grid: every ``stride`` pixels, covering the last pixel."""
    return tuple(math.ceil((n - 1) / stride) + 1 for n in shape)


def _nodes(values: np.ndarray, axis: int, stride: int) -> np.ndarray:
    """Values every ``stride`` pixels along ``axis``; a node past the last pixel continues the
    line through the previous node and the last pixel, so interpolation between them is exact
    for a linear field."""
    n = values.shape[axis]
    m = coarse_grid_shape((n,), stride)[0]
    nodes = np.take(values, np.minimum(np.arange(m) * stride, n - 1), axis=axis)
    if m > 1 and (m - 1) * stride > n - 1:
        before = (m - 2) * stride
        share = ((m - 1) * stride - before) / (n - 1 - before)
        previous = np.take(values, before, axis=axis)
        last = previous + (np.take(values, n - 1, axis=axis) - previous) * share
        index = [slice(None)] * values.ndim
        index[axis] = m - 1
        nodes[tuple(index)] = last
    return nodes


def coarse_motion(velocity: np.ndarray, stride: int) -> np.ndarray:
    """A motion field (2, y, x) sampled every ``stride`` pixels, (2, yc, xc) float32.

    Node ``(i, j)`` is pixel ``(i stride, j stride)`` (the last node may lie past the edge, see
    :func:`_nodes`). With nodes on pixels every pixel cell lies inside one coarse cell, so
    pysteps' bilinear read of the bilinearly upsampled field is the bilinear read of the coarse
    grid itself (``nowcast.warp.motion_at``). LK motion is a smooth interpolation of sparse
    vectors, so little is lost; the store keeps ``stride**2`` times fewer values.
    """
    velocity = np.asarray(velocity, dtype=np.float64)
    nodes = _nodes(_nodes(velocity, 1, stride), 2, stride)
    return np.ascontiguousarray(nodes, dtype=np.float32)


def trajectory_margin(max_speed: float, n_input: int, n_target: int) -> int:
    """Pixels a window's trajectories can reach from their end point, plus one.

    Input frames move by up to ``n_input - 1`` steps and targets by up to ``n_target`` steps of
    at most ``max_speed`` pixels (per axis); bilinear reads need one more pixel.
    """
    return int(math.ceil(float(max_speed) * max(n_input - 1, n_target, 0))) + 1


def lagrangian_window(frames: np.ndarray, n_input: int) -> tuple[np.ndarray, np.ndarray]:
    """One full-domain window moved into the Lagrangian frame of its inputs.

    The reference for a Lagrangian patch store's samples (the store warps each patch at load
    time, :mod:`nowcast.warp`, and must match this with the patch cut out). The motion comes
    from the input frames only (as at forecast time). Rain rate and the validity mask are
    advected along the same trajectories; a pixel is valid where its advected validity is ~1,
    so pixels that came from outside the radar range are no-data, not dry.

    Returns
    -------
    rain_rate, valid : numpy.ndarray
        (n_frames, y, x), NaN where not valid.
    """
    frames = np.asarray(frames, dtype=np.float64)
    moves = window_moves(motion_field(frames[:n_input]), n_input, frames.shape[0] - n_input)
    moved = move_frames(frames, moves)
    moved_valid = move_frames(np.isfinite(frames).astype(np.float64), moves)
    valid = (moved_valid > 0.99) & np.isfinite(frames[n_input - 1])[None]
    return np.where(valid, moved, np.nan).astype(np.float32), valid
