"""Load-time Lagrangian warp of patch sequences (torch, batched over samples and frames).

A Lagrangian patch store keeps the frames in the Eulerian frame and, per window, the LK motion of
its input frames on a coarse grid (:func:`nowcast.advection.lagrangian.coarse_motion`). This module
moves
a batch of patches into the Lagrangian frame of their window at load time, reproducing
the full-domain advection of a window with pysteps' trajectories and scipy's reads (the
reference in ``tests/lagrangian_reference.py``), then the patch cut out, on the patch alone:

1. the coarse motion is upsampled bilinearly to the pixels (only those the trajectories visit);
2. the semi-Lagrangian backward trajectories of the patch pixels are integrated exactly as
   ``pysteps.extrapolation.semilagrangian.extrapolate`` does (midpoint rule, one inner
   iteration, motion read with edge clamping, each step continuing from the previous
   displacement, as pysteps' ``extrapolate(..., displacement_prev=...)`` chains steps);
3. rain rate (NaN as 0) and validity are read at the displaced points by bilinear interpolation
   from a box per frame around its displaced patch (:func:`frame_boxes`, read from the store's
   zarr frames by :func:`read_frame_boxes`); points outside the radar domain read 0, as
   ``scipy.ndimage.map_coordinates`` with ``mode="constant"`` does.

``torch.nn.functional.grid_sample`` does the interpolation: with ``align_corners=True`` its
bilinear weights are those of ``map_coordinates(order=1)``; ``padding_mode="border"`` is
pysteps' ``mode="nearest"`` for the motion, and the explicit domain test replaces scipy's
constant mode (``grid_sample``'s zero padding would still blend the edge pixel within one pixel
outside the grid, which scipy does not). Hand-written rather than calling pysteps because pysteps
works on one full-domain NumPy field at a time; here one call serves a whole batch of patches.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
import torch.nn.functional as F

#: A pixel is valid when its advected validity exceeds this (as in the reference window).
VALID_THRESHOLD = 0.99


def motion_at(coarse: torch.Tensor, node_spacing: int, domain_shape, points: torch.Tensor):
    """Motion at arbitrary points, as pysteps reads its full-resolution motion field.

    The full-resolution field is the bilinear upsampling of the coarse grid (nodes every
    ``node_spacing`` pixels, :func:`nowcast.advection.lagrangian.coarse_motion`); pysteps
    interpolates it
    bilinearly, clamping points to the domain edge (``map_coordinates(mode="nearest")``). As
    the nodes sit on pixels, that is the coarse grid read bilinearly at the clamped point.

    Parameters
    ----------
    coarse : torch.Tensor
        (B, 2, yc, xc) motion (x then y component, pixels per step).
    node_spacing : int
        Pixels between coarse nodes.
    domain_shape : tuple of int
        (ny, nx) of the full-resolution grid.
    points : torch.Tensor
        (B, h, w, 2) domain pixel coordinates (x, y).

    Returns
    -------
    torch.Tensor
        (B, 2, h, w).
    """
    return _motion_reader(coarse, node_spacing, domain_shape, points.shape[2])(points).permute(
        0, 3, 1, 2
    )


def _motion_reader(coarse: torch.Tensor, node_spacing: int, domain_shape, width: int):
    """:func:`motion_at` for points (B, h, ``width``, 2), as a function giving (B, h, w, 2)."""
    n_rows, n_cols = domain_shape
    nodes = [max(coarse.shape[-1] - 1, 1), max(coarse.shape[-2] - 1, 1)]
    # Bounds and scale of (x, y) repeated along a row of points: a (2,) operand broadcast
    # over the last dimension takes torch's slow path.
    limits = coarse.new_tensor([n_cols - 1, n_rows - 1]).repeat(width)
    scale = coarse.new_tensor(
        [2.0 / (node_spacing * nodes[0]), 2.0 / (node_spacing * nodes[1])]
    ).repeat(width)
    zero = coarse.new_zeros(())

    def read(points: torch.Tensor) -> torch.Tensor:
        rows = torch.clamp(points.flatten(-2), min=zero, max=limits)
        grid = rows.mul_(scale).sub_(1.0).view(points.shape)
        motion = F.grid_sample(
            coarse, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return motion.permute(0, 2, 3, 1)

    return read


def displacements(
    coarse: torch.Tensor, node_spacing: int, domain_shape, points, n_steps: int
) -> list:
    """Cumulative semi-Lagrangian displacements of ``points`` after 1, ..., ``n_steps`` steps.

    The scheme of ``pysteps.extrapolation.semilagrangian.extrapolate`` with ``n_iter=1``, chained
    through ``displacement_prev`` from one step to the next::

        v = V(p + d);  v = V(p + d - v / 2);  d = d - v

    Parameters
    ----------
    coarse : torch.Tensor
        (B, 2, yc, xc) coarse motion (see :func:`motion_at`); negate it to go back in time.
    domain_shape : tuple of int
    points : torch.Tensor
        (B, h, w, 2) domain pixel coordinates (x, y) of the trajectories' end points.
    n_steps : int

    Returns
    -------
    list of torch.Tensor
        ``n_steps`` displacements (B, h, w, 2) as (x, y).
    """
    motion = _motion_reader(coarse.to(points.dtype), node_spacing, domain_shape, points.shape[2])
    displacement = torch.zeros_like(points)
    result = []
    for _ in range(n_steps):
        displacement = _semi_lagrangian_step(motion, points, displacement)
        result.append(displacement)
    return result


def _semi_lagrangian_step(motion, points: torch.Tensor, displacement: torch.Tensor):
    """One step of :func:`displacements`: the displacement after it."""
    position = points + displacement
    increment = motion(torch.add(position, motion(position), alpha=-0.5))
    return displacement - increment


def stepwise_displacements(
    coarse_steps, node_spacing: int, domain_shape, points: torch.Tensor
) -> list:
    """:func:`displacements` with a motion field of its own at each step.

    Step ``k`` moves along ``coarse_steps[k]``, continuing from the displacement of step
    ``k - 1``, as pysteps' STEPS advects a member along its perturbed velocity (the motion plus
    that member's ``bps`` perturbation at the step's lead time).

    Parameters
    ----------
    coarse_steps : sequence of torch.Tensor
        One (B, 2, yc, xc) coarse motion per step (see :func:`motion_at`).
    node_spacing : int
    domain_shape : tuple of int
    points : torch.Tensor
        (B, h, w, 2) domain pixel coordinates (x, y) of the trajectories' end points.

    Returns
    -------
    list of torch.Tensor
        ``len(coarse_steps)`` cumulative displacements (B, h, w, 2) as (x, y).
    """
    displacement = torch.zeros_like(points)
    result = []
    for coarse in coarse_steps:
        motion = _motion_reader(
            coarse.to(points.dtype), node_spacing, domain_shape, points.shape[2]
        )
        displacement = _semi_lagrangian_step(motion, points, displacement)
        result.append(displacement)
    return result


def window_displacements(
    coarse: torch.Tensor,
    node_spacing: int,
    domain_shape: tuple[int, int],
    points: torch.Tensor,
    n_input: int,
    n_target: int,
) -> torch.Tensor:
    """Displacement bringing each frame of a window to the reference time (the last input).

    Input ``i`` moves forward by ``n_input - 1 - i``
    steps, the reference frame stays, target ``k`` moves back by ``k + 1`` steps.

    Returns
    -------
    torch.Tensor
        (B, n_input + n_target, h, w, 2).
    """
    forward = displacements(coarse, node_spacing, domain_shape, points, n_input - 1)
    backward = displacements(-coarse, node_spacing, domain_shape, points, n_target)
    moves = [forward[n_input - 2 - i] for i in range(n_input - 1)]
    moves.append(torch.zeros_like(points))
    return torch.stack(moves + backward, dim=1)


def patch_points(origins: torch.Tensor, patch_size: int, dtype=torch.float64) -> torch.Tensor:
    """Domain pixel coordinates (B, P, P, 2) as (x, y) of patches with ``origins`` (B, 2)
    given as (row, column)."""
    grid = grid_points((patch_size, patch_size), dtype)
    return grid + origins.flip(-1).to(dtype)[:, None, None, :]


def grid_points(shape: tuple[int, int], dtype=torch.float64) -> torch.Tensor:
    """Pixel coordinates (1, ny, nx, 2) as (x, y) of a grid of ``shape`` (ny, nx)."""
    rows = torch.arange(shape[0], dtype=dtype)
    columns = torch.arange(shape[1], dtype=dtype)
    grid = torch.stack(
        [columns[None, :].expand(shape[0], -1), rows[:, None].expand(-1, shape[1])], -1
    )
    return grid[None]


def frame_boxes(where: torch.Tensor, domain_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame, the box of domain pixels that the bilinear reads at ``where`` touch.

    One frame's points all moved by about the same displacement, so its box is about the patch
    (1.1 patch areas on the BoM day), while the box of all the frames of a fast-moving window
    is several (4.3): :func:`warp_frames` reads per-frame boxes.

    Parameters
    ----------
    where : torch.Tensor
        (B, T, P, P, 2) domain pixel coordinates (x, y).
    domain_shape : tuple of int

    Returns
    -------
    low, high : torch.Tensor
        (B, T, 2) int64 domain (row, column) of each box's first pixel and one past its last,
        clipped to the domain (at least one pixel).
    """
    # Rows first, then columns: torch reduces over an outer dimension much faster than over
    # the points with (x, y) innermost.
    rows = where.flatten(-2)
    low = rows.amin(2).unflatten(-1, (-1, 2)).amin(2)
    high = rows.amax(2).unflatten(-1, (-1, 2)).amax(2)
    limits = torch.tensor([domain_shape[1], domain_shape[0]])
    # At least one pixel inside the domain, also when every point lies beyond its first row or
    # column (a box ending at or before 0 would be a negative, wrapping slice): such points read
    # as outside the domain in warp_frames whatever the box holds.
    high = torch.minimum(high.floor().long() + 2, limits).clamp(min=1)
    low = torch.minimum(low.floor().long().clamp(min=0), high - 1)
    return low.flip(-1), high.flip(-1)


