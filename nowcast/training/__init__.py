"""Training: the loop, one optimisation step, the ``train:`` section, losses, checkpoints and
the device.

Modules: :mod:`~nowcast.training.loop` (:func:`~nowcast.training.loop.train`, the loop that
``nowcast train`` and ``torchrun -m nowcast.train`` run), :mod:`~nowcast.training.step`,
:mod:`~nowcast.training.config`, :mod:`~nowcast.training.losses`,
:mod:`~nowcast.training.checkpoint` and :mod:`~nowcast.training.device`.

The package imports none of them: forecasting reads checkpoints without loading the loop.
"""
