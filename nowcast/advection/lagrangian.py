"""Lagrangian frame for advection-aware models (the L-CNN idea, Ritvanen et al. 2023).

Input frames are advected to the time of the last input frame along the pysteps Lucas-Kanade
motion estimated from the inputs only; target frames are advected back by their lead time. A
network trained on such pairs only has to learn growth and decay; its outputs are advected forward
again. Lagrangian persistence (all outputs equal to the last input) is then pysteps'
extrapolation nowcast, which a residual ConvLSTM reproduces before any training.

The motion is kept on a coarse grid (:func:`nowcast.advection.motion.coarse_motion_field`, a node
every
``node_spacing`` pixels, 8 by default) and the frames move with the one transport of
:mod:`nowcast.advection.warp` (the semi-Lagrangian trajectories of pysteps, bilinear reads by
``grid_sample``): the load-time warp of the patch store and the nowcast of a Lagrangian model are
the same computation, on a patch and on the whole domain: one batched transport instead of a
``scipy.ndimage.map_coordinates`` call per frame and step along pysteps' full-resolution
trajectories (timings: docs/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from nowcast import import_pysteps
from nowcast.advection import warp
from nowcast.advection.motion import (
    coarse_grid_shape,
    coarse_motion,
    coarse_motion_field,
)

#: Pixels between the nodes of the coarse motion grid, as the patch store keeps it by default
#: (``PatchConfig.motion_stride``).
DEFAULT_MOTION_STRIDE = 8


class LagrangianFrame:
    """The Lagrangian frame of one window, on the whole domain: trajectories computed once.

    Parameters
    ----------
    coarse : numpy.ndarray
        (2, yc, xc) motion on the coarse grid
        (:func:`nowcast.advection.motion.coarse_motion_field`), in
        pixels per timestep (x then y component).
    node_spacing : int
        Pixels between the coarse nodes (1: a full-resolution field).
    domain_shape : tuple of int
        (ny, nx) of the frames.
    n_steps : int
        Timesteps of the trajectories computed up front: the most any frame moves (inputs move
        up to ``n_input - 1``, outputs up to their number of lead times); more are computed
        when asked for.
    dtype : torch.dtype, optional
        Precision of the trajectories and reads, by default float32 as in the patch store's
        load-time warp the models are trained on.
    device : str or torch.device, optional
        Where the transport runs, by default the CPU (a model on a GPU moves its frames there).

    Examples
    --------
    >>> frame = LagrangianFrame.of_inputs(rain_rate, node_spacing=8, n_steps=6)
    >>> moved_inputs = frame.inputs_to_lagrangian(rain_rate)
    >>> forecast = frame.outputs_from_lagrangian(outputs)

    Targets move back to the reference time along the negated motion: lead ``k`` by ``k``
    steps is ``LagrangianFrame(-coarse, ...).outputs_from_lagrangian(targets)``.
    """

    def __init__(
        self,
        coarse,
        node_spacing: int,
        domain_shape,
        n_steps: int,
        dtype=torch.float32,
        device=None,
    ):
        self.domain_shape = tuple(int(n) for n in domain_shape)
        expected = coarse_grid_shape(self.domain_shape, node_spacing)
        if tuple(np.shape(coarse)[1:]) != expected:
            raise ValueError(
                f"coarse motion of shape {np.shape(coarse)} does not fit a "
                f"{self.domain_shape} grid with nodes every {node_spacing} pixels "
                f"(expected (2, *{expected}))"
            )
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.points = warp.grid_points(self.domain_shape, dtype).to(self.device)
        coarse = torch.as_tensor(np.asarray(coarse), dtype=dtype, device=self.device)[None]
        self.node_spacing, self.coarse = int(node_spacing), coarse
        self._forward = self._displacements(self.coarse, n_steps)

    def _displacements(self, coarse: torch.Tensor, n_steps: int) -> torch.Tensor:
        """(n_steps, ny, nx, 2): the displacement after 1, ..., n_steps steps along ``coarse``."""
        moves = warp.displacements(
            coarse, self.node_spacing, self.domain_shape, self.points, n_steps
        )
        return self._joined(moves)

    def _joined(self, moves: list) -> torch.Tensor:
        """Displacements (1, ny, nx, 2) per step joined as (n_steps, ny, nx, 2)."""
        return torch.cat(moves) if moves else self.points.new_zeros((0, *self.points.shape[1:]))

    def forward(self, n_steps: int) -> torch.Tensor:
        """Displacements after 1, ..., ``n_steps`` steps along the motion (n_steps, ny, nx, 2)."""
        if n_steps > self._forward.shape[0]:
            self._forward = self._displacements(self.coarse, n_steps)
        return self._forward[:n_steps]

    @classmethod
    def of_inputs(
        cls,
        rain_rate: np.ndarray,
        node_spacing: int,
        n_steps: int,
        velocity=None,
        dtype=torch.float32,
        device=None,
    ) -> LagrangianFrame:
        """The frame of input frames (time, y, x): their LK motion, on the coarse grid.

        A full-resolution ``velocity`` (2, y, x) already computed for these inputs (an
        evaluation shares one with the extrapolation baselines) is sampled at the nodes; that
        equals estimating the coarse field directly, to float rounding.
        """
        if velocity is None:
            coarse = coarse_motion_field(rain_rate, node_spacing)
        else:
            coarse = coarse_motion(velocity, node_spacing)
        return cls(coarse, node_spacing, np.shape(rain_rate)[-2:], n_steps, dtype, device)

    def _read(self, fields: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
        """Fields (T, C, y, x) read at the grid points plus ``moves`` (T, y, x, 2)."""
        origins = fields.new_zeros((fields.shape[0], 2), dtype=torch.long)
        return warp.sample_at(fields, origins, self.points + moves, self.domain_shape)

    def inputs_to_lagrangian(self, frames: np.ndarray) -> np.ndarray:
        """Advect input frames (time, y, x) forward to the time of the last frame.

        Returns
        -------
        numpy.ndarray
            float32 (time, y, x), NaN where not valid: where the advected validity is below
            :data:`nowcast.advection.warp.VALID_THRESHOLD` (the trajectory starts at or beside no
            data or
            outside the domain) or the reference pixel is no data, as in the patch store.
        """
        n_input = frames.shape[0]
        stored = torch.as_tensor(np.asarray(frames), dtype=self.dtype, device=self.device)[None]
        moves = torch.cat([self.forward(n_input - 1).flip(0), torch.zeros_like(self.points)])
        origins = torch.zeros((1, n_input, 2), dtype=torch.long, device=self.device)
        moved, _ = warp.warp_frames(
            stored, origins, (self.points + moves)[None], self.domain_shape, n_input, _identity
        )
        return moved[0].cpu().numpy().astype(np.float32, copy=False)

    def outputs_from_lagrangian(self, outputs, perturbation=None) -> np.ndarray:
        """Advect Lagrangian outputs (lead, y, x; finite, NumPy or a tensor on any device)
        forward to their valid times (lead k by k steps), 0 where a trajectory starts outside
        the domain; a NumPy array.

        ``perturbation``, a function of the step ``k`` (1, 2, ...) giving a (2, yc, xc) motion
        increment on the coarse grid (:func:`bps_perturbation`), moves step ``k`` along the
        motion plus that increment instead, as STEPS advects a member along its perturbed
        velocity; the frame's own trajectories are left as they are.
        """
        fields = torch.as_tensor(outputs, dtype=self.dtype, device=self.device)[:, None]
        n_steps = fields.shape[0]
        if perturbation is None:
            moves = self.forward(n_steps)
        else:
            steps = [
                self.coarse + torch.as_tensor(perturbation(k), dtype=self.dtype, device=self.device)
                for k in range(1, n_steps + 1)
            ]
            moves = self._joined(
                warp.stepwise_displacements(
                    steps, self.node_spacing, self.domain_shape, self.points
                )
            )
        moved = self._read(fields, moves)
        return moved[:, 0].cpu().numpy().astype(np.float32, copy=False)

    @property
    def coarse_motion(self) -> np.ndarray:
        """The frame's (2, yc, xc) coarse motion, in pixels per timestep."""
        return self.coarse[0].cpu().numpy()


