"""pysteps reads every forecast NetCDF that predict and export write, and gets what was written.

Each check reads a file with ``pysteps.io.nowcast_importers.import_netcdf_pysteps(path,
onerror="raise")``, as a pysteps user would, and compares what comes back with the forecast
written: values, NaN mask, lead times, valid timestamps and grid (x1/x2/y1/y2 within 1 m, pixel
sizes exactly those of the cube).
"""

from __future__ import annotations

import re
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import netCDF4
import numpy as np
import pandas as pd
import pyproj
import pytest
import xarray as xr
from test_export import cf_check
from test_predict import residual_checkpoint

from nowcast import import_pysteps
from nowcast.config import ConfigError, ExperimentConfig
from nowcast.export import export
from nowcast.nowcasts.forecast import lead_time_minutes, make_ensemble_forecast, make_forecast
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.netcdf import POLAR_STEREOGRAPHIC, VARIABLE, write_forecast_netcdf
from nowcast.nowcasts.persistence import forecast as persistence
from nowcast.nowcasts.probability import PROBABILITY_NAME, THRESHOLDS, exceedance_probability
from nowcast.predict import predict
from nowcast.sources.cube import crs_variable, cube_crs, open_cube
from nowcast.sources.ingest import ingest

import_netcdf_pysteps = import_pysteps("pysteps.io.nowcast_importers").import_netcdf_pysteps

#: Every source of data_catalog.yaml (test_every_shipped_source_is_covered keeps it so).
SOURCES = ["bom", "fmi_2016", "fmi_2017", "knmi", "opera", "synthetic"]
#: The projections pysteps' reader parses: those sources' files name their grid mapping so.
POLAR_STEREOGRAPHIC_SOURCES = ["fmi_2016", "fmi_2017", "knmi"]
#: Reference times with rain (default: the catalog's start plus the input frames).
REFERENCE = {"bom": datetime(2020, 10, 31, 9, 50)}
N_FRAMES = 4  # ingested per source, ending at the reference time
N_LEAD = 3
#: The proj parameters pysteps' reader builds from a polar_stereographic grid mapping.
PYSTEPS_PARAMETERS = ("proj", "lon_0", "lat_0", "lat_ts", "k_0", "x_0", "y_0")


def _reference(catalog, name: str) -> datetime:
    source = catalog.sources[name]
    if name in REFERENCE:
        return REFERENCE[name]
    start = datetime.fromisoformat(source.start or "2000-01-01T00:00")
    return start + timedelta(minutes=(N_FRAMES - 1) * source.timestep)


@pytest.fixture(scope="module")
def cubes(catalog, tmp_path_factory) -> dict[str, str]:
    """``N_FRAMES`` real frames of every shipped source, ending at its reference time."""
    folder = tmp_path_factory.mktemp("cubes")
    paths = {}
    for name in SOURCES:
        end = _reference(catalog, name)
        start = end - timedelta(minutes=(N_FRAMES - 1) * catalog.sources[name].timestep)
        result = ingest(
            name,
            str(folder),
            catalog=catalog,
            start=start,
            end=end,
            scheduler="in-process",
            progress=False,
        )
        paths[name] = result.path
    return paths


def _with_no_data_block(forecast: xr.DataArray) -> xr.DataArray:
    """The forecast with a no-data corner, as outside radar range (in every source)."""
    values = forecast.values.copy()
    values[..., :40, :60] = np.nan
    forecast = forecast.copy(data=values)
    return forecast


def _export(forecast: xr.DataArray, name: str, folder: Path) -> str:
    """Write ``forecast`` through the ``export`` stage; return its file."""
    experiment = ExperimentConfig(
        name=name,
        sources=[name],
        run_dir=str(folder / "run"),
        patch_dir=str(folder / "patches"),
        export={"out_dir": str(folder / "netcdf")},
    )
    (path,) = export(experiment, forecasts=[forecast])
    return path


def _timestamps(metadata: dict) -> np.ndarray:
    return np.array([np.datetime64(t.isoformat()) for t in metadata["timestamps"]], "M8[ns]")


