"""Random seeds of stochastic forecasts, one per window.

A window's seed depends only on the run's seed, the radar source and the reference time, so a
rerun draws the same members whichever process, worker or Dask schedule forecasts the window,
and in whatever order. Python's ``hash()`` of a string changes between processes
(``PYTHONHASHSEED``), so the seed comes from SHA-256.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

#: Seeds are below 2**32, the range numpy's ``RandomState`` (and so pysteps) accepts.
SEED_BYTES = 4


def window_seed(seed: int, source: str, reference_time) -> int:
    """The seed of one window's members.

    Parameters
    ----------
    seed : int
        The run's seed.
    source : str
        Radar source of the window (the cube's ``source``; empty when unknown).
    reference_time : datetime-like
        Time of the window's last input frame; a time-zone-aware time is taken in UTC.

    Returns
    -------
    int
        A seed in ``[0, 2**32)``.
    """
    timestamp = pd.Timestamp(reference_time)
    if timestamp.tzinfo is not None:
        timestamp = timestamp.tz_convert("UTC").tz_localize(None)
    key = f"{int(seed)}|{source}|{timestamp.value}".encode()
    digest = hashlib.sha256(key).digest()
    return int.from_bytes(digest[:SEED_BYTES], "little")


def window_generator(seed: int, source: str, reference_time) -> np.random.Generator:
    """A numpy generator seeded with :func:`window_seed` (for members drawn outside pysteps)."""
    return np.random.default_rng(window_seed(seed, source, reference_time))
