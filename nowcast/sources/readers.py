"""Reading radar files through pysteps importers and converting them to rain rate.

The grid and projection are the same for every file of a source, so they are read once
(:func:`read_grid`) and every file is then only decoded (:func:`read_frame`). For CF netCDF
sources the decode can skip the pysteps importer and read the variable with xarray: pysteps'
``bom_rf3`` rebuilds the same geodata for every file, which costs far more than the decode.
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pyproj

from nowcast import import_pysteps
from nowcast.config import ConfigError, UserError
from nowcast.sources.catalog import SourceConfig

# netCDF4 and HDF5 are not thread-safe (concurrent opens segfault). Decoding is serialised
# within a process; the default Dask cluster uses one process per core for real parallelism.
_DECODE_LOCK = threading.Lock()


class FrameReadError(UserError, RuntimeError):
    """A radar file could not be read (corrupt, truncated, empty or unreadable)."""


@dataclass(frozen=True)
class Grid:
    """Projected grid of a source: CRS and cell-centre coordinates in metres."""

    crs_wkt: str
    x: np.ndarray  # (nx,), metres, increasing
    y: np.ndarray  # (ny,), metres, source order (descending for yorigin=upper)
    metadata_json: str  # pysteps metadata of the first file, for unit conversion

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y.size, self.x.size)

    @property
    def crs(self) -> pyproj.CRS:
        return pyproj.CRS.from_wkt(self.crs_wkt)

    @property
    def metadata(self) -> dict:
        return json.loads(self.metadata_json)


def _importer(source: SourceConfig):
    return import_pysteps("pysteps.io").get_method(source.importer, "importer")


def _crs_in_metres(proj4: str, cartesian_unit: str) -> pyproj.CRS:
    """CRS whose projected unit is the metre.

    KNMI's importer describes its grid in km with an earth radius in km (``+a=6378.137``); the
    cube stores metres, so the ellipsoid and false origin are scaled to match.
    """
    crs = pyproj.CRS.from_proj4(proj4)
    if cartesian_unit == "km":
        params = crs.to_dict()
        for key in ("a", "b", "R", "x_0", "y_0"):
            if key in params:
                params[key] = float(params[key]) * 1000.0
        params.pop("units", None)
        params["units"] = "m"
        crs = pyproj.CRS.from_dict(params)
    return crs


class GeoreferenceError(ConfigError):
    """The importer's georeference disagrees with itself or with the file's coordinates."""


def _centres(
    low: float, high: float, n: int, pixel: float | None, axis: str, where: str
) -> np.ndarray:
    """Pixel centres along one axis from the importer's extent ``low``..``high``.

    pysteps importers disagree on what x1/x2 mean: most report the domain edges, ``bom_rf3``
    the first and last pixel centres. The importer's pixel size tells which: the spacing of
    ``n`` cells between edges is ``(high - low) / n``, between centres ``(high - low) /
    (n - 1)``. The tolerance is far below the 1/n relative difference of the two readings.
    """
    if pixel is None or n < 2:  # nothing to check against: pysteps' usual reading (edges)
        return low + (high - low) / n * (np.arange(n) + 0.5)
    tolerance = min(1e-4, 0.1 / n) * abs(pixel)
    if abs((high - low) / n - pixel) <= tolerance:
        return low + (high - low) / n * (np.arange(n) + 0.5)
    if abs((high - low) / (n - 1) - pixel) <= tolerance:
        return np.linspace(low, high, n)
    raise GeoreferenceError(
        f"{where}: {axis}1={low:g}, {axis}2={high:g} over {n} pixels give a spacing of "
        f"{(high - low) / n:g} (edges) or {(high - low) / (n - 1):g} (centres), neither is the "
        f"importer's {axis}pixelsize {pixel:g}"
    )


def grid_from_metadata(metadata: dict, shape: tuple[int, int], where: str = "importer") -> Grid:
    """Build a :class:`Grid` from pysteps importer metadata and the data shape.

    Parameters
    ----------
    metadata : dict
        pysteps importer metadata (``x1``, ``x2``, ``y1``, ``y2``, ``xpixelsize``,
        ``ypixelsize``, ``projection``, ``cartesian_unit``, ``yorigin``).
    shape : tuple of int
        (ny, nx) of the data.
    where : str
        Source and file, for error messages.

    Raises
    ------
    GeoreferenceError
        If the extent fits the pixel size neither as edges nor as pixel centres.
    """
    scale = 1000.0 if metadata.get("cartesian_unit", "m") == "km" else 1.0
    ny, nx = shape

    def pixel(key: str) -> float | None:
        value = metadata.get(key)
        return None if value is None else float(value) * scale

    x = _centres(
        metadata["x1"] * scale, metadata["x2"] * scale, nx, pixel("xpixelsize"), "x", where
    )
    y = _centres(
        metadata["y1"] * scale, metadata["y2"] * scale, ny, pixel("ypixelsize"), "y", where
    )
    if metadata.get("yorigin", "upper") == "upper":
        y = y[::-1]
    crs = _crs_in_metres(metadata["projection"], metadata.get("cartesian_unit", "m"))
    serialisable = {k: _plain(v) for k, v in metadata.items()}
    return Grid(crs.to_wkt(), x, y, json.dumps(serialisable, sort_keys=True))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_grid(source: SourceConfig, path: str) -> Grid:
    """Read the grid and projection of a source from one of its files.

    For ``decoder: xarray`` sources the grid is also checked against the file's own ``x``/``y``
    coordinate variables, since those are what the decoded values are laid out on.

    Raises
    ------
    GeoreferenceError
        If the importer's georeference is inconsistent or disagrees with the file.
    """
    data, _, metadata = _call_importer(source, path)
    grid = grid_from_metadata(metadata, data.shape, where=f"source '{source.name}' ({path})")
    if source.decoder == "xarray":
        _check_file_coordinates(source, path, grid)
    return grid


def _file_axis(ds, name: str) -> np.ndarray | None:
    """A CF coordinate variable in metres (None when the file has none of that name)."""
    if name not in ds.variables:
        return None
    values = np.asarray(ds[name].values, dtype=float)
    units = str(ds[name].attrs.get("units", "m")).strip().lower()
    factors = {"m": 1.0, "metre": 1.0, "meter": 1.0, "metres": 1.0, "meters": 1.0, "km": 1e3}
    if units not in factors:
        raise GeoreferenceError(f"{name!r} has units {units!r}, expected m or km")
    return values * factors[units]


def _check_file_coordinates(source: SourceConfig, path: str, grid: Grid) -> None:
    import xarray as xr

    try:
        with _DECODE_LOCK, xr.open_dataset(path, engine="netcdf4", cache=False) as ds:
            axes = {"x": _file_axis(ds, "x"), "y": _file_axis(ds, "y")}
    except GeoreferenceError as err:
        raise GeoreferenceError(f"source '{source.name}' ({path}): {err}") from None
    except Exception as err:  # netCDF4 raises OSError/RuntimeError/KeyError on bad files
        raise FrameReadError(f"{path}: {type(err).__name__}: {err}") from err
    for name, ours in (("x", grid.x), ("y", grid.y)):
        theirs = axes[name]
        if theirs is None:
            continue
        if name == "y" and theirs.size > 1 and theirs[0] < theirs[-1]:
            theirs = theirs[::-1]  # _decode_xarray flips south-up files to north-up
        spacing = abs(ours[1] - ours[0]) if ours.size > 1 else 1.0
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=0, atol=1e-3 * spacing):
            raise GeoreferenceError(
                f"source '{source.name}' ({path}): the file's {name} runs {theirs[0]:g} .. "
                f"{theirs[-1]:g} m ({theirs.size} values), the importer's georeference gives "
                f"{ours[0]:g} .. {ours[-1]:g} m ({ours.size} values)"
            )


def _call_importer(source: SourceConfig, path: str):
    importer = _importer(source)
    try:
        with _DECODE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importer(path, **source.importer_kwargs)
    except Exception as err:  # importers raise anything from OSError to KeyError on bad files
        raise FrameReadError(f"{path}: {type(err).__name__}: {err}") from err


def to_rain_rate(data: np.ndarray, metadata: dict, source: SourceConfig) -> np.ndarray:
    """Convert importer output to rain rate in mm/h (float32, NaN = no data).

    Uses :func:`pysteps.utils.conversion.to_rainrate`; values below the importer's detection
    threshold become 0, negative values (BoM delivers down to -0.1 mm) are clipped to 0 and
    values above ``conversion.max_rain_rate`` become no-data.
    """
    to_rainrate = import_pysteps("pysteps.utils.conversion").to_rainrate
    metadata = dict(metadata)
    conv = source.conversion
    if conv.units != "auto":
        metadata["unit"] = conv.units
        if conv.units == "dBZ":
            metadata["transform"] = "dB"
    zr_a = conv.zr_a or metadata.get("zr_a") or 200.0
    zr_b = conv.zr_b or metadata.get("zr_b") or 1.6
    with np.errstate(invalid="ignore", over="ignore"):
        rain_rate, out_meta = to_rainrate(np.asarray(data, dtype=float), metadata, zr_a, zr_b)
        rain_rate = np.where(rain_rate < out_meta.get("threshold", 0.0), 0.0, rain_rate)
        rain_rate = np.clip(rain_rate, 0.0, None)
        if conv.max_rain_rate is not None:
            rain_rate = np.where(rain_rate > conv.max_rain_rate, np.nan, rain_rate)
    return rain_rate.astype(np.float32)


def read_frame(source: SourceConfig, path: str, grid: Grid) -> np.ndarray:
    """Decode one file to rain rate (mm/h, float32, shape ``grid.shape``).

    Raises
    ------
    FrameReadError
        If the file is missing, empty, corrupt or its grid differs from ``grid``.
    """
    if source.decoder == "xarray":
        data = _decode_xarray(source, path)
        metadata = grid.metadata
    else:
        data, _, metadata = _call_importer(source, path)
    if data.shape != grid.shape:
        raise GridMismatchError(
            f"{path}: grid {data.shape[0]}x{data.shape[1]} differs from the source's "
            f"{grid.shape[0]}x{grid.shape[1]}"
        )
    return to_rain_rate(data, metadata, source)


class GridMismatchError(FrameReadError):
    """A file's grid differs from the rest of its source (always fatal)."""


