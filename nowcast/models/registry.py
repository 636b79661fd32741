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
    (batch, n_target_frames, channels, height, width) with unconstrained real values.

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


def registered_models() -> list[str]:
    """Return the sorted names of the registered model architectures.

    Returns
    -------
    list of str
        Registered names.
    """
    return sorted(_MODELS)


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
            f"unknown model {name!r}; registered models are: {', '.join(registered_models())}"
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
