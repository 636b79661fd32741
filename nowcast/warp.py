"""Load-time Lagrangian warp of patch sequences (torch, batched over samples and frames).

A Lagrangian patch store keeps the frames in the Eulerian frame and, per window, the LK motion of
its input frames on a coarse grid (:func:`nowcast.lagrangian.coarse_motion`). This module moves
a batch of patches into the Lagrangian frame of their window at load time, reproducing
:func:`nowcast.patches.lagrangian_window` (full-domain advection with pysteps, then the patch
cut out) on the patch alone:

1. the coarse motion is upsampled bilinearly onto the patch plus a ``margin`` (the *region*);
2. the semi-Lagrangian backward trajectories of the patch pixels are integrated exactly as
   ``pysteps.extrapolation.semilagrangian.extrapolate`` does (midpoint rule, one inner
   iteration, motion read with edge clamping, each step continuing from the previous
   displacement as in :func:`nowcast.lagrangian.displacements`);
3. rain rate (NaN as 0) and validity are read at the displaced points by bilinear interpolation;
   points outside the radar domain read 0, as ``scipy.ndimage.map_coordinates`` with
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


def _sample(field: torch.Tensor, points: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear values of ``field`` (B, C, H, W) at pixel ``points`` (B, h, w, 2) as (x, y)."""
    height, width = field.shape[-2:]
    scale = points.new_tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)])
    grid = points * scale - 1.0
    return F.grid_sample(field, grid, mode="bilinear", padding_mode=padding, align_corners=True)


def upsample_motion(
    coarse: torch.Tensor, domain_shape: tuple[int, int], origins: torch.Tensor, size: int
) -> torch.Tensor:
    """Full-resolution motion on square regions of the domain, by bilinear upsampling.

    Parameters
    ----------
    coarse : torch.Tensor
        (B, 2, yc, xc) motion (x then y component, pixels per step) at nodes spread evenly over
        the domain, corners included (see :func:`nowcast.lagrangian.coarse_motion`).
    domain_shape : tuple of int
        (ny, nx) of the full-resolution grid.
    origins : torch.Tensor
        (B, 2) domain row and column of each region's first pixel (may be negative).
    size : int
        Region edge in pixels.

    Returns
    -------
    torch.Tensor
        (B, 2, size, size). Region pixels outside the domain get the motion of the nearest
        domain edge, as pysteps' edge clamping would read them.
    """
    n_rows, n_cols = domain_shape
    offsets = torch.arange(size, dtype=coarse.dtype, device=coarse.device)
    rows = origins[:, 0, None].to(coarse.dtype) + offsets  # (B, size)
    cols = origins[:, 1, None].to(coarse.dtype) + offsets
    # Pixel (row, col) of the domain sits at normalized (2 col / (nx - 1) - 1, ...) of the
    # coarse grid, whose corner nodes are the domain's corner pixels (align_corners=True).
    grid_x = cols / max(n_cols - 1, 1) * 2.0 - 1.0
    grid_y = rows / max(n_rows - 1, 1) * 2.0 - 1.0
    grid = torch.stack(
        [
            grid_x[:, None, :].expand(-1, size, -1),
            grid_y[:, :, None].expand(-1, -1, size),
        ],
        dim=-1,
    )
    return F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=True)


def displacements(velocity: torch.Tensor, points: torch.Tensor, n_steps: int) -> list:
    """Cumulative semi-Lagrangian displacements of ``points`` after 1, ..., ``n_steps`` steps.

    The scheme of ``pysteps.extrapolation.semilagrangian.extrapolate`` with ``n_iter=1``, chained
    through ``displacement_prev`` as :func:`nowcast.lagrangian.displacements` does::

        v = V(p + d);  v = V(p + d - v / 2);  d = d - v

    Parameters
    ----------
    velocity : torch.Tensor
        (B, 2, H, W) motion on the region (x then y component), read with edge clamping.
    points : torch.Tensor
        (B, h, w, 2) region pixel coordinates (x, y) of the trajectories' end points.
    n_steps : int

    Returns
    -------
    list of torch.Tensor
        ``n_steps`` displacements (B, h, w, 2) as (x, y).
    """
    displacement = torch.zeros_like(points)
    result = []
    for _ in range(n_steps):
        increment = _sample(velocity, points + displacement, "border").permute(0, 2, 3, 1)
        increment = _sample(velocity, points + displacement - increment / 2.0, "border")
        displacement = displacement - increment.permute(0, 2, 3, 1)
        result.append(displacement)
    return result


