"""Georeferencing: cube pixel centres agree with the importer's pixel size and the files."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import synthetic_catalog

from nowcast.sources.catalog import Catalog, list_frames
from nowcast.sources.cube import open_cube
from nowcast.sources.ingest import ingest
from nowcast.sources.readers import GeoreferenceError, _call_importer, grid_from_metadata, read_grid

REAL_SOURCES = ["bom", "fmi_2016", "fmi_2017", "knmi", "opera"]


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL_SOURCES)
def test_cube_spacing_is_the_importer_pixel_size(name, catalog, tmp_path):
    source = catalog[name]
    frame = list_frames(source)[0]
    one = source.model_copy(update={"start": frame.time.isoformat(), "end": frame.time.isoformat()})
    result = ingest(
        name,
        str(tmp_path),
        catalog=Catalog(sources={name: one}),
        scheduler="threads",
        progress=False,
    )
    ds = open_cube(result.path)
    _, _, metadata = _call_importer(source, frame.path)
    scale = 1000.0 if metadata.get("cartesian_unit") == "km" else 1.0
    np.testing.assert_allclose(np.diff(ds.x.values), metadata["xpixelsize"] * scale, rtol=1e-6)
    np.testing.assert_allclose(np.diff(ds.y.values), -metadata["ypixelsize"] * scale, rtol=1e-6)


@pytest.mark.realdata
def test_bom_cube_coordinates_are_the_file_coordinates(catalog):
    source = catalog["bom"]
    path = list_frames(source)[0].path
    grid = read_grid(source, path)
    with xr.open_dataset(path) as ds:
        assert ds.x.attrs["units"] == "km"
        np.testing.assert_allclose(grid.x, ds.x.values * 1000.0, atol=1e-6)
        np.testing.assert_allclose(grid.y, ds.y.values * 1000.0, atol=1e-6)
    assert grid.x[0] == -127750.0 and grid.x[-1] == 127750.0


def test_synthetic_spacing_is_its_pixel_size(tmp_path):
    cat = synthetic_catalog(n_frames=2, pixel_size=750.0)
    ds = open_cube(
        ingest("synthetic", str(tmp_path), catalog=cat, scheduler="threads", progress=False).path
    )
    np.testing.assert_array_equal(np.diff(ds.x.values), 750.0)
    np.testing.assert_array_equal(np.diff(ds.y.values), -750.0)


def _metadata(**update) -> dict:
    metadata = {
        "projection": "+proj=laea +lat_0=52 +lon_0=10 +ellps=WGS84 +units=m",
        "x1": 0.0,
        "x2": 1000.0,
        "y1": 0.0,
        "y2": 500.0,
        "xpixelsize": 100.0,
        "ypixelsize": 100.0,
        "yorigin": "upper",
    }
    return {**metadata, **update}


def test_extent_read_as_edges_or_centres_from_the_pixel_size():
    edges = grid_from_metadata(_metadata(), (5, 10))
    np.testing.assert_allclose(edges.x, 50.0 + 100.0 * np.arange(10))
    np.testing.assert_allclose(edges.y, [450.0, 350.0, 250.0, 150.0, 50.0])
    centres = grid_from_metadata(_metadata(x2=900.0, y2=400.0), (5, 10))
    np.testing.assert_allclose(centres.x, 100.0 * np.arange(10))
    np.testing.assert_allclose(centres.y, [400.0, 300.0, 200.0, 100.0, 0.0])


def test_inconsistent_extent_names_the_source_and_numbers():
    with pytest.raises(GeoreferenceError) as err:
        grid_from_metadata(_metadata(x2=950.0), (5, 10), where="source 'r' (f.h5)")
    message = str(err.value)
    assert "source 'r'" in message and "x2=950" in message and "xpixelsize 100" in message


@pytest.mark.realdata
def test_netcdf_coordinates_that_disagree_fail(catalog, monkeypatch):
    import nowcast.sources.readers as radar

    source = catalog["bom"]
    path = list_frames(source)[0].path
    real = radar._call_importer

    def shifted_importer(source, path):  # an importer whose extent is 1 km east of the file
        data, quality, metadata = real(source, path)
        return data, quality, {**metadata, "x1": metadata["x1"] + 1e3, "x2": metadata["x2"] + 1e3}

    monkeypatch.setattr(radar, "_call_importer", shifted_importer)
    with pytest.raises(GeoreferenceError) as err:
        read_grid(source, path)
    message = str(err.value)
    assert "source 'bom'" in message and path in message
    assert "file's x runs -127750 .. 127750 m" in message and "gives -126750 .. 128750 m" in message
