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

from nowcast import __version__
from nowcast.config import ConfigError
from nowcast.sources.readers import Grid
from nowcast.storage import exists, filesystem

RAIN_RATE_ATTRS = {
    "long_name": "rain rate",
    "standard_name": "lwe_precipitation_rate",
    "units": "mm h-1",
    "grid_mapping": "crs",
}
CUBE_CHUNKS = {"time": 6, "y": 256, "x": 256}
# Version of the cube layout and of the values ingest puts in it; part of the ingest digest, so
# a cube of another version is rebuilt rather than reported up to date. The layout: segments of
# the time axis (`segment`, attrs `segments`/`max_gap_minutes`), pixel centres that match the
# importer's pixel size.
CUBE_SCHEMA_VERSION = 2


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
    *,
    segment: np.ndarray | None = None,
    max_gap_minutes: int | None = None,
) -> xr.Dataset:
    """Assemble the cube Dataset (lazy if ``rain_rate`` is a dask array).

    ``segment`` numbers the regular pieces of the time axis (default: one segment); the
    ``segments`` attribute lists them.
    """
    coords = grid_coords(grid, latlon)
    times = np.asarray(times, dtype="datetime64[ns]")
    coords["time"] = xr.DataArray(
        times,
        dims="time",
        attrs={"standard_name": "time", "long_name": "valid time", "axis": "T"},
    )
    segment = np.zeros(times.size, np.int32) if segment is None else np.asarray(segment, np.int32)
    ds = xr.Dataset(
        {
            "rain_rate": (("time", "y", "x"), rain_rate, RAIN_RATE_ATTRS),
            "frame_valid": (
                "time",
                np.asarray(frame_valid, dtype=bool),
                {"long_name": "frame was read from a file (False: gap or skipped file)"},
            ),
            "segment": (
                "time",
                segment,
                {"long_name": "segment of the time axis (regular within, long gap between)"},
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
        "cube_schema_version": CUBE_SCHEMA_VERSION,
        "segments": segments_json(times, segment),
        **({} if max_gap_minutes is None else {"max_gap_minutes": int(max_gap_minutes)}),
        **attrs,
    }
    return ds


def segments_json(times: np.ndarray, segment: np.ndarray) -> str:
    """The ``segments`` attribute: JSON list of ``{start, end, n_frames}`` in time order."""
    times = np.asarray(times, dtype="datetime64[s]")
    segment = np.asarray(segment)
    if not segment.size:
        return "[]"
    starts = np.concatenate([[0], np.flatnonzero(np.diff(segment)) + 1])
    ends = np.concatenate([starts[1:], [segment.size]])
    return json.dumps(
        [
            {"start": str(times[a]), "end": str(times[b - 1]), "n_frames": int(b - a)}
            for a, b in zip(starts, ends, strict=True)
        ]
    )


def cube_segments(ds: xr.Dataset) -> np.ndarray:
    """Segment number of every frame; a cube without ``segment`` is one segment."""
    if "segment" in ds.variables:
        return np.asarray(ds["segment"].values, dtype=np.int32)
    return np.zeros(ds.sizes["time"], np.int32)


def chunk_sizes(ds: xr.Dataset) -> dict[str, int]:
    """Storage chunks for the cube, capped at the array size."""
    return {dim: min(size, ds.sizes[dim]) for dim, size in CUBE_CHUNKS.items()}


def _encoding(ds: xr.Dataset, chunks: dict[str, int]) -> dict:
    encoding = {"rain_rate": {"chunks": tuple(chunks[d] for d in ("time", "y", "x"))}}
    for name in ("lat", "lon"):
        if name in ds:
            encoding[name] = {"chunks": (ds.sizes["y"], ds.sizes["x"])}
    return encoding


def _to_zarr(ds: xr.Dataset, path: str, encoding: dict, compute: bool):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return ds.to_zarr(
            path, mode="w", consolidated=True, zarr_format=3, encoding=encoding, compute=compute
        )


def write_cube(ds: xr.Dataset, path: str, compute: bool = True):
    """Write the cube to zarr (format 3, consolidated metadata)."""
    chunks = chunk_sizes(ds)
    return _to_zarr(ds.chunk(chunks), path, _encoding(ds, chunks), compute)


def open_cube(path: str, chunks: dict | str | None = None) -> xr.Dataset:
    """Open a cube written by ``nowcast ingest``.

    Raises
    ------
    ConfigError
        If nothing is at ``path`` or it is not a nowcast cube.
    """
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


def pixel_size(x) -> float:
    """Pixel size in metres from a grid's ``x`` coordinates (NaN for a one-column grid)."""
    x = np.asarray(x, dtype=float)
    return float(abs(x[1] - x[0])) if x.size > 1 else float("nan")


def cube_pixel_size(ds: xr.Dataset) -> float:
    """Pixel size of a cube in metres (the spacing of ``x``; NaN for a one-column grid)."""
    return pixel_size(ds["x"].values)


def cube_crs(ds: xr.Dataset) -> pyproj.CRS:
    """The cube's CRS, recovered from its CF grid mapping."""
    return pyproj.CRS.from_wkt(ds["crs"].attrs["crs_wkt"])


def ingest_report(ds: xr.Dataset) -> dict:
    """The ingest report stored in the cube's attributes."""
    return json.loads(ds.attrs.get("ingest_report", "{}"))


# --- streaming writes: a store is created empty, then filled block by block -------------------


def create_cube_store(ds: xr.Dataset, path: str) -> None:
    """Write a cube's metadata, coordinates and in-memory variables, but no ``rain_rate`` chunk.

    ``ds.rain_rate`` should be a lazy dask array: ``to_zarr(compute=False)`` only records its
    metadata, and its chunks are then written block by block with :func:`write_frames`.
    Chunks never written read as NaN (the array's fill value).
    """
    # Only rain_rate is lazy: to_zarr(compute=False) writes every numpy-backed variable now
    # and returns a delayed write of rain_rate, which is deliberately dropped.
    _to_zarr(ds, path, _encoding(ds, chunk_sizes(ds)), compute=False)


def _rain_rate_array(path: str, mode: str = "r+"):
    import zarr

    return zarr.open_array(store=path, path="rain_rate", mode=mode)


def write_frames(path: str, start: int, frames: np.ndarray) -> None:
    """Write ``frames`` (time, y, x) into the store's ``rain_rate`` from time index ``start``.

    A direct zarr region assignment: the same bytes ``Dataset.to_zarr(region=...)`` writes,
    without opening the store as a Dataset for every block.
    """
    _rain_rate_array(path)[start : start + frames.shape[0]] = frames


def read_frames(path: str, start: int, stop: int) -> np.ndarray:
    """``rain_rate[start:stop]`` of a cube store, as stored."""
    return _rain_rate_array(path, mode="r")[start:stop]


def finalize_cube(path: str, frame_valid: np.ndarray, attrs: dict) -> None:
    """Write ``frame_valid`` and global attributes, then consolidate the metadata."""
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        group = zarr.open_group(store=path, mode="r+", use_consolidated=False)
        group["frame_valid"][:] = np.asarray(frame_valid, dtype=bool)
        group.attrs.update(attrs)
        zarr.consolidate_metadata(path)


def stored_time_chunks(path: str, n_time_chunks: int) -> list[str]:
    """Keys (relative to the store) of the stored ``rain_rate`` chunks of the first time chunks.

    Chunks that hold only NaN are not stored, so the listing is of what exists.
    """
    array = _rain_rate_array(path, mode="r")
    n_y, n_x = array.cdata_shape[1:]
    wanted = {
        array.metadata.encode_chunk_key((t, i, j))
        for t in range(n_time_chunks)
        for i in range(n_y)
        for j in range(n_x)
    }
    fs, inner = filesystem(path)
    base = inner.rstrip("/") + "/rain_rate/"
    present = {p[len(base) :] for p in fs.find(base + "c")} if fs.exists(base + "c") else set()
    return sorted(f"rain_rate/{key}" for key in wanted & present)


def estimate_frame_bytes(samples: list[np.ndarray]) -> float:
    """Mean stored size of one frame: the samples compressed with the cube's chunks and codec.

    The cube's ``rain_rate`` uses zarr's default codecs for float32 (xarray passes none), so an
    in-memory array with the same defaults and spatial chunks measures what a frame costs.
    """
    import zarr

    if not samples:
        return 0.0
    ny, nx = samples[0].shape
    chunks = (1, min(CUBE_CHUNKS["y"], ny), min(CUBE_CHUNKS["x"], nx))
    array = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=(len(samples), ny, nx),
        chunks=chunks,
        dtype="float32",
        fill_value=np.nan,
    )
    empty = array.nbytes_stored()
    for index, frame in enumerate(samples):
        array[index] = frame
    return (array.nbytes_stored() - empty) / len(samples)


def describe_cube(ds) -> str:
    """A short human summary of a cube."""
    rain = ds["rain_rate"]
    valid = ds["frame_valid"].values
    # One pass over the cube for both numbers (two .compute() calls would read it twice).
    stats = xr.Dataset({"wet": (rain >= 0.1).mean(), "peak": rain.max()}).compute()
    wet, peak = float(stats["wet"]), float(stats["peak"])
    return (
        f"grid {ds.sizes['y']}x{ds.sizes['x']}, {ds.sizes['time']} times "
        f"({str(ds.time.values[0])[:16]} .. {str(ds.time.values[-1])[:16]}, "
        f"{ds.attrs['timestep_minutes']} min), {int(valid.sum())} valid frames\n"
        f"rain >= 0.1 mm/h: {wet:.1%} of pixels, max {peak:.1f} mm/h\n"
        f"crs: {ds['crs'].attrs.get('grid_mapping_name', '?')}"
    )
