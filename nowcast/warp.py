"""Load-time Lagrangian warp of patch sequences (torch, batched over samples and frames).

A Lagrangian patch store keeps the frames in the Eulerian frame and, per window, the LK motion of
its input frames on a coarse grid (:func:`nowcast.lagrangian.coarse_motion`). This module moves
a batch of patches into the Lagrangian frame of their window at load time, reproducing
:func:`nowcast.lagrangian.lagrangian_window` (full-domain advection with pysteps, then the patch
cut out) on the patch alone:

1. the coarse motion is upsampled bilinearly to the pixels (only those the trajectories visit);
2. the semi-Lagrangian backward trajectories of the patch pixels are integrated exactly as
   ``pysteps.extrapolation.semilagrangian.extrapolate`` does (midpoint rule, one inner
   iteration, motion read with edge clamping, each step continuing from the previous
   displacement as in :func:`nowcast.lagrangian.displacements`);
3. rain rate (NaN as 0) and validity are read at the displaced points by bilinear interpolation
   from a box of frames around the patch (the patch plus its trajectories' reach); points
   outside the radar domain read 0, as ``scipy.ndimage.map_coordinates`` with
   ``mode="constant"`` does.

``torch.nn.functional.grid_sample`` does the interpolation: with ``align_corners=True`` its
bilinear weights are those of ``map_coordinates(order=1)``; ``padding_mode="border"`` is
pysteps' ``mode="nearest"`` for the motion, and the explicit domain test replaces scipy's
constant mode (``grid_sample``'s zero padding would still blend the edge pixel within one pixel
outside the grid, which scipy does not). Hand-written rather than calling pysteps because pysteps
works on one full-domain NumPy field at a time; here one call serves a whole batch of patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: A pixel is valid when its advected validity exceeds this (as in ``lagrangian_window``).
VALID_THRESHOLD = 0.99


def motion_at(coarse: torch.Tensor, stride: int, domain_shape, points: torch.Tensor):
    """Motion at arbitrary points, as pysteps reads its full-resolution motion field.

    The full-resolution field is the bilinear upsampling of the coarse grid (nodes every
    ``stride`` pixels, :func:`nowcast.lagrangian.coarse_motion`); pysteps interpolates it
    bilinearly, clamping points to the domain edge (``map_coordinates(mode="nearest")``). As
    the nodes sit on pixels, that is the coarse grid read bilinearly at the clamped point.

    Parameters
    ----------
    coarse : torch.Tensor
        (B, 2, yc, xc) motion (x then y component, pixels per step).
    stride : int
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
    n_rows, n_cols = domain_shape
    limits = points.new_tensor([n_cols - 1, n_rows - 1])
    nodes = points.new_tensor([max(coarse.shape[-1] - 1, 1), max(coarse.shape[-2] - 1, 1)])
    clamped = torch.minimum(points.clamp(min=0.0), limits)
    grid = clamped / (stride * nodes) * 2.0 - 1.0
    return F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=True)