def bps_perturbation(
    coarse: np.ndarray, pixel_size_km: float, timestep_minutes: float, rng
) -> Callable[[int], np.ndarray]:
    """One member's motion perturbation, drawn as pysteps' STEPS draws it (``bps``).

    Bowler, Pierce and Seed (2006), as ``pysteps.noise.motion.initialize_bps`` and
    ``generate_bps`` with their default parameters: two Laplace draws per member scale unit
    fields parallel and perpendicular to the motion by standard deviations that grow with the
    lead time. STEPS adds ``generate_bps(perturbator, k * timestep)`` to the motion at step
    ``k``; so does :meth:`LagrangianFrame.outputs_from_lagrangian`. Here the field perturbed is
    the coarse motion (pixels per timestep at the full resolution, hence ``pixelsperkm`` =
    1 / ``pixel_size_km``); its upsampling to the pixels is that of the motion.

    Parameters
    ----------
    coarse : numpy.ndarray
        (2, yc, xc) coarse motion in pixels per timestep.
    pixel_size_km : float
        Size of a full-resolution pixel.
    timestep_minutes : float
        Minutes per step.
    rng : numpy.random.Generator or numpy.random.RandomState
        The member's own generator (pysteps' ``randstate``); two values are drawn from it.

    Returns
    -------
    callable
        ``step -> (2, yc, xc)`` float64 motion increment at lead ``step * timestep_minutes``.
    """
    initialize, generate = import_pysteps("pysteps.noise").get_method("bps")
    perturbator = initialize(
        np.asarray(coarse, dtype=np.float64), 1.0 / pixel_size_km, timestep_minutes, randstate=rng
    )
    return lambda step: generate(perturbator, step * timestep_minutes)


def _identity(values):
    return values


def trajectory_margin(max_speed: float, n_input: int, n_target: int) -> int:
    """Pixels a window's trajectories can reach from their end point, plus one.

    Input frames move by up to ``n_input - 1`` steps and targets by up to ``n_target`` steps of
    at most ``max_speed`` pixels (per axis); bilinear reads need one more pixel.
    """
    return int(math.ceil(float(max_speed) * max(n_input - 1, n_target, 0))) + 1