def read_frame_boxes(frames, starts: np.ndarray, low: np.ndarray, high: np.ndarray):
    """Stored values of one box per frame of each sample, NaN-padded to a common shape.

    Parameters
    ----------
    frames : zarr.Array
        (frame, y, x) stored frames.
    starts : numpy.ndarray
        (B,) first frame of each sample.
    low, high : numpy.ndarray
        (B, T, 2) (row, column) of each frame's box and one past its end
        (:func:`frame_boxes`).

    Returns
    -------
    numpy.ndarray
        (B, T, H, W), H and W the largest box (at least 2); box ``(k, t)`` at ``[k, t, :h, :w]``.

    Notes
    -----
    One zarr read per sample and storage chunk in time, of the union of the boxes of the
    sample's frames in that chunk: zarr decodes whole chunks, so reading frame by frame would
    decode chunks again, and one box around all the frames would decode many chunks that none
    of the frames needs.
    """
    n_samples, n_frames = low.shape[:2]
    depth = frames.chunks[0]
    reads = []  # (sample, its frames in one storage chunk, box origin, selection)
    for k, start in enumerate(starts):
        chunk_of = (start + np.arange(n_frames)) // depth
        for chunk in np.unique(chunk_of):
            times = np.flatnonzero(chunk_of == chunk)
            (r0, c0), (r1, c1) = low[k, times].min(axis=0), high[k, times].max(axis=0)
            selection = (
                slice(start + times[0], start + times[-1] + 1),
                slice(r0, r1),
                slice(c0, c1),
            )
            reads.append((k, times, (r0, c0), selection))
    # All reads in one go on zarr's event loop: their file reads and decoding overlap.
    # ``async_array`` is public only in zarr releases with zarr-developers/zarr-python#3556;
    # the private name serves the others.
    from zarr.core.sync import sync as zarr_sync  # lazy: a nowcast's transport never reads zarr

    reader = getattr(frames, "async_array", None) or frames._async_array
    blocks = zarr_sync(_gather(reader.getitem(read[-1]) for read in reads))
    shape = np.maximum((high - low).max(axis=(0, 1)), 2)
    boxes = np.full((n_samples, n_frames, *shape), np.nan, dtype=frames.dtype)
    for (k, times, origin, _), block in zip(reads, blocks, strict=True):
        for t, frame in zip(times, block, strict=True):
            (y0, x0), (y1, x1) = low[k, t] - origin, high[k, t] - origin
            boxes[k, t, : y1 - y0, : x1 - x0] = frame[y0:y1, x0:x1]
    return boxes


