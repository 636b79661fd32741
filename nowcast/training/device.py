"""Which torch device a stage runs on (training, the model forecast method, benchmarks)."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None, local_rank: int | None = None):
    """Pick the device: the given one, else CUDA, else Apple MPS, else the CPU.

    Parameters
    ----------
    device : str or torch.device, optional
        Explicit device; a bare ``"cuda"`` gets the index ``local_rank``.
    local_rank : int, optional
        This process's GPU index under torchrun.

    Returns
    -------
    torch.device
        The device.
    """
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank or 0)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank or 0)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
