"""The forecast contract and its CF-1.8 NetCDF export."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import netCDF4
import numpy as np
import pyproj
import pytest
import xarray as xr

from nowcast.config import ConfigError
from nowcast.export import ExportConfig, export
from nowcast.nowcasts.forecast import forecast_crs, lead_time_minutes, make_forecast
from nowcast.nowcasts.netcdf import forecast_to_dataset, netcdf_bytes, write_forecast_netcdf
from nowcast.sources.cube import cube_crs, open_cube
from nowcast.storage import DiskWriteError, StoreLockedError

REPO = Path(__file__).resolve().parent.parent
N_LEAD = 6
PROVENANCE = {
    "checkpoint_sha256": "0f" * 32,
    "config": {"name": "bom", "train": {"epochs": 3}},
}


@pytest.fixture(scope="module")
def bom(bom_cube):
    """The BoM cube and forecasts made of its real next frames (no model needed)."""
    cube = open_cube(bom_cube)
    start = 59  # 09:50 UTC, rain over the coast

    def forecast(index: int, method: str = "observed_as_forecast") -> xr.DataArray:
        values = cube["rain_rate"].isel(time=slice(index + 1, index + 1 + N_LEAD)).values
        values = values.copy()
        values[:, :40, :60] = np.nan  # a no-data block, as outside radar range
        return make_forecast(values, cube["time"].values[index], 10, cube, method=method)

    return cube, forecast(start), forecast(start + 3)


def cf_check(path: Path) -> str:
    """Run the CF checker offline against the shared tables; return its report."""
    tables = Path(os.environ["NOWCAST_DATA_ROOT"]).parent / "cf"
    cfchecks = Path(sys.executable).parent / "cfchecks"
    result = subprocess.run(
        [
            str(cfchecks),
            "-v",
            "1.8",
            "-s",
            str(tables / "cf-standard-name-table.xml"),
            "-a",
            str(tables / "area-type-table.xml"),
            "-r",
            str(tables / "standardized-region-list.xml"),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.stdout + result.stderr


def test_make_forecast_follows_the_contract(bom):
    cube, forecast, _ = bom
    assert forecast.name == "rain_rate"
    assert forecast.dims == ("lead_time", "y", "x")
    assert forecast.dtype == np.float32
    assert forecast["lead_time"].dtype == np.dtype("timedelta64[ns]")
    np.testing.assert_array_equal(lead_time_minutes(forecast), 10.0 * np.arange(1, N_LEAD + 1))
    reference = forecast["forecast_reference_time"].values
    assert reference == cube["time"].values[59]
    np.testing.assert_array_equal(forecast["time"].values, cube["time"].values[60 : 60 + N_LEAD])
    np.testing.assert_array_equal(forecast["x"].values, cube["x"].values)
    assert forecast["y"].attrs["standard_name"] == "projection_y_coordinate"
    assert forecast_crs(forecast) == cube_crs(cube)
    assert forecast.attrs["units"] == "mm h-1"
    assert forecast.attrs["radar_source"] == "bom"


def test_make_forecast_rejects_a_wrong_shape(bom):
    cube, _, _ = bom
    with pytest.raises(ValueError, match=r"expected \(n_lead, 512, 512\)"):
        make_forecast(np.zeros((3, 10, 10)), "2020-10-31T10:00", 10, cube)


def test_netcdf_passes_the_cf_checker(bom, tmp_path):
    _, first, _ = bom
    path = tmp_path / "forecast.nc"
    write_forecast_netcdf(first, path, PROVENANCE)
    report = cf_check(path)
    errors = re.search(r"ERRORS detected: (\d+)", report)
    warnings = re.search(r"WARNINGS given: (\d+)", report)
    assert errors and warnings, report
    assert int(errors.group(1)) == 0, report
    assert int(warnings.group(1)) == 0, report


def test_netcdf_round_trip_is_exact(bom, tmp_path):
    cube, forecast, _ = bom
    path = write_forecast_netcdf(forecast, tmp_path / "forecast.nc", PROVENANCE)
    with xr.open_dataset(path) as ds:
        ds.load()
    read = ds["precip_intensity"]
    assert read.dims == ("lead_time", "y", "x")
    assert read.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(read.values), np.isnan(forecast.values))
    np.testing.assert_array_equal(read.values, forecast.values)  # NaN == NaN here
    for name in ("lead_time", "time", "forecast_reference_time", "x", "y"):
        assert ds[name].dtype == forecast[name].dtype, name
        np.testing.assert_array_equal(ds[name].values, forecast[name].values)
    with netCDF4.Dataset(path) as nc:  # as pysteps reads it: seconds since the reference time
        assert re.fullmatch(r"seconds since 2020-10-31[T ]09:50:00", nc["time"].units)
        np.testing.assert_array_equal(nc["time"][:], 600 * np.arange(1, N_LEAD + 1))
        assert nc["forecast_reference_time"][:] == 0
    assert ds["lead_time"].encoding["units"] == "minutes"
    assert ds["lead_time"].attrs["standard_name"] == "forecast_period"
    assert ds["forecast_reference_time"].attrs["standard_name"] == "forecast_reference_time"
    assert read.attrs["standard_name"] == "lwe_precipitation_rate"
    assert read.attrs["units"] == "mm h-1"
    assert read.attrs["grid_mapping"] == "crs"
    assert read.encoding["zlib"] and read.encoding["complevel"] == 4
    assert read.encoding["chunksizes"] == (1, 512, 512)
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert ds.attrs["model_checkpoint_sha256"] == PROVENANCE["checkpoint_sha256"]
    assert json.loads(ds.attrs["config"]) == PROVENANCE["config"]
    assert ds.attrs["nowcast_method"] == "observed_as_forecast"
    assert ds.attrs["radar_source"] == "bom"
    assert ds.attrs["institution"] == cube.attrs["institution"]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", ds.attrs["date_created"])


def test_crs_is_recoverable(bom, tmp_path):
    cube, forecast, _ = bom
    path = write_forecast_netcdf(forecast, tmp_path / "forecast.nc")
    with xr.open_dataset(path) as ds:
        from_cf = pyproj.CRS.from_cf(ds["crs"].attrs)
        from_wkt = pyproj.CRS.from_wkt(ds["crs"].attrs["crs_wkt"])
    assert from_cf == cube_crs(cube)
    assert from_wkt == cube_crs(cube)


def test_latlon_locate_the_brisbane_radar(bom, tmp_path):
    _, forecast, _ = bom
    path = write_forecast_netcdf(forecast, tmp_path / "forecast.nc")
    with xr.open_dataset(path) as ds:  # plain xarray, as a pysteps user would open it
        lat, lon = ds["lat"].values, ds["lon"].values
        assert ds["lat"].attrs["units"] == "degrees_north"
        assert "lat" in ds["precip_intensity"].encoding["coordinates"]
    centre = (lat.shape[0] // 2, lat.shape[1] // 2)  # the radar is at the grid centre
    assert lat[centre] == pytest.approx(-27.718, abs=0.01)
    assert lon[centre] == pytest.approx(153.24, abs=0.01)
    assert lat[0, centre[1]] > lat[-1, centre[1]]  # y descends: first row is north
    assert lon[centre[0], -1] > lon[centre[0], 0]
    # a 256 km square about the radar: about 2.3 degrees of latitude
    assert lat.max() - lat.min() == pytest.approx(2.3, abs=0.1)


def test_failed_write_leaves_no_file(bom, tmp_path, monkeypatch):
    _, forecast, _ = bom
    final = tmp_path / "forecast.nc"

    def interrupted(self, path, *args, **kwargs):
        Path(path).write_bytes(b"CDF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_netcdf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_forecast_netcdf(forecast, final)
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, xarray as xr
    from nowcast.nowcasts.netcdf import write_forecast_netcdf
    from nowcast.nowcasts.forecast import make_forecast
    from nowcast.sources.cube import crs_variable
    import pyproj

    grid = xr.Dataset(
        {"crs": crs_variable(pyproj.CRS.from_epsg(3035))},
        coords={"y": [1500.0, 500.0], "x": [500.0, 1500.0]},
    )
    forecast = make_forecast(np.ones((2, 2, 2)), "2020-01-01T00:00", 10, grid)

    def killed(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"CDF partial")
        os.kill(os.getpid(), signal.SIGKILL)

    xr.Dataset.to_netcdf = killed
    write_forecast_netcdf(forecast, sys.argv[1])
    """
)


