"""Registry of forecast methods (pysteps ``nowcasts.get_method`` style)."""

from __future__ import annotations

from collections.abc import Callable

from nowcast.nowcasts import extrapolation, persistence, sprog, steps
from nowcast.nowcasts.model import EnsembleNowcast, ModelNowcast
from nowcast.nowcasts.model_steps import ModelStepsNowcast
from nowcast.nowcasts.probability import lagrangian_probability

_METHODS: dict[str, Callable] = {
    "persistence": persistence.forecast,
    "extrapolation": extrapolation.forecast,
    "sprog": sprog.forecast,
    "steps": steps.forecast,
    "lagrangian_probability": lagrangian_probability,
    "model": ModelNowcast,
    "ensemble": EnsembleNowcast,
    "model_steps": ModelStepsNowcast,
}

#: Methods that are ready to call; ``model``, ``ensemble`` and ``model_steps`` must first be
#: built from a checkpoint. When one that advects runs, the runner shares its full-resolution
#: motion. Being listed here does not make a method run: each stage keeps its own default list.
BASELINES = ("persistence", "extrapolation", "sprog", "steps", "lagrangian_probability")

#: Methods that advect with pysteps at full resolution: when one of them runs, the runner
#: estimates the full-resolution Lucas-Kanade motion once and shares it.
FULL_MOTION_METHODS = (*BASELINES, "model_steps")

#: What a method declares besides its inputs. ``uses_motion``: it advects along the
#: Lucas-Kanade motion of its inputs and accepts it as ``velocity=``, so an evaluation estimates
#: the field once per window and shares it (and needs 3 input frames). For ``model`` and
#: ``ensemble`` it depends on the checkpoint: a built :class:`ModelNowcast` answers with its
#: ``uses_motion`` attribute. ``model_steps`` moves its noise along the motion (and hands it
#: to its model).
METHOD_NEEDS: dict[str, dict[str, bool]] = {
    "persistence": {"uses_motion": False},
    "extrapolation": {"uses_motion": True},
    "sprog": {"uses_motion": True},
    "steps": {"uses_motion": True},
    "lagrangian_probability": {"uses_motion": True},
    "model": {"uses_motion": False},
    "ensemble": {"uses_motion": False},
    "model_steps": {"uses_motion": True},
}


def uses_motion(name: str, method: Callable | None = None) -> bool:
    """Whether a method advects along the inputs' motion field (see :data:`METHOD_NEEDS`).

    Parameters
    ----------
    name : str
        Registered method name.
    method : callable, optional
        The built method, which may say so itself (a Lagrangian-frame model does).
    """
    declared = METHOD_NEEDS.get(name.lower(), {}).get("uses_motion", False)
    return bool(declared or getattr(method, "uses_motion", False))


def registered_methods() -> list[str]:
    """Return the sorted names of the registered forecast methods."""
    return sorted(_METHODS)


def get_method(name: str) -> Callable:
    """Return a forecast method by name.

    Parameters
    ----------
    name : str
        Case-insensitive:

        ``"persistence"``
            Eulerian persistence (the last frame repeated).
        ``"extrapolation"``
            Lucas-Kanade motion and semi-Lagrangian extrapolation (pysteps).
        ``"sprog"``
            pysteps S-PROG on dB fields with the Lucas-Kanade motion.
        ``"steps"``
            pysteps STEPS on dB fields with the Lucas-Kanade motion: an ensemble forecast
            (realization, lead_time, y, x), 20 members by default.
        ``"lagrangian_probability"``
            pysteps' local Lagrangian probabilities of rain >= 1, 5 and 10 mm/h: a
            probability forecast (threshold, lead_time, y, x), not a rain rate.
        ``"model"``
            :class:`~nowcast.nowcasts.model.ModelNowcast`: call it with ``checkpoint=path``
            (loaded once) to get the forecast callable (an ensemble for a stochastic model).
        ``"ensemble"``
            :class:`~nowcast.nowcasts.model.EnsembleNowcast`, the learned ensemble: as
            ``"model"``, for a stochastic model's checkpoint only, with ``n_members`` (20),
            ``member_batch`` (4) and ``seed`` (0); forecasts (realization, lead_time, y, x).
        ``"model_steps"``
            :class:`~nowcast.nowcasts.model_steps.ModelStepsNowcast`, a deterministic model's
            forecast perturbed with STEPS noise (pysteps' blended STEPS with the forecast as
            its external nowcast): call it with ``checkpoint=path`` (a deterministic model's)
            to get the forecast callable, which takes ``n_ens_members`` (20), ``seed`` (0) and
            the shared motion ``velocity``; forecasts (realization, lead_time, y, x).

    Returns
    -------
    callable
        ``forecast(inputs, n_leadtimes, **kwargs) -> xarray.DataArray`` for the baselines
        (see :mod:`nowcast.nowcasts.steps` and :mod:`nowcast.nowcasts.probability`); for
        ``"model"``, ``"ensemble"`` and ``"model_steps"`` the class that builds such a
        callable.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the registered names.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _METHODS:
        raise ValueError(
            f"unknown forecast method {name!r}; registered: {', '.join(registered_methods())}"
        )
    return _METHODS[key]
