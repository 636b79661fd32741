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


def motion_at(coarse: torch.Tensor, domain_shape: tuple[int, int], points: torch.Tensor):
    """Full-resolution motion read at arbitrary points, as pysteps reads its motion field.

    The full-resolution field is the bilinear upsampling of the coarse grid onto the pixels;
    pysteps then interpolates that pixel field bilinearly, clamping points to the domain edge
    (``map_coordinates(mode="nearest", order=1)``). Both steps are done here without
    materialising the upsampled field: the four pixels around each point are upsampled and
    blended, so no region around a patch has to be sized in advance.

    Parameters
    ----------
    coarse : torch.Tensor
        (B, 2, yc, xc) motion (x then y component, pixels per step) at nodes spread evenly over
        the domain, corners included (see :func:`nowcast.lagrangian.coarse_motion`).
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
    points = torch.minimum(points.clamp(min=0.0), limits)
    base = torch.minimum(points.floor(), (limits - 1).clamp(min=0.0))
    weight = points - base
    corners = torch.stack(
        [base + base.new_tensor(offset) for offset in ((0, 0), (1, 0), (0, 1), (1, 1))], dim=3
    )  # (B, h, w, 4, 2) pixel coordinates, upsampled from the coarse grid below
    batch, height, width = points.shape[:3]
    grid = torch.minimum(corners, limits) / limits.clamp(min=1.0) * 2.0 - 1.0
    values = F.grid_sample(
        coarse,
        grid.reshape(batch, height, width * 4, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    ).reshape(batch, 2, height, width, 4)
    wx, wy = weight[..., 0][:, None], weight[..., 1][:, None]
    return (
        values[..., 0] * (1 - wx) * (1 - wy)
        + values[..., 1] * wx * (1 - wy)
        + values[..., 2] * (1 - wx) * wy
        + values[..., 3] * wx * wy
    )


def displacements(
    coarse: torch.Tensor, domain_shape: tuple[int, int], points: torch.Tensor, n_steps: int
) -> list:
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
        increment = motion_at(coarse, domain_shape, points + displacement).permute(0, 2, 3, 1)
        increment = motion_at(coarse, domain_shape, points + displacement - increment / 2.0)
        displacement = displacement - increment.permute(0, 2, 3, 1)
        result.append(displacement)
    return result


def window_displacements(
    coarse: torch.Tensor,
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
    forward = displacements(coarse, domain_shape, points, n_input - 1)
    backward = displacements(-coarse, domain_shape, points, n_target)
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
    frames: torch.Tensor,
    box_origins: torch.Tensor,
    where: torch.Tensor,
    domain_shape: tuple[int, int],
    n_input: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rain rate and validity read at the displaced points, as ``lagrangian_window`` does.

    Parameters
    ----------
    frames : torch.Tensor
        (B, T, H, W) rain rate (mm/h) of a box of the domain around each sample that holds
        every displaced point; NaN where there is no data (or the box leaves the domain).
    box_origins : torch.Tensor
        (B, 2) domain (row, column) of each box's first pixel.
    where : torch.Tensor
        (B, T, P, P, 2) domain pixel coordinates (x, y) to read, per frame: the patch pixels
        plus the frame's displacement (zero for the reference frame ``n_input - 1``).
    domain_shape : tuple of int
    n_input : int

    Returns
    -------
    rain_rate, valid : torch.Tensor
        (B, T, P, P): the moved rain rate, NaN where not valid, and its validity (advected
        validity > 0.99 and a valid reference pixel).
    """
    batch, n_frames, height, width = frames.shape
    patch = where.shape[2]
    dtype = where.dtype
    local = where - box_origins.flip(-1).to(dtype)[:, None, None, None, :]
    finite = torch.isfinite(frames)
    fields = torch.stack([torch.where(finite, frames, 0.0), finite.to(frames.dtype)], 2)
    scale = where.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    moved = F.grid_sample(
        fields.reshape(batch * n_frames, 2, height, width).to(dtype),
        (local * scale - 1.0).reshape(batch * n_frames, patch, patch, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    ).reshape(batch, n_frames, 2, patch, patch)
    # scipy's constant mode: a point outside the domain reads 0 even within a pixel of its edge.
    limits = where.new_tensor([domain_shape[1] - 1, domain_shape[0] - 1])
    inside = ((where >= 0) & (where <= limits)).all(dim=-1)
    values = torch.where(inside, moved[:, :, 0], 0.0)
    validity = torch.where(inside, moved[:, :, 1], 0.0)
    # The reference frame does not move: take its pixels as they are, not interpolated.
    rows = local[:, n_input - 1, :, 0, 1].round().long()  # (B, P)
    cols = local[:, n_input - 1, 0, :, 0].round().long()
    reference = torch.stack([frames[k, n_input - 1][rows[k]][:, cols[k]] for k in range(batch)]).to(
        dtype
    )
    reference_valid = torch.isfinite(reference)
    values[:, n_input - 1] = torch.where(reference_valid, reference, 0.0)
    validity[:, n_input - 1] = reference_valid.to(dtype)
    valid = (validity > VALID_THRESHOLD) & reference_valid[:, None]
    return torch.where(valid, values, torch.nan), valid