def window_displacements(
    velocity: torch.Tensor, points: torch.Tensor, n_input: int, n_target: int
) -> torch.Tensor:
    """Displacement bringing each frame of a window to the reference time (the last input).

    As :func:`nowcast.lagrangian.window_moves`: input ``i`` moves forward by ``n_input - 1 - i``
    steps, the reference frame stays, target ``k`` moves back by ``k + 1`` steps.

    Returns
    -------
    torch.Tensor
        (B, n_input + n_target, h, w, 2).
    """
    forward = displacements(velocity, points, n_input - 1)
    backward = displacements(-velocity, points, n_target)
    moves = [forward[n_input - 2 - i] for i in range(n_input - 1)]
    moves.append(torch.zeros_like(points))
    return torch.stack(moves + backward, dim=1)


def warp_regions(
    rain_rate: torch.Tensor,
    coarse_motion: torch.Tensor,
    origins: torch.Tensor,
    domain_shape: tuple[int, int],
    n_input: int,
    margin: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move patch sequences into the Lagrangian frame of their window's input motion.

    Parameters
    ----------
    rain_rate : torch.Tensor
        (B, T, R, R) rain rate in mm/h of each sample's region (the patch and ``margin``
        pixels around it), NaN where there is no data or the region leaves the domain.
    coarse_motion : torch.Tensor
        (B, 2, yc, xc) coarse LK motion of each sample's window.
    origins : torch.Tensor
        (B, 2) domain row and column of each region's first pixel.
    domain_shape : tuple of int
        (ny, nx) of the source's grid.
    n_input : int
        Input frames; the other ``T - n_input`` are targets.
    margin : int
        Pixels around the patch; at least the trajectories' reach plus one.

    Returns
    -------
    rain_rate, valid : torch.Tensor
        (B, T, P, P) with ``P = R - 2 margin``: the moved rain rate (NaN where not valid) and
        its validity (advected validity > 0.99 and a valid reference pixel).
    """
    batch, n_frames, size = rain_rate.shape[:3]
    patch = size - 2 * margin
    dtype = coarse_motion.dtype
    velocity = upsample_motion(coarse_motion, domain_shape, origins, size)
    offsets = torch.arange(margin, margin + patch, dtype=dtype, device=rain_rate.device)
    points = torch.stack(
        [offsets[None, :].expand(patch, -1), offsets[:, None].expand(-1, patch)], dim=-1
    ).expand(batch, -1, -1, -1)
    moves = window_displacements(velocity, points, n_input, n_frames - n_input)
    where = points[:, None] + moves  # (B, T, P, P, 2) region coordinates
    finite = torch.isfinite(rain_rate)
    fields = torch.stack([torch.where(finite, rain_rate, 0.0), finite.to(rain_rate.dtype)], 2)
    moved = _sample(
        fields.reshape(batch * n_frames, 2, size, size).to(dtype),
        where.reshape(batch * n_frames, patch, patch, 2),
        "zeros",
    ).reshape(batch, n_frames, 2, patch, patch)
    # scipy's constant mode: a point outside the domain reads 0 even within a pixel of its edge.
    domain = where + origins.flip(-1).to(dtype)[:, None, None, None, :]
    limits = torch.tensor([domain_shape[1] - 1, domain_shape[0] - 1], dtype=dtype)
    inside = ((domain >= 0) & (domain <= limits)).all(dim=-1)
    values = torch.where(inside, moved[:, :, 0], 0.0)
    validity = torch.where(inside, moved[:, :, 1], 0.0)
    # The reference frame does not move: take it as it is rather than through interpolation.
    centre = (slice(None), slice(margin, margin + patch), slice(margin, margin + patch))
    reference = rain_rate[:, n_input - 1][centre].to(dtype)
    reference_valid = torch.isfinite(reference)
    values[:, n_input - 1] = torch.where(reference_valid, reference, 0.0)
    validity[:, n_input - 1] = reference_valid.to(dtype)
    valid = (validity > VALID_THRESHOLD) & reference_valid[:, None]
    return torch.where(valid, values, torch.nan), valid
