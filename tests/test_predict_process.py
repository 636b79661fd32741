"""`nowcast predict` as a process: its reported timings, its start-up measures, a lazy CLI, and
the map's coastlines drawn from only the geometries in view (same pixels)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import cartopy.crs as ccrs
import cartopy.feature as cfeature
import numpy as np
import pytest
import xarray as xr
from conftest import synthetic_catalog
from PIL import Image
from pyproj import CRS
from test_predict import residual_checkpoint
from typer.testing import CliRunner

from nowcast import cli
from nowcast.cli import app
from nowcast.sources.ingest import ingest
from nowcast.visualization import coastlines
from nowcast.visualization.maps import plot_rain_rate

STAGES = ["load_model", "read_inputs", "model", "netcdf", "map"]


@pytest.fixture(scope="module")
def cube_and_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("predict_process")
    catalog = synthetic_catalog(n_frames=8)
    ingest(
        "synthetic", str(tmp_path / "cubes"), catalog=catalog, scheduler="threads", progress=False
    )
    return catalog, tmp_path, residual_checkpoint(tmp_path / "model.pt")


def test_process_timings_of_the_command_are_consistent(cube_and_checkpoint, tmp_path):
    """The stages lie inside the process's wall time, after its start-up."""
    _, root, checkpoint = cube_and_checkpoint
    timings_json = tmp_path / "timings.json"
    args = ["predict", "--source", "synthetic", "--checkpoint", checkpoint]
    args += ["--cube-dir", str(root / "cubes"), "--out-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*args, "--timings-json", str(timings_json)])
    assert result.exit_code == 0, result.output
    timings = json.loads(timings_json.read_text())
    assert list(timings["stages_s"]) == STAGES
    assert 0 < timings["startup_s"]
    assert timings["startup_s"] + timings["work_s"] <= timings["wall_s"]
    assert f"wall {timings['wall_s']:.2f} s" in result.output
    assert len(list((tmp_path / "out").glob("*.nc"))) == 1


def test_predict_command_leaves_the_garbage_collector_on(cube_and_checkpoint, tmp_path):
    """Imports run with the collector paused; an in-process caller gets it back enabled."""
    _, root, checkpoint = cube_and_checkpoint
    args = ["predict", "--source", "synthetic", "--checkpoint", checkpoint]
    args += ["--cube-dir", str(root / "cubes"), "--out-dir", str(tmp_path)]
    assert gc.isenabled()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert gc.isenabled()
    with pytest.raises(RuntimeError), cli._gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("an import failed")
    assert gc.isenabled()


def test_cli_help_stays_lazy_and_every_command_has_help():
    code = (
        "import sys; from typer.testing import CliRunner; from nowcast.cli import app; "
        "result = CliRunner().invoke(app, ['--help']); assert result.exit_code == 0; "
        "print(sorted(m for m in ('torch', 'pysteps', 'xarray', 'matplotlib') "
        "if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip() == "[]"
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert "predict" in commands
    for command in commands:
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
    assert "--timings-json" in CliRunner().invoke(app, ["predict", "--help"]).output


def _shapely_feature(geometries):
    """What coastlines drew before: cartopy projects every geometry of it onto every map."""
    return cfeature.ShapelyFeature(geometries, ccrs.PlateCarree())


def test_coastlines_in_view_draw_the_same_pixels(tmp_path, monkeypatch):
    """Features that hand cartopy only the geometries in view give the same map, byte for byte."""
    # Coastline data is part of the test environment (`make system-deps`): fail, never skip.
    assert coastlines.basemap("10m").description != "none", (
        "no coastline data on this machine; install python-cartopy-data (make system-deps)"
    )
    crs = "+proj=aea +lat_0=-27.718 +lon_0=153.24 +lat_1=-26.2 +lat_2=-29.3 +datum=WGS84"
    coords = np.arange(-255_500.0, 256_000.0, 4000.0)
    rain = np.random.default_rng(0).gamma(0.5, 2.0, (coords.size, coords.size))
    field = xr.DataArray(
        rain.astype(np.float32),
        dims=("y", "x"),
        coords={"y": coords[::-1], "x": coords},
        attrs={"crs_wkt": CRS.from_proj4(crs).to_wkt()},
    )
    coastlines._basemap.cache_clear()
    plot_rain_rate(field=field, path=tmp_path / "in_view.png")
    monkeypatch.setattr(coastlines, "ShapefileFeature", _shapely_feature)
    coastlines._basemap.cache_clear()
    plot_rain_rate(field=field, path=tmp_path / "every_geometry.png")
    monkeypatch.setattr(coastlines, "basemap", lambda scale: coastlines.Basemap((), "none"))
    plot_rain_rate(field=field, path=tmp_path / "no_coastline.png")
    coastlines._basemap.cache_clear()
    in_view, every, none = (
        np.asarray(Image.open(tmp_path / f"{name}.png"))
        for name in ("in_view", "every_geometry", "no_coastline")
    )
    np.testing.assert_array_equal(in_view, every)
    # The coastline is on this map: the test compares drawn coastlines, not two empty maps.
    assert (in_view != none).any()