def test_killed_write_leaves_no_file_and_rerun_completes(bom, tmp_path):
    final = tmp_path / "out" / "forecast.nc"
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(final)], cwd=REPO, capture_output=True
    )
    assert result.returncode == -9, result.stderr.decode()
    assert not final.exists()
    stale = list(final.parent.glob("forecast.nc.tmp-*"))
    assert len(stale) == 1  # the killed run's temporary, never mistaken for a finished file

    _, forecast, _ = bom
    write_forecast_netcdf(forecast, final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["forecast.nc"]
    with xr.open_dataset(final) as ds:
        assert ds.sizes["lead_time"] == N_LEAD


def test_forecast_to_dataset_without_latlon(bom):
    _, forecast, _ = bom
    ds = forecast_to_dataset(forecast, latlon=False)
    assert "lat" not in ds and "lon" not in ds
    assert set(ds.data_vars) == {"precip_intensity", "crs"}


def _experiment(tmp_path: Path, export_section: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    config = {
        "name": "bom",
        "sources": ["bom"],
        "run_dir": str(tmp_path / "run"),
        "patch_dir": str(tmp_path / "patches"),
    }
    config["export"] = export_section
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_export_stage_writes_one_file_per_forecast(bom, tmp_path):
    _, first, second = bom
    config = _experiment(tmp_path, {"latlon": False})
    paths = export(config, forecasts=[first, second])
    assert [Path(p).name for p in paths] == [
        "bom_observed_as_forecast_20201031T0950Z.nc",
        "bom_observed_as_forecast_20201031T1020Z.nc",
    ]
    assert all(Path(p).parent == tmp_path / "run" / "netcdf" for p in paths)
    with xr.open_dataset(paths[0]) as ds:
        assert "lat" not in ds
        assert json.loads(ds.attrs["config"])["name"] == "bom"


def test_export_stage_from_a_forecast_source(bom, tmp_path):
    _, first, second = bom
    persistence = first.copy()
    persistence.attrs["method"] = "persistence"
    config = _experiment(tmp_path, {"out_dir": str(tmp_path / "nc")})
    calls = []

    def source(experiment):
        calls.append(experiment.name)
        return [first, second, persistence]

    paths = export(config, forecast_source=source)
    assert calls == ["bom"]
    assert sorted(Path(p).name for p in paths) == [
        "bom_observed_as_forecast_20201031T0950Z.nc",
        "bom_observed_as_forecast_20201031T1020Z.nc",
        "bom_persistence_20201031T0950Z.nc",
    ]
    with xr.open_dataset(tmp_path / "nc" / "bom_persistence_20201031T0950Z.nc") as ds:
        assert ds.attrs["nowcast_method"] == "persistence"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _load_all(folder: Path) -> dict[str, xr.Dataset]:
    loaded = {}
    for path in sorted(folder.iterdir()):
        with xr.open_dataset(path) as ds:
            loaded[path.name] = ds.load()
    return loaded


def _assert_same_files(a: dict[str, xr.Dataset], b: dict[str, xr.Dataset]) -> None:
    """Same names, values, coordinates, encodings and attributes (but the creation time)."""
    assert a.keys() == b.keys()
    for name in a:
        xr.testing.assert_identical(a[name].drop_attrs(deep=False), b[name].drop_attrs(deep=False))
        moment = {"history", "date_created"}
        assert {k: v for k, v in a[name].attrs.items() if k not in moment} == {
            k: v for k, v in b[name].attrs.items() if k not in moment
        }
        dtypes = [ds["precip_intensity"].encoding["dtype"] for ds in (a[name], b[name])]
        assert dtypes[0] == dtypes[1]


def test_export_folder_appears_only_when_complete(bom, tmp_path, monkeypatch):
    _, first, second = bom
    config = _experiment(tmp_path, {})
    run, folder = tmp_path / "run", tmp_path / "run" / "netcdf"
    real_write = xr.Dataset.to_netcdf
    writes = []

    def killed_in_the_second_file(self, path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"CDF partial")
            raise RuntimeError("killed")
        return real_write(self, path, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_netcdf", killed_in_the_second_file)
    with pytest.raises(RuntimeError, match="killed"):
        export(config, forecasts=[first, second])
    assert _entries(run) == []  # no folder, no temporary, no lock
    # A SIGKILL leaves its temporary folder (with one file done); the next run removes it.
    leftover = run / "netcdf.tmp-99999-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "bom_observed_as_forecast_20201031T0950Z.nc").write_bytes(b"CDF partial")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", real_write)
    paths = export(config, forecasts=[first, second])
    assert _entries(run) == ["netcdf"]
    assert [Path(p).parent for p in paths] == [folder, folder]
    assert _entries(folder) == sorted(Path(p).name for p in paths)
    complete = _load_all(folder)

    # A rerun killed in its second file leaves the previous complete folder as it was.
    writes.clear()
    monkeypatch.setattr(xr.Dataset, "to_netcdf", killed_in_the_second_file)
    with pytest.raises(RuntimeError, match="killed"):
        export(config, forecasts=[first, second])
    assert _entries(run) == ["netcdf"]
    _assert_same_files(_load_all(folder), complete)

    monkeypatch.setattr(xr.Dataset, "to_netcdf", real_write)
    assert export(config, forecasts=[first, second]) == paths
    assert _entries(run) == ["netcdf"]
    _assert_same_files(_load_all(folder), complete)


def test_export_checks_free_space_before_writing(bom, tmp_path, monkeypatch):
    _, first, second = bom
    config = _experiment(tmp_path, {})
    folder = tmp_path / "run" / "netcdf"
    monkeypatch.setattr("nowcast.storage.free_bytes", lambda path: 4096)
    with pytest.raises(DiskWriteError) as err:
        export(config, forecasts=[first, second])
    message = str(err.value)
    assert str(folder) in message and "export of 2 NetCDF file(s)" in message
    assert "4.0 KiB free" in message and "\n" not in message
    assert _entries(tmp_path / "run") == []

    # The estimate bounds what is written: the files uncompressed, coordinates included.
    monkeypatch.undo()
    paths = export(config, forecasts=[first, second])
    written = sum(os.path.getsize(p) for p in paths)
    assert written <= 2 * netcdf_bytes(first)


def test_export_to_a_folder_in_use_fails_on_its_lock(bom, tmp_path):
    _, first, _ = bom
    config = _experiment(tmp_path, {})
    folder = tmp_path / "run" / "netcdf"
    folder.parent.mkdir(parents=True)
    live = subprocess.Popen(["sleep", "60"])  # stands for an export that is writing the folder
    try:
        Path(f"{folder}.lock").write_text(
            json.dumps({"host": socket.gethostname(), "pid": live.pid})
        )
        with pytest.raises(StoreLockedError, match=f"netcdf.lock is held .* pid {live.pid}"):
            export(config, forecasts=[first])
        assert _entries(folder.parent) == ["netcdf.lock"]
    finally:
        live.kill()
        live.wait()


def test_export_does_not_replace_a_folder_of_other_files(bom, tmp_path):
    _, first, _ = bom
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"results holds files other than NetCDF \(notes.txt\)"):
        export(_experiment(tmp_path, {"out_dir": str(folder)}), forecasts=[first])
    assert _entries(folder) == ["notes.txt"]


def test_export_stage_needs_a_patch_store_and_a_valid_section(tmp_path):
    with pytest.raises(ConfigError, match="nowcast patches"):
        export(_experiment(tmp_path, {}))
    with pytest.raises(ConfigError, match="multi_files"):
        export(_experiment(tmp_path, {"multi_files": True}), forecasts=[])
    assert ExportConfig().latlon is True


def test_export_stage_writes_forecasts_of_the_test_windows(tmp_path):
    from conftest import synthetic_catalog

    from nowcast.config import ExperimentConfig
    from nowcast.export import export
    from nowcast.patches.build import build_patches
    from nowcast.patches.reader import evaluation_windows
    from nowcast.sources.ingest import ingest

    ingest(
        "synthetic",
        str(tmp_path / "cubes"),
        catalog=synthetic_catalog(n_frames=40),
        scheduler="threads",
        progress=False,
    )
    experiment = ExperimentConfig(
        name="syn",
        sources=["synthetic"],
        cube_dir=str(tmp_path / "cubes"),
        patch_dir=str(tmp_path / "patches"),
        run_dir=str(tmp_path / "run"),
        patches={
            "n_input_frames": 3,
            "n_target_frames": 3,
            "patch_size": 32,
            "stride": 32,
            "buffer_minutes": 20,
            "min_wet_fraction": 0.1,
        },
        export={"methods": ["persistence", "extrapolation"], "window_stride_minutes": 20},
    )
    store = build_patches(experiment, scheduler="threads", progress=False)
    n_windows = len(evaluation_windows(store, "test"))
    paths = export(experiment)
    expected_starts = (n_windows + 1) // 2  # one start every 20 min on a 10-min axis
    assert len(paths) == 2 * expected_starts
    ds = xr.open_dataset(paths[0])
    assert ds["precip_intensity"].sizes["lead_time"] == 3
    assert ds.attrs["nowcast_method"] in {"persistence", "extrapolation"}
    assert json.loads(ds.attrs["config"])["name"] == "syn"
