"""Deterministic synthetic radar source: advecting, growing and decaying rain cells.

The field is a sum of elliptical Gaussian rain cells that move with one known, uniform motion
vector and grow then decay over a sine-shaped life cycle, on a projected (Lambert azimuthal
equal-area) grid with a circular radar range outside which values are no-data. Every frame is a
pure function of (time, parameters), so the source is reproducible bit for bit and frames can be
generated in parallel in any order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyproj

from nowcast.sources.readers import Grid

SYNTHETIC_PROJECTION = "+proj=laea +lat_0=52 +lon_0=10 +ellps=WGS84 +units=m"


@dataclass(frozen=True)
class SyntheticParams:
    """Parameters of the synthetic source (``importer_kwargs`` of a ``synthetic`` entry)."""

    shape: tuple[int, int] = (256, 256)
    pixel_size: float = 1000.0
    motion: tuple[float, float] = (2.0, -1.0)  # (u, v) in pixels per timestep, +x east, +y down
    n_cells: int = 8  # mean number of living cells
    cell_life: int = 24  # frames
    max_peak: float = 40.0  # mm/h
    radar_range: float = 0.48  # radius of valid data, as a fraction of the grid's width
    seed: int = 0
    start: str = "2000-01-01T00:00"
    n_frames: int = 48
    drop_times: tuple[str, ...] = ()  # times with no "file", to emulate gaps

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> SyntheticParams:
        kwargs = dict(kwargs)
        for key in ("shape", "motion", "drop_times"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def synthetic_grid(params: SyntheticParams) -> Grid:
    """The synthetic source's grid: LAEA, ``pixel_size`` metres, centred on the origin."""
    ny, nx = params.shape
    x = (np.arange(nx) - (nx - 1) / 2) * params.pixel_size
    y = ((ny - 1) / 2 - np.arange(ny)) * params.pixel_size  # north-up like pysteps
    metadata = {
        "projection": SYNTHETIC_PROJECTION,
        "unit": "mm/h",
        "accutime": 0,
        "transform": None,
        "threshold": 0.0,
        "zerovalue": 0.0,
        "yorigin": "upper",
        "institution": "nowcast synthetic generator",
        "motion_px_per_step": list(params.motion),
    }
    crs = pyproj.CRS.from_proj4(SYNTHETIC_PROJECTION)
    return Grid(crs.to_wkt(), x, y, json.dumps(metadata, sort_keys=True))


def _cells(params: SyntheticParams, n_steps: int) -> dict[str, np.ndarray]:
    """Cell catalogue covering frame indices [-cell_life, n_steps)."""
    rng = np.random.default_rng(params.seed)
    births_per_step = params.n_cells / params.cell_life
    n_total = rng.poisson(births_per_step * (n_steps + params.cell_life)) + params.n_cells
    ny, nx = params.shape
    return {
        "birth": rng.uniform(-params.cell_life, n_steps, n_total),
        "life": rng.uniform(0.5, 1.5, n_total) * params.cell_life,
        "row": rng.uniform(0, ny, n_total),
        "col": rng.uniform(0, nx, n_total),
        "sigma_row": rng.uniform(0.02, 0.07, n_total) * ny,
        "sigma_col": rng.uniform(0.02, 0.07, n_total) * nx,
        "peak": rng.gamma(2.0, params.max_peak / 6.0, n_total).clip(1.0, params.max_peak),
    }


def frame_index(time: datetime, params: SyntheticParams, timestep: int) -> float:
    """Frame index of ``time`` relative to ``params.start`` (may be fractional)."""
    delta = pd.Timestamp(time) - pd.Timestamp(params.start)
    return delta / pd.Timedelta(minutes=timestep)


def synthetic_frame(time: datetime, params: SyntheticParams, timestep: int) -> np.ndarray:
    """Rain rate (mm/h, float32) of the synthetic source at ``time``.

    Cells are placed on a periodic domain (minimum-image distance) so the field is statistically
    stationary while everything advects with ``params.motion``; NaN outside the radar range.
    """
    step = frame_index(time, params, timestep)
    horizon = max(params.n_frames, int(np.ceil(step)) + 1)
    cells = _cells(params, horizon)
    ny, nx = params.shape
    age = (step - cells["birth"]) / cells["life"]
    alive = (age > 0) & (age < 1)
    rows = np.arange(ny, dtype=np.float64)[:, None]
    cols = np.arange(nx, dtype=np.float64)[None, :]
    u, v = params.motion
    field = np.zeros(params.shape)
    # A loop over the ~n_cells living cells, each a vectorised 2-D Gaussian.
    for k in np.flatnonzero(alive):
        centre_row = (cells["row"][k] + v * step) % ny
        centre_col = (cells["col"][k] + u * step) % nx
        d_row = (rows - centre_row + ny / 2) % ny - ny / 2
        d_col = (cols - centre_col + nx / 2) % nx - nx / 2
        intensity = cells["peak"][k] * np.sin(np.pi * age[k])
        field += intensity * np.exp(
            -0.5 * ((d_row / cells["sigma_row"][k]) ** 2 + (d_col / cells["sigma_col"][k]) ** 2)
        )
    field = np.where(field < 0.05, 0.0, field)
    radius = np.hypot(rows - (ny - 1) / 2, cols - (nx - 1) / 2)
    field = np.where(radius > params.radar_range * nx, np.nan, field)
    return field.astype(np.float32)
