"""The radar cube: a CF-annotated zarr store of rain rate on (time, y, x).

The schema is documented in ``docs/architecture.md``; this module is its only writer and the
place every later stage opens it from.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyproj
import xarray as xr

from .. import __version__
from ..config import ConfigError
from .radar import Grid

RAIN_RATE_ATTRS = {
    "long_name": "rain rate",
    "standard_name": "lwe_precipitation_rate",
    "units": "mm h-1",
    "grid_mapping": "crs",
}
CUBE_CHUNKS = {"time": 6, "y": 256, "x": 256}


def cube_path(cube_dir: str | Path, source: str) -> str:
    """Conventional location of a source's cube."""
    return f"{str(cube_dir).rstrip('/')}/{source}.zarr"


def crs_variable(crs: pyproj.CRS) -> xr.DataArray:
    """CF grid-mapping variable (``crs``) from a pyproj CRS, with ``crs_wkt``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyproj warns about parameters CF cannot express
        attrs = crs.to_cf()
    attrs.setdefault("crs_wkt", crs.to_wkt())
    return xr.DataArray(np.int32(0), attrs=attrs)


def grid_coords(grid: Grid, latlon: bool = False) -> dict[str, xr.DataArray]:
    """Projected coordinates (metres), optionally 2-D lat/lon, for a grid."""
    coords = {
        "y": xr.DataArray(
            grid.y,
            dims="y",
            attrs={
                "standard_name": "projection_y_coordinate",
                "long_name": "y coordinate of projection",
                "units": "m",
                "axis": "Y",
            },
        ),
        "x": xr.DataArray(
            grid.x,
            dims="x",
            attrs={
                "standard_name": "projection_x_coordinate",
                "long_name": "x coordinate of projection",
                "units": "m",
                "axis": "X",
            },
        ),
    }
    if latlon:
        lat, lon = latlon_grid(grid.crs, grid.x, grid.y)
        coords["lat"] = xr.DataArray(
            lat, dims=("y", "x"), attrs={"standard_name": "latitude", "units": "degrees_north"}
        )
        coords["lon"] = xr.DataArray(
            lon, dims=("y", "x"), attrs={"standard_name": "longitude", "units": "degrees_east"}
        )
    return coords


def latlon_grid(crs: pyproj.CRS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D latitude and longitude (float32) of projected cell centres."""
    transformer = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    xx, yy = np.meshgrid(x, y)
    lon, lat = transformer.transform(xx, yy)
    return lat.astype(np.float32), lon.astype(np.float32)


def build_cube(
    rain_rate,
    times,
    frame_valid: np.ndarray,
    grid: Grid,
    attrs: dict,
    latlon: bool = False,
) -> xr.Dataset:
    """Assemble the cube Dataset (lazy if ``rain_rate`` is a dask array)."""
    coords = grid_coords(grid, latlon)
    coords["time"] = xr.DataArray(
        np.asarray(times, dtype="datetime64[ns]"),
        dims="time",
        attrs={"standard_name": "time", "long_name": "valid time", "axis": "T"},
    )
    ds = xr.Dataset(
        {
            "rain_rate": (("time", "y", "x"), rain_rate, RAIN_RATE_ATTRS),
            "frame_valid": (
                "time",
                np.asarray(frame_valid, dtype=bool),
                {"long_name": "frame was read from a file (False: gap or skipped file)"},
            ),
            "crs": crs_variable(grid.crs),
        },
        coords=coords,
    )
    if latlon:
        ds["rain_rate"].attrs["coordinates"] = "lat lon"
    ds.attrs = {
        "Conventions": "CF-1.8",
        "nowcast_version": __version__,
        **attrs,
    }
    return ds


def chunk_sizes(ds: xr.Dataset) -> dict[str, int]:
    """Storage chunks for the cube, capped at the array size."""
    return {dim: min(size, ds.sizes[dim]) for dim, size in CUBE_CHUNKS.items()}


def write_cube(ds: xr.Dataset, path: str, compute: bool = True):
    """Write the cube to zarr (format 3, consolidated metadata)."""
    chunks = chunk_sizes(ds)
    ds = ds.chunk(chunks)
    encoding = {"rain_rate": {"chunks": tuple(chunks[d] for d in ("time", "y", "x"))}}
    for name in ("lat", "lon"):
        if name in ds:
            encoding[name] = {"chunks": (ds.sizes["y"], ds.sizes["x"])}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return ds.to_zarr(
            path, mode="w", consolidated=True, zarr_format=3, encoding=encoding, compute=compute
        )


def open_cube(path: str, chunks: dict | str | None = None) -> xr.Dataset:
    """Open a cube written by ``nowcast ingest``.

    Raises
    ------
    ConfigError
        If nothing is at ``path`` or it is not a nowcast cube.
    """
    from ..storage import exists

    if not exists(path):
        raise ConfigError(f"no cube at {path}: run `nowcast ingest SOURCE` first")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        # chunks=None -> {} : dask chunks follow the storage chunks.
        ds = xr.open_zarr(path, consolidated=True, chunks={} if chunks is None else chunks)
    missing = {"rain_rate", "frame_valid", "crs"} - set(ds.variables)
    if missing:
        raise ConfigError(f"{path} is not a nowcast cube: missing {sorted(missing)}")
    return ds


def cube_crs(ds: xr.Dataset) -> pyproj.CRS:
    """The cube's CRS, recovered from its CF grid mapping."""
    return pyproj.CRS.from_wkt(ds["crs"].attrs["crs_wkt"])


def ingest_report(ds: xr.Dataset) -> dict:
    """The ingest report stored in the cube's attributes."""
    return json.loads(ds.attrs.get("ingest_report", "{}"))
