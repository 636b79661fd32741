"""Advection: the Lucas-Kanade motion recipe, the torch semi-Lagrangian transport and the
Lagrangian frame of a model's window.

Modules: :mod:`~nowcast.advection.motion` (pysteps LK, full-resolution and on the coarse node
grid), :mod:`~nowcast.advection.warp` (trajectories and bilinear reads in torch) and
:mod:`~nowcast.advection.lagrangian` (:class:`~nowcast.advection.lagrangian.LagrangianFrame`).
"""
