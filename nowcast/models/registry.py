"""Registry of nowcasting model architectures, looked up by name (pysteps ``get_method`` style)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

DEFAULT_MODEL = "convlstm"

_MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a model architecture under ``name``.

    The class must follow the model contract: its constructor takes
    ``(n_input_frames, n_target_frames, in_channels=1, **arch_kwargs)`` and its ``forward`` maps a
    tensor of shape (batch, n_input_frames, channels, height, width) to one of shape
    (batch, n_target_frames, channels, height, width) with unconstrained real values. A stochastic
    model (an ensemble) has the class attribute ``stochastic = True``; its ``forward`` takes
    ``(frames, n_members=1, generator=None)`` and returns members of shape
    (batch, n_members, n_target_frames, channels, height, width).

    Parameters
    ----------
    name : str
        Registry name (case-insensitive).

    Returns
    -------
    callable
        The decorator; it returns the class unchanged.

    Raises
    ------
    ValueError
        If ``name`` is already registered to a different class.
    """
    key = name.lower()

    def decorator(model_class: type[nn.Module]) -> type[nn.Module]:
        registered = _MODELS.get(key)
        # Re-registering the same class (e.g. a module reload) is harmless; a clash is a bug.
        if registered is not None and registered.__qualname__ != model_class.__qualname__:
            raise ValueError(f"model name {key!r} is already registered to {registered!r}")
        _MODELS[key] = model_class
        return model_class

    return decorator


def is_stochastic(name: str) -> bool:
    """Whether the model registered under ``name`` is stochastic (forecasts members).

    Parameters
    ----------
    name : str
        Registry name (case-insensitive).

    Returns
    -------
    bool
        The class's ``stochastic`` attribute, False when it has none.
    """
    return bool(getattr(get_method(name), "stochastic", False))


def registered_models(stochastic: bool = False) -> list[str]:
    """Return the sorted names of the registered model architectures of one kind.

    Parameters
    ----------
    stochastic : bool, optional
        List the stochastic models (ensembles, whose ``forward`` adds a member axis) instead of
        those that follow the one-forecast contract, by default False.

    Returns
    -------
    list of str
        Registered names.
    """
    return sorted(
        name
        for name, model_class in _MODELS.items()
        if bool(getattr(model_class, "stochastic", False)) == stochastic
    )


def get_method(name: str = DEFAULT_MODEL) -> type[nn.Module]:
    """Return the model class registered under ``name``.

    Parameters
    ----------
    name : str, optional
        Registry name (case-insensitive), by default ``"convlstm"``.

    Returns
    -------
    type
        The model class.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the registered names.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; registered models are: {', '.join(sorted(_MODELS))}"
        )
    return _MODELS[key]


def build_model(
    name: str, n_input_frames: int, n_target_frames: int, **kwargs: object
) -> nn.Module:
    """Instantiate the model registered under ``name``.

    Parameters
    ----------
    name : str
        Registry name (case-insensitive), e.g. ``"convlstm"``.
    n_input_frames : int
        Number of past frames the model reads.
    n_target_frames : int
        Number of future frames the model predicts.
    **kwargs
        Architecture keyword arguments passed to the class constructor (e.g. ``in_channels``,
        ``hidden_channels``).

    Returns
    -------
    torch.nn.Module
        The freshly initialised model.

    Raises
    ------
    ValueError
        If ``name`` is not registered.
    """
    return get_method(name)(n_input_frames, n_target_frames, **kwargs)