def displacements(coarse: torch.Tensor, stride: int, domain_shape, points, n_steps: int) -> list:
    """Cumulative semi-Lagrangian displacements of ``points`` after 1, ..., ``n_steps`` steps.

    The scheme of ``pysteps.extrapolation.semilagrangian.extrapolate`` with ``n_iter=1``, chained
    through ``displacement_prev`` as :func:`nowcast.lagrangian.displacements` does::

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
    displacement = torch.zeros_like(points)
    result = []
    for _ in range(n_steps):
        increment = motion_at(coarse, stride, domain_shape, points + displacement)
        increment = increment.permute(0, 2, 3, 1)
        increment = motion_at(coarse, stride, domain_shape, points + displacement - increment / 2)
        displacement = displacement - increment.permute(0, 2, 3, 1)
        result.append(displacement)
    return result


def window_displacements(
    coarse: torch.Tensor,
    stride: int,
    domain_shape: tuple[int, int],
    points: torch.Tensor,
    n_input: int,
    n_target: int,
) -> torch.Tensor:
    """Displacement bringing each frame of a window to the reference time (the last input).

    As :func:`nowcast.lagrangian.window_moves`: input ``i`` moves forward by ``n_input - 1 - i``
    steps, the reference frame stays, target ``k`` moves back by ``k + 1`` steps.

    Returns
    -------
    torch.Tensor
        (B, n_input + n_target, h, w, 2).
    """
    forward = displacements(coarse, stride, domain_shape, points, n_input - 1)
    backward = displacements(-coarse, stride, domain_shape, points, n_target)
    moves = [forward[n_input - 2 - i] for i in range(n_input - 1)]
    moves.append(torch.zeros_like(points))
    return torch.stack(moves + backward, dim=1)


def patch_points(origins: torch.Tensor, patch_size: int, dtype=torch.float64) -> torch.Tensor:
    """Domain pixel coordinates (B, P, P, 2) as (x, y) of patches with ``origins`` (B, 2)
    given as (row, column)."""
    offsets = torch.arange(patch_size, dtype=dtype)
    grid = torch.stack(
        [offsets[None, :].expand(patch_size, -1), offsets[:, None].expand(-1, patch_size)], -1
    )
    return grid[None] + origins.flip(-1).to(dtype)[:, None, None, :]


def warp_frames(
    stored: torch.Tensor,
    box_origins: torch.Tensor,
    where: torch.Tensor,
    domain_shape: tuple[int, int],
    n_input: int,
    to_rain_rate,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rain rate and validity read at the displaced points, as ``lagrangian_window`` does.

    Bilinear (``map_coordinates(order=1, mode="constant", cval=0)``) of the rain rate with no
    data as 0 and of the validity. Written as a gather of the four neighbours rather than
    ``grid_sample`` so that only the values read are turned into rain rate (a box of frames
    around a fast-moving window can be most of the domain).

    Parameters
    ----------
    stored : torch.Tensor
        (B, T, H, W) stored (normalized) values of a box of the domain around each sample that
        holds every displaced point; NaN where there is no data or outside the domain.
    box_origins : torch.Tensor
        (B, 2) domain (row, column) of each box's first pixel.
    where : torch.Tensor
        (B, T, P, P, 2) domain pixel coordinates (x, y) to read, per frame: the patch pixels
        plus the frame's displacement (zero for the reference frame ``n_input - 1``).
    domain_shape : tuple of int
    n_input : int
    to_rain_rate : callable
        Stored values (finite) -> rain rate in mm/h (the inverse normalization).

    Returns
    -------
    rain_rate, valid : torch.Tensor
        (B, T, P, P): the moved rain rate, NaN where not valid, and its validity (advected
        validity > 0.99 and a valid reference pixel).
    """
    batch, n_frames, height, width = stored.shape
    dtype = where.dtype
    local = where - box_origins.flip(-1).to(dtype)[:, None, None, None, :]
    base = local.floor()
    weight = local - base
    base = base.long()
    frame_offset = torch.arange(batch * n_frames).reshape(batch, n_frames, 1, 1) * height * width
    flat = stored.reshape(-1)
    moved = torch.zeros(where.shape[:-1], dtype=dtype)
    validity = torch.zeros_like(moved)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        col, row = base[..., 0] + dx, base[..., 1] + dy
        inbox = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        index = frame_offset + row.clamp(0, height - 1) * width + col.clamp(0, width - 1)
        value = flat[index].to(dtype)
        finite = inbox & torch.isfinite(value)
        w = (weight[..., 0] if dx else 1 - weight[..., 0]) * (
            weight[..., 1] if dy else 1 - weight[..., 1]
        )
        rain = to_rain_rate(torch.where(finite, value, 0.0))
        moved = moved + w * torch.where(finite, rain, 0.0)
        validity = validity + w * finite.to(dtype)
    # scipy's constant mode: a point outside the domain reads 0 even within a pixel of its edge.
    limits = where.new_tensor([domain_shape[1] - 1, domain_shape[0] - 1])
    inside = ((where >= 0) & (where <= limits)).all(dim=-1)
    moved = torch.where(inside, moved, 0.0)
    validity = torch.where(inside, validity, 0.0)
    # The reference frame is read at its own pixels (weights 0 and 1): unmoved, exactly.
    reference_valid = validity[:, n_input - 1] > 0.5
    valid = (validity > VALID_THRESHOLD) & reference_valid[:, None]
    return torch.where(valid, moved, torch.nan), valid