async def _gather(coroutines) -> list:
    return await asyncio.gather(*coroutines)


def sample_at(
    fields: torch.Tensor,
    box_origins: torch.Tensor,
    where: torch.Tensor,
    domain_shape: tuple[int, int],
) -> torch.Tensor:
    """Fields read bilinearly at domain points, as ``map_coordinates(order=1, mode="constant")``.

    The one interpolation of the Lagrangian frame: the load-time warp of patches
    (:func:`warp_frames`) and the full-domain transport of a nowcast
    (:class:`nowcast.advection.lagrangian.LagrangianFrame`) both read through it.

    Parameters
    ----------
    fields : torch.Tensor
        (N, C, H, W) values of a box of the domain (NaN-free; H and W at least 2).
    box_origins : torch.Tensor
        (N, 2) domain (row, column) of each box's first pixel.
    where : torch.Tensor
        (N, h, w, 2) domain pixel coordinates (x, y) to read.
    domain_shape : tuple of int

    Returns
    -------
    torch.Tensor
        (N, C, h, w); 0 at points outside the domain (scipy's constant mode: even within a
        pixel of its edge) and where a bilinear neighbour lies outside the box (zero padding).
    """
    height, width = fields.shape[-2:]
    dtype, n_columns = where.dtype, where.shape[2]
    # align_corners=True: -1 and 1 are the centres of the first and last pixel of the box.
    # (x, y) operands repeated along a row of points, as in _motion_reader.
    origins = box_origins.flip(-1).to(dtype)
    scale = where.new_tensor([2.0 / (width - 1), 2.0 / (height - 1)]).repeat(n_columns)
    rows = torch.sub(where.flatten(-2), origins.repeat(1, n_columns)[:, None])
    grid = rows.mul_(scale).sub_(1.0).view(where.shape)
    read = F.grid_sample(
        fields.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    x, y = where[..., 0], where[..., 1]
    inside = (x >= 0) & (x <= domain_shape[1] - 1) & (y >= 0) & (y <= domain_shape[0] - 1)
    return torch.where(inside[:, None], read, 0.0)


def warp_frames(
    stored: torch.Tensor,
    box_origins: torch.Tensor,
    where: torch.Tensor,
    domain_shape: tuple[int, int],
    n_input: int,
    to_rain_rate,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rain rate and validity read at the displaced points (the Lagrangian window of a patch).

    Bilinear (``map_coordinates(order=1, mode="constant", cval=0)``) of the rain rate with no
    data as 0 and of the validity: one :func:`sample_at` of the two fields of each frame's box
    (a neighbour outside the box reads 0, as one outside the domain does).

    Parameters
    ----------
    stored : torch.Tensor
        (B, T, H, W) stored (normalized) values of a box of the domain per frame that holds
        the frame's displaced points (see :func:`frame_boxes`); NaN where there is no data,
        outside the domain or past the box's end. H and W are at least 2.
    box_origins : torch.Tensor
        (B, T, 2) domain (row, column) of each box's first pixel.
    where : torch.Tensor
        (B, T, h, w, 2) domain pixel coordinates (x, y) to read, per frame: the patch pixels
        plus the frame's displacement (zero for the reference frame ``n_input - 1``, whose box
        starts at the patch origin).
    domain_shape : tuple of int
    n_input : int
    to_rain_rate : callable
        Stored values (finite) -> rain rate in mm/h (the inverse normalization).

    Returns
    -------
    rain_rate, valid : torch.Tensor
        (B, T, h, w): the moved rain rate, NaN where not valid, and its validity (advected
        validity > 0.99 and a valid reference pixel).
    """
    batch, n_frames, height, width = stored.shape
    n_rows, n_columns, dtype = where.shape[2], where.shape[3], where.dtype
    # The two fields written in place and in float arithmetic, as torch's boolean ops
    # (isfinite, where) are several times slower than float ones here, and the boxes hold
    # more values than are read.
    fields = torch.empty((batch, n_frames, 2, height, width), dtype=dtype, device=where.device)
    rain, finite = fields[:, :, 0], fields[:, :, 1]
    values = stored.to(where.device, dtype, copy=True)
    # 1 where the value is finite, 0 where NaN or infinite (x - x is NaN there).
    torch.sub(values, values, out=finite).add_(1.0).nan_to_num_(nan=0.0)
    values = values.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    torch.mul(to_rain_rate(values), finite, out=rain)
    origins = box_origins.expand(batch, n_frames, 2).flatten(0, 1)
    read = sample_at(fields.flatten(0, 1), origins, where.flatten(0, 1), domain_shape)
    read = read.unflatten(0, (batch, n_frames))
    moved, validity = read[:, :, 0], read[:, :, 1]
    # The reference frame is the patch itself (the weights are 0 and 1): taken as stored rather
    # than through grid_sample's coordinate rounding, so it is unmoved exactly.
    reference = n_input - 1
    moved[:, reference] = rain[:, reference, :n_rows, :n_columns]
    validity[:, reference] = finite[:, reference, :n_rows, :n_columns]
    reference_valid = validity[:, reference] > 0.5
    valid = (validity > VALID_THRESHOLD) & reference_valid[:, None]
    return torch.where(valid, moved, torch.nan), valid
