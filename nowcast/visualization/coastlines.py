"""Coastlines and borders that work offline.

Cartopy downloads Natural Earth shapefiles on first use, which fails (or hangs behind a firewall
that drops packets) without network. The map features are therefore chosen once per process:

1. Natural Earth coastline and borders, if the shapefiles are on disk (cartopy's data
   directories or :data:`SYSTEM_DATA_DIRS`), or can be downloaded within
   :data:`DOWNLOAD_TIMEOUT_S`;
2. otherwise the coarse GSHHS coastline that Debian's ``python-cartopy-data`` installs (no
   borders; other GSHHS scales would trigger a large download, so they are not used);
3. otherwise nothing, with one warning line.
"""

from __future__ import annotations

import functools
import logging
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cartopy
import cartopy.crs as ccrs
import cartopy.feature as cfeature
from cartopy.io import Downloader, DownloadWarning, shapereader

logger = logging.getLogger(__name__)

# Debian's python-cartopy-data installs shapefiles here (GSHHS coarse coastline).
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/cartopy/data",)
DOWNLOAD_TIMEOUT_S = 5.0
GSHHS_SCALE, GSHHS_LEVEL = "c", 1


@dataclass(frozen=True)
class Basemap:
    """Features to draw under a radar map.

    Attributes
    ----------
    features : tuple of (cartopy.feature.Feature, dict)
        Each feature with its drawing keyword arguments.
    description : str
        Where the features came from (``natural_earth 10m``, ``gshhs c`` or ``none``).
    """

    features: tuple
    description: str


def natural_earth_scale(width_m: float) -> str:
    """Natural Earth resolution for a map ``width_m`` metres wide."""
    return "10m" if width_m < 2.0e6 else "50m"


def basemap(scale: str = "10m") -> Basemap:
    """Coastline and border features available now (see the module docstring).

    Parameters
    ----------
    scale : {'10m', '50m', '110m'}
        Preferred Natural Earth resolution.

    Returns
    -------
    Basemap
    """
    config = cartopy.config
    return _basemap(scale, str(config["data_dir"]), str(config["pre_existing_data_dir"]))


@functools.cache
def _basemap(scale: str, data_dir: str, pre_existing_data_dir: str) -> Basemap:
    # The cartopy data directories are part of the cache key: a changed configuration is
    # probed again, an unchanged one never more than once per process (one warning at most).
    coast_style = {"linewidth": 0.7, "edgecolor": "black", "facecolor": "none"}
    border_style = {"linewidth": 0.6, "edgecolor": "dimgray", "facecolor": "none", "linestyle": "-"}
    coastline = _natural_earth(scale, "physical", "coastline")
    if coastline is not None:
        features = [(coastline, coast_style)]
        borders = _natural_earth(scale, "cultural", "admin_0_boundary_lines_land")
        if borders is not None:
            features.append((borders, border_style))
        return Basemap(tuple(features), f"natural_earth {scale}")
    gshhs = _local_shapefile(("shapefiles", "gshhs", GSHHS_SCALE), _gshhs_name())
    if gshhs is not None:
        return Basemap(((_shapefile_feature(gshhs), coast_style),), f"gshhs {GSHHS_SCALE}")
    logger.warning(
        "no coastline data: Natural Earth %s is not on disk and could not be downloaded, and "
        "no GSHHS shapefile was found (install Debian's python-cartopy-data); maps are drawn "
        "without coastlines",
        scale,
    )
    return Basemap((), "none")


def _gshhs_name() -> str:
    return f"GSHHS_{GSHHS_SCALE}_L{GSHHS_LEVEL}.shp"


def _data_dirs() -> list[Path]:
    config = cartopy.config
    dirs = [config["pre_existing_data_dir"], config["data_dir"], *SYSTEM_DATA_DIRS]
    return [Path(d) for d in dirs if str(d) not in ("", ".")]


def _local_shapefile(subdirs: tuple[str, ...], name: str) -> Path | None:
    for root in _data_dirs():
        path = root.joinpath(*subdirs, name)
        if path.is_file():
            return path
    return None


def _natural_earth(scale: str, category: str, name: str) -> cfeature.Feature | None:
    """A Natural Earth feature whose shapefile is (now) on disk, else None."""
    filename = f"ne_{scale}_{name}.shp"
    local = _local_shapefile(("shapefiles", "natural_earth", category), filename)
    if local is None:
        local = _download_natural_earth(scale, category, name)
    if local is None:
        return None
    return _shapefile_feature(local)


class ShapefileFeature(cfeature.Feature):
    """The geometries of a lon/lat shapefile, drawn only where they meet the map.

    Not a :class:`cartopy.feature.ShapelyFeature`: cartopy projects every geometry of one of
    those onto every map (to keep per-geometry colours stable under pan and zoom), while a
    plain feature gets only the geometries that intersect the axes' extent, as cartopy's own
    Natural Earth features do. For a radar map and the global GSHHS coastline that is a few
    polygons instead of all of them, and the same pixels.

    Parameters
    ----------
    geometries : iterable of shapely geometries
        In longitude/latitude.
    **kwargs
        Drawing keyword arguments, as for any cartopy feature.
    """

    def __init__(self, geometries, **kwargs):
        super().__init__(ccrs.PlateCarree(), **kwargs)
        self._geometries = tuple(geometries)

    def geometries(self):
        return iter(self._geometries)


def _shapefile_feature(path: Path) -> cfeature.Feature:
    """A feature of every geometry in a lon/lat shapefile."""
    # pyshp logs a line per GSHHS polygon made only of holes (harmless for outlines).
    shapefile_logger = logging.getLogger("shapefile")
    level = shapefile_logger.level
    shapefile_logger.setLevel(logging.ERROR)
    try:
        geometries = tuple(shapereader.Reader(path).geometries())
    finally:
        shapefile_logger.setLevel(level)
    return ShapefileFeature(geometries)


def _download_natural_earth(scale: str, category: str, name: str) -> Path | None:
    downloader = Downloader.from_config(("shapefiles", "natural_earth", scale, category, name))
    format_dict = {
        "config": cartopy.config,
        "category": category,
        "name": name,
        "resolution": scale,
    }
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), warnings.catch_warnings():
            warnings.simplefilter("ignore", DownloadWarning)
            return Path(downloader.path(format_dict))
    except Exception as err:  # URLError, timeouts, HTTP errors, a bad zip: all mean "offline"
        logger.debug("Natural Earth %s %s unavailable: %s", scale, name, err)
        return None


@contextmanager
def _socket_timeout(seconds: float):
    # Process-wide, but only for the moment of one probe: cartopy offers no per-request timeout.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def add_basemap(ax, width_m: float) -> Basemap:
    """Draw coastlines (and borders when available) on a GeoAxes."""
    chosen = basemap(natural_earth_scale(width_m))
    for feature, style in chosen.features:
        ax.add_feature(feature, zorder=3, **style)
    return chosen
