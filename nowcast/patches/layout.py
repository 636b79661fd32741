"""Layout of the patch store shared by its reader and writer: constants, the root group, the
stored normalization."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager

import numpy as np
import xarray as xr

from nowcast import storage
from nowcast.config import ConfigError
from nowcast.patches.normalization import Normalization

#: Version of the layout; a store of another version is rebuilt by ``nowcast patches``.
SCHEMA_VERSION = 2
FRAMES_GROUP = "frames"
JSON_ATTRS = ("normalization", "splits", "cube_paths", "source_crs", "config", "counts")
SAMPLE_COLUMNS = ("source", "split", "start_time", "reference_time", "y0", "x0", "wet_fraction")


@contextmanager
def quiet_zarr():
    """Silence zarr's notice that consolidated metadata is not in the v3 spec yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


def open_root(path: str) -> xr.Dataset:
    """The root group (sample and window tables, attributes) as a lazy xarray Dataset."""
    if not storage.exists(path):
        raise ConfigError(f"no patch store at {path}: run `nowcast patches CONFIG` first")
    with quiet_zarr():
        return xr.open_zarr(path, consolidated=True, chunks={})


def existing_digest(path: str) -> str | None:
    """Build digest of the store at ``path``; None if unreadable or of another schema."""
    try:
        attrs = open_root(path).attrs
    except Exception:  # an unreadable store is rebuilt
        return None
    if attrs.get("store_schema_version") != SCHEMA_VERSION:
        return None
    return attrs.get("build_digest")


def decode_attrs(attrs: dict) -> dict:
    """Store attributes with the JSON-encoded ones decoded."""
    info = dict(attrs)
    for key in JSON_ATTRS:
        if isinstance(info.get(key), str):
            info[key] = json.loads(info[key])
    return info


def normalize_frames(rain_rate: np.ndarray, normalization: Normalization, dtype: str) -> np.ndarray:
    """Normalized values of a block of frames as stored: NaN where there is no data."""
    values = normalization.forward(rain_rate)
    return np.where(np.isfinite(rain_rate), values, np.nan).astype(dtype)