def _decode_xarray(source: SourceConfig, path: str) -> np.ndarray:
    """The source's variable as xarray decodes it (CF mask and scale), north-up.

    netCDF4 reads the raw values and attributes of just this variable (and ``y``), and xarray's
    own CF decoder (:func:`xarray.conventions.decode_cf_variable`, what ``open_dataset`` applies
    to each variable) decodes them: the same values as ``xr.open_dataset(path)[variable]``
    (tested), in about half the time, because ``open_dataset`` builds and
    decodes the whole Dataset (every variable, coordinate indexes) for each file. The decode
    holds the process's netCDF lock, so this is what a single process ingests per second.
    """
    import netCDF4  # here, not at the top: the pysteps decoder never needs it
    import xarray as xr

    try:
        with _DECODE_LOCK, netCDF4.Dataset(path) as nc:
            field = _raw_variable(nc, source.variable).squeeze()
            y = _raw_variable(nc, "y") if "y" in nc.variables else None
    except Exception as err:  # netCDF4 raises OSError/RuntimeError/KeyError on bad files
        raise FrameReadError(f"{path}: {type(err).__name__}: {err}") from err
    field = xr.conventions.decode_cf_variable(source.variable, field)
    if "y" in field.dims and field.sizes["y"] > 1:
        # pysteps grids are north-up (yorigin=upper): flip south-up files. Without a coordinate
        # variable y counts up (xarray's default index), so such a file is flipped too.
        if y is None:
            y = np.arange(field.sizes["y"])
        else:
            y = np.asarray(xr.conventions.decode_cf_variable("y", y))
        if y[0] < y[-1]:
            field = field.isel(y=slice(None, None, -1))
    return np.squeeze(field.values)


def _raw_variable(nc, name: str):
    """A netCDF variable as stored (no CF decoding), as an :class:`xarray.Variable`."""
    import xarray as xr

    variable = nc[name]
    variable.set_auto_maskandscale(False)
    attrs = {key: variable.getncattr(key) for key in variable.ncattrs()}
    return xr.Variable(variable.dimensions, variable[...], attrs)
