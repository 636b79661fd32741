"""The Lucas-Kanade motion field of a rain-rate stack (pysteps), as every stage estimates it.

The recipe of the pysteps extrapolation example: the last three frames in dB (``dB_transform``
with a 0.1 mm/h threshold, no rain and no data at -15 dB) go to pysteps' Lucas-Kanade method.
The extrapolation and S-PROG baselines, the Lagrangian-frame model and the Lagrangian patch store
all use this one recipe, so they share one motion (an evaluation computes it once per window).

The Lagrangian model and patch store keep the field on a coarse grid, a node every ``node_spacing``
pixels (:func:`coarse_motion`), read bilinearly in between
(:func:`nowcast.advection.warp.motion_at`). :func:`coarse_motion_field` computes those nodes
directly: pysteps' dense LK spends most of its time interpolating its few hundred sparse vectors
to every pixel, while the nodes of a grid with node_spacing ``s`` are ``s**2`` times fewer.
"""

from __future__ import annotations

import math

import numpy as np

from nowcast import import_pysteps

motion = import_pysteps("pysteps.motion")
utils = import_pysteps("pysteps.utils")
decluster = import_pysteps("pysteps.utils.cleansing").decluster
dB_transform = import_pysteps("pysteps.utils.transformation").dB_transform

#: Rain rate (mm/h) below which a pixel is "no rain" in the dB transform.
DB_THRESHOLD = 0.1
#: dB value of no rain and of no data when estimating motion.
DB_ZEROVALUE = -15.0
#: Frames the motion field is estimated from.
N_MOTION_FRAMES = 3
#: pysteps' ``dense_lucaskanade`` defaults for the densification of the sparse vectors.
DECLUSTER_SCALE = 20
IDW_DIST_OFFSET = 0.5


def to_db(rain_rate: np.ndarray) -> np.ndarray:
    """Rain rate (mm/h) to dB, with no rain and no data at :data:`DB_ZEROVALUE`.

    Parameters
    ----------
    rain_rate : numpy.ndarray
        Rain rate, any shape; NaN is no data.

    Returns
    -------
    numpy.ndarray
        float64 dB values, all finite.
    """
    rain_rate = np.clip(np.asarray(rain_rate, dtype=np.float64), 0.0, None)
    db, _ = dB_transform(rain_rate, threshold=DB_THRESHOLD, zerovalue=DB_ZEROVALUE)
    return np.where(np.isfinite(db), db, DB_ZEROVALUE)


def motion_field(rain_rate: np.ndarray, method: str = "LK", **kwargs) -> np.ndarray:
    """Estimate the advection field from the last frames of a rain-rate stack.

    Parameters
    ----------
    rain_rate : numpy.ndarray
        Rain rate (time, y, x) in mm/h; the last :data:`N_MOTION_FRAMES` frames are used.
    method : str, optional
        pysteps motion method, by default ``"LK"`` (Lucas-Kanade).
    **kwargs
        Passed to the pysteps motion method.

    Returns
    -------
    numpy.ndarray
        Motion (2, y, x) in pixels per timestep (x then y component).
    """
    frames = to_db(rain_rate[-N_MOTION_FRAMES:])
    return motion.get_method(method)(frames, **kwargs)


def coarse_grid_shape(shape: tuple[int, int], node_spacing: int) -> tuple[int, int]:
    """Nodes per axis of the coarse grid: every ``node_spacing`` pixels, covering the last pixel."""
    return tuple(math.ceil((n - 1) / node_spacing) + 1 for n in shape)


def node_pixels(n: int, node_spacing: int) -> np.ndarray:
    """Pixels along an axis of ``n`` whose values make the nodes (:func:`coarse_motion`).

    Every ``node_spacing``-th pixel, and the last pixel when the last node lies past the edge.
    """
    m = coarse_grid_shape((n,), node_spacing)[0]
    return np.minimum(np.arange(m) * node_spacing, n - 1)


def _nodes(samples: np.ndarray, axis: int, n: int, node_spacing: int) -> np.ndarray:
    """Node values along ``axis`` from the values at :func:`node_pixels` (an axis of ``n``).

    A node past the last pixel continues the line through the previous node and the last pixel,
    so interpolation between them is exact for a linear field.
    """
    nodes = np.array(samples, dtype=np.float64)
    m = nodes.shape[axis]
    if m > 1 and (m - 1) * node_spacing > n - 1:
        before = (m - 2) * node_spacing
        share = ((m - 1) * node_spacing - before) / (n - 1 - before)
        previous = np.take(nodes, m - 2, axis=axis)
        last = previous + (np.take(nodes, m - 1, axis=axis) - previous) * share
        index = [slice(None)] * nodes.ndim
        index[axis] = m - 1
        nodes[tuple(index)] = last
    return nodes