def assert_pysteps_reads(path, expected: np.ndarray, forecast: xr.DataArray, cube) -> dict:
    """pysteps reads ``path`` as ``expected`` (north-up values) on ``cube``'s grid, with the
    forecast's lead times and valid times; returns its metadata."""
    values, metadata = import_netcdf_pysteps(str(path), onerror="raise")
    expected = np.squeeze(expected)  # as pysteps squeezes a one-member or one-lead file
    assert values.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(values), np.isnan(expected))
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(np.asarray(metadata["leadtimes"]), lead_time_minutes(forecast))
    np.testing.assert_array_equal(_timestamps(metadata), forecast["time"].values)
    x, y = cube["x"].values, cube["y"].values
    dx, dy = abs(x[1] - x[0]), abs(y[1] - y[0])
    assert (metadata["xpixelsize"], metadata["ypixelsize"]) == (dx, dy)
    edges = {"x1": x.min() - dx / 2, "x2": x.max() + dx / 2}
    edges.update(y1=y.min() - dy / 2, y2=y.max() + dy / 2)
    for key, edge in edges.items():
        assert metadata[key] == pytest.approx(edge, abs=1.0), key
    assert (metadata["yorigin"], metadata["unit"]) == ("upper", "mm/h")
    return metadata


def test_every_shipped_source_is_covered(catalog):
    assert sorted(catalog.sources) == sorted(SOURCES)


@pytest.mark.parametrize("name", SOURCES)
def test_pysteps_reads_the_exported_forecast_of_every_source(name, cubes, catalog, tmp_path):
    cube = open_cube(cubes[name])
    inputs = cube_inputs(cube, _reference(catalog, name), 2)
    forecast = _with_no_data_block(persistence(inputs, N_LEAD))
    assert np.isfinite(forecast.values).any()
    path = _export(forecast, name, tmp_path)

    metadata = assert_pysteps_reads(path, forecast.values, forecast, cube)
    crs = cube_crs(cube)
    with xr.open_dataset(path) as ds:
        mapping = ds[VARIABLE].attrs["grid_mapping"]
        attrs = dict(ds[mapping].attrs)
    assert pyproj.CRS.from_cf(attrs) == crs
    # The file keeps the ellipsoid (which pysteps' projection string leaves out).
    ellipsoid = crs.ellipsoid
    assert attrs["semi_major_axis"] == ellipsoid.semi_major_metre
    assert attrs["semi_minor_axis"] == pytest.approx(ellipsoid.semi_minor_metre, abs=0.01)
    if name in POLAR_STEREOGRAPHIC_SOURCES:
        assert mapping == POLAR_STEREOGRAPHIC
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # to_dict warns that a proj string loses details
            theirs, ours = pyproj.CRS(metadata["projection"]).to_dict(), crs.to_dict()
        assert {key: theirs.get(key) for key in PYSTEPS_PARAMETERS} == {
            key: ours.get(key) for key in PYSTEPS_PARAMETERS
        }
    else:
        # pysteps parses no other projection: it gives none, and the WKT gives the CRS.
        assert mapping == "crs" and "projection" not in metadata
    report = cf_check(path)
    assert re.search(r"ERRORS detected: 0\b", report), report
    assert re.search(r"WARNINGS given: 0\b", report), report


def test_pysteps_reads_what_predict_writes(cubes, tmp_path):
    """``nowcast predict`` on real BoM frames: deterministic, and as a one-member ensemble."""
    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=3, n_target=N_LEAD)
    cube = open_cube(cubes["bom"])
    last = cube["rain_rate"].isel(time=-1).values  # the untrained residual model is persistence
    cube_dir = str(Path(cubes["bom"]).parent)
    for members in (None, 1):
        out = tmp_path / f"out-{members}"
        result = predict("bom", checkpoint, cube_dir=cube_dir, out_dir=out, members=members)
        with xr.open_dataset(result.netcdf) as ds:
            ds.load()
        written = ds[VARIABLE]
        assert written.dims[-3:] == ("lead_time", "y", "x")
        assert (PROBABILITY_NAME in ds) == bool(members)
        forecast = written.isel(realization=0) if members else written
        assert_pysteps_reads(result.netcdf, written.values, forecast, cube)
        assert pd.Timestamp(ds["forecast_reference_time"].values) == pd.Timestamp(REFERENCE["bom"])
        for lead in range(N_LEAD):
            np.testing.assert_allclose(forecast.values[lead], last, rtol=1e-5, atol=1e-5)


