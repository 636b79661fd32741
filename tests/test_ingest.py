"""Ingest: real samples against pysteps, CRS/coordinates, bad input, atomicity, synthetic."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyproj
import pytest
import xarray as xr
from conftest import synthetic_catalog

from nowcast import storage
from nowcast.config import ConfigError
from nowcast.sources.catalog import Catalog, SourceConfig, list_frames, load_catalog
from nowcast.sources.cube import cube_crs, ingest_report, open_cube
from nowcast.sources.ingest import DISK_SAFETY_FACTOR, ingest
from nowcast.sources.readers import FrameReadError, GridMismatchError
from nowcast.sources.synthetic import SyntheticParams, synthetic_frame

REAL_SOURCES = ["bom", "fmi_2016", "fmi_2017", "knmi", "opera"]


def pysteps_reference(source: SourceConfig, path: str) -> tuple[np.ndarray, dict]:
    """Rain rate as pysteps' own importer and converter give it, with the catalog's QC."""
    from pysteps.io import get_method
    from pysteps.utils.conversion import to_rainrate

    data, _, metadata = get_method(source.importer, "importer")(path, **source.importer_kwargs)
    zr_a = source.conversion.zr_a or metadata.get("zr_a", 200.0)
    zr_b = source.conversion.zr_b or metadata.get("zr_b", 1.6)
    rain, meta = to_rainrate(data, metadata, zr_a, zr_b)
    rain = np.where(rain < meta["threshold"], 0.0, rain)
    rain = np.clip(rain, 0, None)
    if source.conversion.max_rain_rate:
        rain = np.where(rain > source.conversion.max_rain_rate, np.nan, rain)
    return rain, metadata


def _small_range(catalog: Catalog, name: str, n: int = 4) -> Catalog:
    """The source restricted to n frames around its middle (keeps the test fast)."""
    source = catalog[name]
    frames = list_frames(source)
    middle = len(frames) // 2
    start, end = frames[middle].time, frames[middle + n - 1].time
    restricted = source.model_copy(update={"start": start.isoformat(), "end": end.isoformat()})
    return Catalog(sources={name: restricted})


@pytest.mark.parametrize("name", REAL_SOURCES)
def test_real_source_matches_pysteps_importer(name, catalog, tmp_path):
    small = _small_range(catalog, name)
    result = ingest(name, str(tmp_path), catalog=small, scheduler="threads", progress=False)
    ds = open_cube(result.path)
    source = small[name]
    frames = list_frames(source)
    assert ds.sizes["time"] == len(frames) == result.n_read
    assert ds["rain_rate"].dtype == np.float32
    assert ds["rain_rate"].attrs["units"] == "mm h-1"

    for index in (0, len(frames) - 1):
        expected, metadata = pysteps_reference(source, frames[index].path)
        actual = ds["rain_rate"].isel(time=index).values
        np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
        np.testing.assert_allclose(actual, expected.astype(np.float32), rtol=1e-6, atol=1e-6)
        assert pd.Timestamp(ds.time.values[index]) == pd.Timestamp(frames[index].time)

    # Coordinates and CRS: pixel centres map to the same lon/lat as pysteps' own georeference.
    # pyproj.Proj inverts on the projection's own ellipsoid, which also works for KNMI's
    # km-sized one that a Transformer to EPSG:4326 refuses. The importer's pixel size is the
    # spacing; x1/x2 are domain edges for most importers, the outer pixel centres for bom_rf3.
    native = pyproj.Proj(metadata["projection"])
    ours = pyproj.Transformer.from_crs(cube_crs(ds), "EPSG:4326", always_xy=True)
    ny, nx = expected.shape
    dx, dy = metadata["xpixelsize"], metadata["ypixelsize"]
    half = 0.0 if source.importer == "bom_rf3" else 0.5
    for row, col in [(0, 0), (ny - 1, nx - 1), (ny // 3, nx // 2)]:
        x_native = metadata["x1"] + dx * (col + half)
        y_native = metadata["y2"] - dy * (row + half)  # yorigin upper
        lon_ref, lat_ref = native(x_native, y_native, inverse=True)
        lon, lat = ours.transform(ds.x.values[col], ds.y.values[row])
        assert abs(lon - lon_ref) < 1e-6 and abs(lat - lat_ref) < 1e-6
    assert ds.x.attrs["units"] == "m" and ds.y.attrs["units"] == "m"
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["source"] == name


def test_bom_day_cube(bom_cube):
    ds = open_cube(bom_cube)
    assert ds.sizes == {"time": 144, "y": 512, "x": 512}
    assert bool(ds.frame_valid.all())
    assert np.all(np.diff(ds.time.values) == np.timedelta64(10, "m"))
    assert ds["rain_rate"].encoding["chunks"] == (6, 256, 256)
    peak = float(ds.rain_rate.max())
    assert 50 < peak < 200  # the sample's documented maximum is ~92 mm/h
    assert ds["crs"].attrs["grid_mapping_name"] == "albers_conical_equal_area"


def test_latlon_option(tmp_path):
    cat = synthetic_catalog(n_frames=3)
    ds = open_cube(
        ingest(
            "synthetic",
            str(tmp_path),
            catalog=cat,
            scheduler="threads",
            progress=False,
            latlon=True,
        ).path
    )
    lat, lon = ds["lat"].values, ds["lon"].values
    assert lat.shape == (64, 64) and ds["lat"].attrs["units"] == "degrees_north"
    # LAEA centred at 52N 10E: the grid centre is there, north is up.
    assert abs(lat[31:33, 31:33].mean() - 52) < 0.05 and abs(lon[31:33, 31:33].mean() - 10) < 0.05
    assert lat[0, 32] > lat[-1, 32]


def test_the_estimate_counts_latlon_and_holds_the_cube(tmp_path, capsys):
    cat = synthetic_catalog(n_frames=12)
    kwargs = dict(catalog=cat, scheduler="threads", progress=False)
    plain = ingest("synthetic", str(tmp_path / "plain"), **kwargs)
    with_latlon = ingest("synthetic", str(tmp_path / "latlon"), latlon=True, **kwargs)
    ds = open_cube(with_latlon.path)
    assert (
        with_latlon.estimated_bytes - plain.estimated_bytes == ds["lat"].nbytes + ds["lon"].nbytes
    )
    announced = [line for line in capsys.readouterr().out.splitlines() if "estimated" in line]
    assert f"estimated {storage.format_bytes(with_latlon.estimated_bytes)} on" in announced[-1]
    for result in (plain, with_latlon):
        stored = sum(
            os.path.getsize(os.path.join(folder, name))
            for folder, _, names in os.walk(result.path)
            for name in names
        )
        assert stored <= result.estimated_bytes * DISK_SAFETY_FACTOR


# --- bad input -----------------------------------------------------------------------------


@pytest.fixture
def bom_copy(catalog, tmp_path) -> tuple[Catalog, list[Path]]:
    """Six BoM files copied into a writable directory, and a catalog pointing at them."""
    return _bom_copy(catalog, tmp_path, 6)


def _bom_copy(catalog, tmp_path, n_files: int) -> tuple[Catalog, list[Path]]:
    source = catalog["bom"]
    frames = list_frames(source)[48 : 48 + n_files]
    root = tmp_path / "bom"
    copies = []
    for frame in frames:
        rel = Path(frame.path).relative_to(source.resolved_root)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(frame.path, root / rel)
        copies.append(root / rel)
    entry = source.model_copy(
        update={
            "root_path": str(root),
            "start": frames[0].time.isoformat(),
            "end": frames[-1].time.isoformat(),
        }
    )
    return Catalog(sources={"bom": entry}), copies


def test_corrupt_empty_and_missing_files_are_reported(bom_copy, tmp_path):
    cat, files = bom_copy
    files[1].write_bytes(b"\x89HDF\r\n garbage that is not netCDF" * 10)  # corrupt
    files[2].write_bytes(b"")  # empty
    files[4].unlink()  # missing timestep
    result = ingest("bom", str(tmp_path / "out"), catalog=cat, scheduler="threads", progress=False)
    ds = open_cube(result.path)
    assert ds.sizes["time"] == 6
    assert ds.frame_valid.values.tolist() == [True, False, False, True, False, True]
    report = ingest_report(ds)
    assert sorted(Path(s["file"]).name for s in report["skipped"]) == sorted(
        [files[1].name, files[2].name]
    )
    assert len(report["missing_times"]) == 1
    assert np.isnan(ds.rain_rate.isel(time=[1, 2, 4]).values).all()
    assert np.isfinite(ds.rain_rate.isel(time=0).values).any()
    assert files[1].name in result.summary()


def test_strict_makes_corrupt_files_fatal(bom_copy, tmp_path):
    cat, files = bom_copy
    files[3].write_bytes(b"truncated")
    with pytest.raises(FrameReadError, match=files[3].name):
        ingest(
            "bom",
            str(tmp_path / "out"),
            catalog=cat,
            scheduler="threads",
            progress=False,
            strict=True,
        )
    assert not (tmp_path / "out" / "bom.zarr").exists()


def test_strict_names_every_unreadable_file_of_every_block(catalog, tmp_path):
    cat, files = _bom_copy(catalog, tmp_path, 13)  # three time chunks of the cube
    corrupt = [files[1], files[7], files[12]]
    for path in corrupt:
        path.write_bytes(b"truncated")
    with pytest.raises(FrameReadError, match=r"^3 unreadable file\(s\)") as raised:
        ingest("bom", str(tmp_path / "out"), catalog=cat, scheduler="threads", strict=True)
    assert all(path.name in str(raised.value) for path in corrupt)


def test_grid_mismatch_names_the_file(bom_copy, tmp_path):
    cat, files = bom_copy
    with xr.open_dataset(files[2]) as ds:
        smaller = ds.isel(y=slice(0, 256), x=slice(0, 256)).load()
    files[2].unlink()
    smaller.to_netcdf(files[2])
    with pytest.raises(GridMismatchError, match=files[2].name):
        ingest("bom", str(tmp_path / "out"), catalog=cat, scheduler="threads", progress=False)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {
                "importer": "no_such_importer",
                "timestep": 5,
                "root_path": "/x",
                "fn_pattern": "a",
                "fn_ext": "h5",
            },
            "importer",
        ),
        (
            {
                "importer": "knmi_hdf5",
                "timestep": -5,
                "root_path": "/x",
                "fn_pattern": "a",
                "fn_ext": "h5",
            },
            "timestep",
        ),
        ({"importer": "knmi_hdf5", "timestep": 5, "root_path": "/x", "fn_ext": "h5"}, "fn_pattern"),
        (
            {
                "importer": "knmi_hdf5",
                "timestep": 5,
                "root_path": "/x",
                "fn_pattern": "a",
                "fn_ext": "h5",
                "tmestep": 5,
            },
            "tmestep",
        ),
    ],
)
def test_bad_catalog_entry_names_source_and_field(tmp_path, entry, message):
    path = tmp_path / "catalog.yaml"
    path.write_text(json.dumps({"sources": {"myradar": entry}}))  # JSON is valid YAML
    with pytest.raises(ConfigError) as err:
        load_catalog(path)
    text = str(err.value)
    assert "myradar" in text and message in text and "\n" not in text


def test_unset_environment_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_ROOT", raising=False)
    source = SourceConfig(
        name="r",
        importer="knmi_hdf5",
        timestep=5,
        root_path="${NO_SUCH_ROOT}/a",
        fn_pattern="x",
        fn_ext="h5",
    )
    with pytest.raises(ConfigError, match="NO_SUCH_ROOT"):
        list_frames(source)


# --- atomicity, re-runs, append --------------------------------------------------------------


def test_rerun_is_a_noop_and_force_rebuilds(tmp_path, small_synthetic_catalog):
    kwargs = dict(catalog=small_synthetic_catalog, scheduler="threads", progress=False)
    first = ingest("synthetic", str(tmp_path), **kwargs)
    marker = Path(first.path) / "zarr.json"
    mtime = marker.stat().st_mtime_ns
    again = ingest("synthetic", str(tmp_path), **kwargs)
    assert again.up_to_date and marker.stat().st_mtime_ns == mtime
    rebuilt = ingest("synthetic", str(tmp_path), force=True, **kwargs)
    assert not rebuilt.up_to_date and marker.stat().st_mtime_ns != mtime


def test_failed_write_leaves_no_store(tmp_path, small_synthetic_catalog, monkeypatch):
    """A run that dies mid-write leaves only the resumable partial store, never a cube."""
    import nowcast.sources.ingest as ingest_module

    real_write = ingest_module.write_frames
    calls = []

    def write_then_die(path, start, frames):
        calls.append(start)
        if len(calls) > 2:
            raise RuntimeError("killed")
        real_write(path, start, frames)

    monkeypatch.setattr(ingest_module, "write_frames", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        ingest(
            "synthetic",
            str(tmp_path),
            catalog=small_synthetic_catalog,
            scheduler="threads",
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.zarr.partial"]


def test_killed_process_leaves_no_store_and_rerun_resumes(tmp_path):
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text(
        json.dumps(
            {
                "sources": {
                    "synthetic": {
                        "importer": "synthetic",
                        "timestep": 10,
                        "importer_kwargs": {"shape": [512, 512], "n_frames": 400, "seed": 3},
                    }
                }
            }
        )
    )
    out = tmp_path / "cubes"
    cmd = [
        sys.executable,
        "-m",
        "nowcast.cli",
        "ingest",
        "synthetic",
        "--cube-dir",
        str(out),
        "--catalog",
        str(catalog_file),
        "--scheduler",
        "threads",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = out / "synthetic.zarr.partial" / "blocks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(blocks.glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(blocks.glob("*.json"))) >= 2, "ingest never finished a block"
    assert not (out / "synthetic.zarr").exists()  # nothing that looks complete
    assert (out / "synthetic.zarr.lock").exists()  # the dead process's lock is stale

    cat = load_catalog(catalog_file)
    result = ingest("synthetic", str(out), catalog=cat, scheduler="threads", progress=False)
    assert result.n_read == 400
    assert 2 <= result.blocks_resumed < result.blocks_total == 67
    assert sorted(p.name for p in out.iterdir()) == ["synthetic.zarr"]  # partial and lock gone
    assert bool(open_cube(result.path).frame_valid.all())


def test_append_adds_new_times(tmp_path):
    full_cat = synthetic_catalog(n_frames=20)
    source = full_cat["synthetic"]
    frames = list_frames(source)
    kwargs = dict(catalog=full_cat, scheduler="threads", progress=False)
    ingest("synthetic", str(tmp_path / "a"), end=frames[11].time, **kwargs)
    appended = ingest("synthetic", str(tmp_path / "a"), append=True, **kwargs)
    reference = ingest("synthetic", str(tmp_path / "b"), **kwargs)
    a, b = open_cube(appended.path), open_cube(reference.path)
    assert a.sizes["time"] == 20
    np.testing.assert_array_equal(a.time.values, b.time.values)
    xr.testing.assert_equal(a.rain_rate.load(), b.rain_rate.load())
    assert "nowcast ingest" in a.attrs["history"]
    assert ingest("synthetic", str(tmp_path / "a"), append=True, **kwargs).up_to_date


def _gappy_catalog(n_frames: int = 40, max_gap: int = 60) -> Catalog:
    """Synthetic source, 10-min step: 00:30 missing (short gap), 02:00-03:50 missing (120 min,
    longer than ``max_gap``)."""
    long_gap = [f"2000-01-01T{h:02d}:{m:02d}" for h in (2, 3) for m in range(0, 60, 10)]
    cat = synthetic_catalog(n_frames=n_frames, drop_times=["2000-01-01T00:30", *long_gap])
    source = cat["synthetic"].model_copy(update={"max_gap_minutes": max_gap})
    return Catalog(sources={"synthetic": source})


def test_long_gap_splits_the_cube_into_segments(tmp_path):
    kwargs = dict(catalog=_gappy_catalog(), scheduler="threads", progress=False)
    result = ingest("synthetic", str(tmp_path), **kwargs)
    ds = open_cube(result.path)
    assert ds.sizes["time"] == 28 and result.n_segments == 2  # the 12 missing frames are gone
    assert ds["segment"].dtype == np.int32 and "long_name" in ds["segment"].attrs
    assert ds["segment"].values.tolist() == [0] * 12 + [1] * 16
    assert json.loads(ds.attrs["segments"]) == [
        {"start": "2000-01-01T00:00:00", "end": "2000-01-01T01:50:00", "n_frames": 12},
        {"start": "2000-01-01T04:00:00", "end": "2000-01-01T06:30:00", "n_frames": 16},
    ]
    assert ds.attrs["max_gap_minutes"] == 60
    steps = np.diff(ds.time.values)
    assert set(steps[ds.segment.values[1:] == ds.segment.values[:-1]]) == {np.timedelta64(10, "m")}
    assert steps[11] > np.timedelta64(60, "m")
    # the short gap stays a NaN frame inside its segment
    assert ds.frame_valid.values.tolist() == [True] * 3 + [False] + [True] * 24
    assert np.isnan(ds.rain_rate.isel(time=3).values).all()
    # with a larger max_gap the same data is one segment with 12 NaN frames
    one = ingest(
        "synthetic", str(tmp_path / "one"), **{**kwargs, "catalog": _gappy_catalog(max_gap=120)}
    )
    assert open_cube(one.path).sizes["time"] == 40 and one.n_segments == 1


def test_append_across_a_long_gap_starts_a_new_segment(tmp_path):
    cat = _gappy_catalog()
    frames = list_frames(cat["synthetic"])
    kwargs = dict(catalog=cat, scheduler="threads", progress=False)
    ingest("synthetic", str(tmp_path / "a"), end=frames[11].time, **kwargs)  # up to 01:50
    appended = ingest("synthetic", str(tmp_path / "a"), append=True, **kwargs)
    reference = ingest("synthetic", str(tmp_path / "b"), **kwargs)
    a, b = open_cube(appended.path), open_cube(reference.path)
    np.testing.assert_array_equal(a.time.values, b.time.values)
    np.testing.assert_array_equal(a.segment.values, b.segment.values)
    np.testing.assert_array_equal(a.frame_valid.values, b.frame_valid.values)
    np.testing.assert_array_equal(a.rain_rate.values, b.rain_rate.values)
    assert a.attrs["segments"] == b.attrs["segments"]
    assert len(ingest_report(a)["missing_times"]) == 1


def test_append_across_a_short_gap_fills_nan_frames(tmp_path):
    cat = _gappy_catalog(max_gap=120)
    frames = list_frames(cat["synthetic"])
    kwargs = dict(catalog=cat, scheduler="threads", progress=False)
    first = ingest("synthetic", str(tmp_path), end=frames[8].time, **kwargs)  # 9 frames
    old_chunk = Path(first.path) / "rain_rate" / "c" / "0" / "0" / "0"
    old_inode = old_chunk.stat().st_ino
    appended = ingest("synthetic", str(tmp_path), append=True, **kwargs)
    ds = open_cube(appended.path)
    assert ds.sizes["time"] == 40 and appended.n_segments == 1
    assert not ds.frame_valid.values[12:24].any() and ds.frame_valid.values[24:].all()
    # the old cube's complete time chunk was linked, not rewritten
    assert (Path(appended.path) / "rain_rate" / "c" / "0" / "0" / "0").stat().st_ino == old_inode
    reference = ingest("synthetic", str(tmp_path / "ref"), **kwargs)
    np.testing.assert_array_equal(ds.rain_rate.values, open_cube(reference.path).rain_rate.values)


def test_fsspec_url_store(small_synthetic_catalog):
    url = "memory://nowcast-test/cubes"
    result = ingest(
        "synthetic", url, catalog=small_synthetic_catalog, scheduler="threads", progress=False
    )
    assert result.path.startswith("memory://")
    assert open_cube(result.path).sizes["time"] == 30
    storage.remove(url)


# --- synthetic source ------------------------------------------------------------------------


def test_synthetic_is_deterministic(tmp_path):
    cat = synthetic_catalog(n_frames=8, drop_times=["2000-01-01T00:30"])
    kwargs = dict(catalog=cat, scheduler="threads", progress=False)
    a = open_cube(ingest("synthetic", str(tmp_path / "a"), **kwargs).path)
    b = open_cube(ingest("synthetic", str(tmp_path / "b"), **kwargs).path)
    xr.testing.assert_identical(a.rain_rate.load(), b.rain_rate.load())
    assert a.frame_valid.values.tolist() == [True, True, True, False, True, True, True, True]
    other_seed = synthetic_frame(
        pd.Timestamp("2000-01-01T01:00"), SyntheticParams(shape=(64, 64), seed=2), 10
    )
    assert not np.array_equal(other_seed, a.rain_rate.sel(time="2000-01-01T01:00").values)


def test_synthetic_motion_is_recovered_by_pysteps(tmp_path):
    from pysteps.motion.lucaskanade import dense_lucaskanade

    params = SyntheticParams(shape=(128, 128), motion=(2.0, -1.0), seed=4, n_cells=16)
    frames = np.stack(
        [
            synthetic_frame(pd.Timestamp("2000-01-01") + pd.Timedelta(minutes=10 * k), params, 10)
            for k in range(3)
        ]
    )
    frames = np.nan_to_num(frames)
    velocity = dense_lucaskanade(frames, verbose=False)
    wet = frames[-1] > 1
    # pysteps' V is (u, v) in pixels per step with v positive down the array (rows). LK's
    # interpolated field is smoothed, so it only recovers the motion approximately...
    assert abs(np.median(velocity[0][wet]) - 2.0) < 0.5
    assert abs(np.median(velocity[1][wet]) - (-1.0)) < 0.5
    # ...but advecting with the known motion reproduces the next frame far better than stillness.
    from pysteps.extrapolation.semilagrangian import extrapolate

    known = np.stack([np.full(frames[0].shape, 2.0), np.full(frames[0].shape, -1.0)])
    error_known = np.nanmean((extrapolate(frames[1], known, 1)[0] - frames[2]) ** 2)
    error_still = np.mean((frames[1] - frames[2]) ** 2)
    assert error_known < 0.5 * error_still  # the rest is growth and decay


def test_cube_rejects_foreign_store(tmp_path):
    xr.Dataset({"a": ("t", [1, 2])}).to_zarr(tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="not a nowcast cube"):
        open_cube(str(tmp_path / "x.zarr"))
    with pytest.raises(ConfigError, match="nowcast ingest"):
        open_cube(str(tmp_path / "missing.zarr"))


def test_environment_root_is_used(catalog, data_root):
    assert catalog["bom"].resolved_root.startswith(os.environ["NOWCAST_DATA_ROOT"])


def test_local_cluster_leaves_thread_settings_alone(monkeypatch):
    from nowcast.parallel import dask_client

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with dask_client(n_workers=1) as client:
        assert client.run(lambda: os.environ.get("OMP_NUM_THREADS"))  # workers: one thread
    assert "OMP_NUM_THREADS" not in os.environ  # this process (training) keeps its threads