def coarse_motion(velocity: np.ndarray, node_spacing: int) -> np.ndarray:
    """A motion field (2, y, x) sampled every ``node_spacing`` pixels, (2, yc, xc) float32.

    Node ``(i, j)`` is pixel ``(i node_spacing, j node_spacing)`` (the last node may lie past the
    edge, see
    :func:`_nodes`). With nodes on pixels every pixel cell lies inside one coarse cell, so
    pysteps' bilinear read of the bilinearly upsampled field is the bilinear read of the coarse
    grid itself (``nowcast.advection.warp.motion_at``). LK motion is a smooth interpolation of
    sparse vectors, so little is lost; the store keeps ``node_spacing**2`` times fewer values.
    """
    velocity = np.asarray(velocity, dtype=np.float64)
    n_rows, n_cols = velocity.shape[1:]
    rows, cols = node_pixels(n_rows, node_spacing), node_pixels(n_cols, node_spacing)
    samples = velocity[:, rows][:, :, cols]
    nodes = _nodes(_nodes(samples, 1, n_rows, node_spacing), 2, n_cols, node_spacing)
    return np.ascontiguousarray(nodes, dtype=np.float32)


def lk_vectors(rain_rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sparse LK vectors of :func:`motion_field`, declustered as pysteps densifies them.

    Returns
    -------
    xy, uv : numpy.ndarray
        (n, 2) positions (x, y) and motion (u, v) in pixels per timestep; empty when pysteps
        finds no motion.
    """
    frames = to_db(rain_rate[-N_MOTION_FRAMES:])
    xy, uv = motion.get_method("LK")(frames, dense=False)
    if xy.shape[0] == 0:
        return xy, uv
    return decluster(xy, uv, DECLUSTER_SCALE, 1, False)


def coarse_motion_field(rain_rate: np.ndarray, node_spacing: int) -> np.ndarray:
    """``coarse_motion(motion_field(rain_rate), node_spacing)``, without the full-resolution field.

    pysteps' own inverse-distance interpolation (``idwinterp2d``) of the sparse LK vectors
    (:func:`lk_vectors`), evaluated at the node pixels only, which skips most of
    :func:`motion_field`'s work (timings: ``docs/performance.md``). The result equals the coarse
    sampling of the full field to float rounding (tested).

    ``idwinterp2d`` measures distances in cells of the grid it fills, then adds a 0.5 offset;
    on the node grid a cell is ``r`` pixels (its mean spacing), so the offset is passed as
    ``0.5 / r``: the weights ``(d / r + 0.5 / r) ** -p`` normalise to those of the full grid,
    ``(d + 0.5) ** -p``. One chunk (``nchunks=1``), as pysteps' four chunks of a full grid all
    have a spacing of one pixel.

    Parameters
    ----------
    rain_rate : numpy.ndarray
        Rain rate (time, y, x) in mm/h; the last :data:`N_MOTION_FRAMES` frames are used.
    node_spacing : int
        Pixels between nodes.

    Returns
    -------
    numpy.ndarray
        (2, yc, xc) float32 motion at the nodes (x then y component, pixels per timestep).
    """
    n_rows, n_cols = np.shape(rain_rate)[-2:]
    shape = coarse_grid_shape((n_rows, n_cols), node_spacing)
    xy, uv = lk_vectors(rain_rate)
    if xy.shape[0] == 0:
        return np.zeros((2, *shape), dtype=np.float32)
    rows, cols = node_pixels(n_rows, node_spacing), node_pixels(n_cols, node_spacing)
    spacing = np.mean(np.abs([np.gradient(cols).mean(), np.gradient(rows).mean()]))
    idw = utils.get_method("idwinterp2d")
    samples = idw(xy, uv, cols, rows, dist_offset=IDW_DIST_OFFSET / spacing, nchunks=1)
    samples = np.reshape(samples, (2, rows.size, cols.size))
    nodes = _nodes(_nodes(samples, 1, n_rows, node_spacing), 2, n_cols, node_spacing)
    return np.ascontiguousarray(nodes, dtype=np.float32)
