"""File patterns with pysteps wildcards, discovery, and the segment rule of the time axis."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from nowcast.config import ConfigError
from nowcast.sources.catalog import (
    Catalog,
    SourceConfig,
    discover_files,
    frame_path,
    list_frames,
    plan_frames,
)
from nowcast.sources.cube import open_cube
from nowcast.sources.ingest import ingest

T0 = datetime(2016, 7, 11, 12, 0)


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"fake")
    return path


@pytest.fixture
def mch(tmp_path, monkeypatch) -> SourceConfig:
    """pysteps' own ``mch`` entry of its pystepsrc, unchanged (``?`` in fn_pattern), with
    small fake files under ./radar/mch of a temporary working directory."""
    import pysteps

    entry = pysteps.rcparams.data_sources["mch"]
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "radar" / "mch" / "20160711"
    for minute, flag in [(0, "V"), (5, "V"), (15, "V"), (20, "W"), (20, "V")]:
        time = T0 + timedelta(minutes=minute)
        _touch(root / f"AQC{time:%y%j%H%M}{flag}_00005.801.gif")
    _touch(root / f"AQC{T0 + timedelta(minutes=25):%y%j%H%M}_00005.801.gif")  # no wildcard char
    _touch(root / "README.txt")
    return SourceConfig(name="mch", **dict(entry))


def test_pystepsrc_entry_with_wildcard_is_discovered(mch):
    with pytest.warns(UserWarning, match=r"2 files match 2016-07-11T12:20:00.*W_00005") as rec:
        found = discover_files(mch)
    assert [t.minute for t in found] == [0, 5, 15, 20]
    # Two files match 12:20: the first in sorted order is taken, and the warning names both.
    assert Path(found[T0 + timedelta(minutes=20)]).name == "AQC161931220V_00005.801.gif"
    assert "AQC161931220W_00005.801.gif" in str(rec[0].message)


def test_wildcard_frame_paths_match_pysteps_find_by_date(mch):
    from pysteps.io.archive import find_by_date

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = plan_frames(mch).frames
    assert [f.time.minute for f in frames] == [0, 5, 10, 15, 20]
    for frame in frames:
        if frame.time.minute == 10:  # no file: pysteps finds nothing either
            assert not Path(frame.path).exists()
            with pytest.raises(OSError):
                find_by_date(frame.time, *_archive(mch), silent=True)
            continue
        (expected,), _ = find_by_date(frame.time, *_archive(mch), silent=True)
        if frame.time.minute != 20:  # at 12:20 pysteps takes os.listdir's first, we sort
            assert Path(frame.path).samefile(expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert Path(frame_path(mch, frame.time)).samefile(frame.path)
    assert not Path(frame_path(mch, T0 + timedelta(minutes=10))).exists()


def _archive(source: SourceConfig) -> tuple:
    return source.root_path, source.path_fmt, source.fn_pattern, source.fn_ext, source.timestep


def test_star_wildcard_and_unsupported_directive(tmp_path):
    for minute in (0, 5, 10):
        time = T0 + timedelta(minutes=minute)
        _touch(tmp_path / f"{time:%Y}" / f"radar_{time:%Y%m%d%H%M}_v{minute}_final.h5")
    source = SourceConfig(
        name="star",
        importer="knmi_hdf5",
        timestep=5,
        root_path=str(tmp_path),
        path_fmt="%Y",
        fn_pattern="radar_%Y%m%d%H%M_*_final",
        fn_ext="h5",
    )
    assert [t.minute for t in discover_files(source)] == [0, 5, 10]
    assert frame_path(source, T0 + timedelta(minutes=5)).endswith("_v5_final.h5")
    bad = source.model_copy(update={"fn_pattern": "radar_%Y%b%d%H%M"})
    with pytest.raises(ConfigError, match="%b"):
        discover_files(bad)


def _event_files(root: Path, start: datetime, n: int, step: int = 5) -> list[datetime]:
    times = [start + timedelta(minutes=step * k) for k in range(n)]
    for t in times:
        _touch(root / f"{t:%Y%m%d}" / f"R_{t:%Y%m%d%H%M}.h5")
    return times


def _source(root: Path, **update) -> SourceConfig:
    entry = dict(
        name="events",
        importer="knmi_hdf5",
        timestep=5,
        root_path=str(root),
        path_fmt="%Y%m%d",
        fn_pattern="R_%Y%m%d%H%M",
        fn_ext="h5",
    )
    return SourceConfig(**{**entry, **update})


def test_events_far_apart_are_separate_segments(tmp_path):
    starts = [datetime(2019, 1, 1, 6), datetime(2020, 9, 1, 6), datetime(2022, 5, 1, 6)]
    for start in starts:
        _event_files(tmp_path, start, 4)
    _touch(tmp_path / "20190101" / "R_201901010620.h5").unlink()  # a short gap in event 1
    _touch(tmp_path / "20190101" / "R_201901010625.h5")
    plan = plan_frames(_source(tmp_path))
    # 3 short segments, not the ~360 000 slots of one regular axis over 40 months
    assert len(plan.frames) == 14 and plan.n_segments == 3
    assert plan.segment.tolist() == [0] * 6 + [1] * 4 + [2] * 4
    assert plan.present.tolist() == [True] * 4 + [False, True] + [True] * 8
    assert [plan.frames[i].time for i in (0, 6, 10)] == starts


def test_explicit_range_drops_long_runs_and_keeps_short_ones(tmp_path):
    _event_files(tmp_path, datetime(2020, 1, 1, 1, 0), 3)  # 01:00-01:10
    _event_files(tmp_path, datetime(2020, 1, 1, 9, 0), 3)  # 09:00-09:10, 7h50 later
    source = _source(tmp_path, max_gap_minutes=60)
    plan = plan_frames(source, datetime(2020, 1, 1, 0, 30), datetime(2020, 1, 1, 12, 0))
    times = [f.time for f in plan.frames]
    # leading 30 min kept as gaps; the 7h50 run and the trailing 2h50 are not stored
    assert times[0] == datetime(2020, 1, 1, 0, 30) and times[-1] == datetime(2020, 1, 1, 9, 10)
    assert plan.segment.tolist() == [0] * 9 + [1] * 3
    assert not plan.present[:6].any() and plan.present[6:].all()
    # a missing run of 7h45 (465 min) stays inside a segment when max_gap is 465, not 460
    assert plan_frames(source.model_copy(update={"max_gap_minutes": 465})).n_segments == 1
    assert plan_frames(source.model_copy(update={"max_gap_minutes": 460})).n_segments == 2
    # list_frames keeps its one regular axis (predict, data use it)
    assert len(list_frames(source)) == 99


@pytest.mark.realdata
def test_wildcard_pattern_ingests_real_files(catalog, tmp_path):
    source = catalog["fmi_2016"]
    start = datetime(2016, 9, 28, 16, 0)
    ranged = dict(start=start.isoformat(), end=(start + timedelta(minutes=15)).isoformat())
    plain = source.model_copy(update=ranged)
    wild = source.model_copy(
        update={**ranged, "fn_pattern": source.fn_pattern.replace("SUOMI1", "SUOM?1")}
    )
    assert "?" in wild.fn_pattern
    kw = dict(scheduler="threads", progress=False)
    a = ingest("fmi_2016", str(tmp_path / "a"), catalog=Catalog(sources={"fmi_2016": plain}), **kw)
    b = ingest("fmi_2016", str(tmp_path / "b"), catalog=Catalog(sources={"fmi_2016": wild}), **kw)
    assert b.n_read == 4 and not b.missing_times
    ds_a, ds_b = open_cube(a.path), open_cube(b.path)
    xr.testing.assert_identical(ds_a.rain_rate.load(), ds_b.rain_rate.load())
    assert np.all(ds_b.frame_valid.values)


def test_data_root_defaults_to_the_makefile_folder_in_a_checkout(monkeypatch):
    """Without NOWCAST_DATA_ROOT, `nowcast ingest bom` finds the data where `make data` puts it."""
    from nowcast.config import default_data_root, expand_env
    from nowcast.sources.catalog import load_catalog

    monkeypatch.delenv("NOWCAST_DATA_ROOT", raising=False)
    checkout = Path(__file__).resolve().parent.parent
    expected = checkout.parent / "shared" / "data" / "pysteps-data"  # the Makefile's default
    assert default_data_root() == expected
    assert expand_env("${NOWCAST_DATA_ROOT}/radar/bom") == f"{expected}/radar/bom"
    assert load_catalog()["bom"].resolved_root == f"{expected}/radar/bom"
    # Other variables without a default are still an error naming the variable.
    monkeypatch.delenv("NOWCAST_NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(ConfigError, match="NOWCAST_NO_SUCH_VARIABLE is not set"):
        expand_env("${NOWCAST_NO_SUCH_VARIABLE}/x")


def test_missing_files_say_which_command_fetches_the_data(tmp_path):
    from nowcast.sources.catalog import load_catalog, plan_frames

    update = {"root_path": str(tmp_path), "start": None, "end": None}
    source = load_catalog()["bom"].model_copy(update=update)
    with pytest.raises(ConfigError, match="run `nowcast data`"):
        plan_frames(source)
    # A source with a fixed time range (as the sample sources have): ingest names a path too.
    from nowcast.sources.catalog import list_frames
    from nowcast.sources.frames import source_grid

    ranged = load_catalog()["bom"].model_copy(update={"root_path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"none exists, e\.g\. .*run `nowcast data`"):
        source_grid(ranged, list_frames(ranged))