def test_an_ensemble_file_keeps_realization_first_and_its_probabilities(cubes, tmp_path):
    cube = open_cube(cubes["bom"])
    frames = cube["rain_rate"].values  # N_FRAMES real fields
    members = np.stack([frames[k : k + N_LEAD] for k in range(N_FRAMES - N_LEAD + 1)])
    members = np.concatenate([members, members[:1] * 2.0])  # three distinct members
    members[1, :, :40, :60] = np.nan  # no data in one member only
    forecast = make_ensemble_forecast(members, cube["time"].values[-1], 10, cube, "ensemble")
    probabilities = exceedance_probability(forecast, THRESHOLDS)
    written = {
        "predict": write_forecast_netcdf(forecast, tmp_path / "p.nc", probabilities=probabilities),
        "export": _export(forecast, "bom", tmp_path),
    }
    for path in written.values():
        assert_pysteps_reads(path, members, forecast, cube)
        with netCDF4.Dataset(path) as nc:
            assert nc[VARIABLE].dimensions == ("realization", "lead_time", "y", "x")
            assert nc[PROBABILITY_NAME].dimensions == ("threshold", "lead_time", "y", "x")
        with xr.open_dataset(path) as ds:
            np.testing.assert_array_equal(ds[PROBABILITY_NAME].values, probabilities.values)
            np.testing.assert_array_equal(ds["threshold"].values, THRESHOLDS)
        report = cf_check(path)
        assert re.search(r"ERRORS detected: 0\b", report), report
        assert re.search(r"WARNINGS given: 0\b", report), report


def test_a_south_up_forecast_is_written_north_up(tmp_path):
    """pysteps takes the first row for the north edge: a south-up grid is flipped, y with it."""
    crs = pyproj.CRS.from_proj4(
        "+proj=stere +lat_0=90 +lat_ts=60 +lon_0=25 +x_0=380886.31 +y_0=3395677.92 +R=6371288"
    )
    south_up = xr.Dataset(
        {"crs": crs_variable(crs)},
        coords={"y": 1000.0 * np.arange(5) + 500.0, "x": 1000.0 * np.arange(4) + 500.0},
    )
    values = np.arange(3 * 2 * 5 * 4, dtype=np.float32).reshape(3, 2, 5, 4)
    values[:, :, 0, 0] = np.nan  # the south-west corner
    ensemble = make_ensemble_forecast(values, "2020-01-01T00:00", 5, south_up, "ensemble")
    for forecast in (ensemble, ensemble.isel(realization=0, drop=True)):
        path = write_forecast_netcdf(forecast, tmp_path / f"{forecast.ndim}.nc")
        north_up = forecast.isel(y=slice(None, None, -1))
        assert_pysteps_reads(path, north_up.values, north_up, north_up)
        with xr.open_dataset(path) as ds:
            assert ds["y"].values[0] > ds["y"].values[-1]
            xr.testing.assert_equal(ds[VARIABLE].sortby("y").drop_vars(["lat", "lon"]), forecast)
            if PROBABILITY_NAME in ds:
                expected = exceedance_probability(north_up, THRESHOLDS)
                np.testing.assert_array_equal(ds[PROBABILITY_NAME].values, expected.values)


def test_multi_file_is_refused_in_one_line(tmp_path):
    """pysteps reads one reference time per file, so export writes no multi-forecast file."""
    experiment = ExperimentConfig(
        name="bom", sources=["bom"], run_dir=str(tmp_path / "run"), export={"multi_file": True}
    )
    grid = xr.Dataset(
        {"crs": crs_variable(pyproj.CRS.from_epsg(3035))},
        coords={"y": [1500.0, 500.0], "x": [500.0, 1500.0]},
    )
    forecast = make_forecast(np.ones((2, 2, 2)), "2020-01-01T00:00", 10, grid)
    with pytest.raises(ConfigError) as err:
        export(experiment, forecasts=[forecast])
    message = str(err.value)
    assert "multi_file" in message and "pysteps" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
