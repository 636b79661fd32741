"""Window rules (nowcast.windows): timeline, segments, splits, listing, thinning, valid times."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from nowcast import windows
from nowcast.config import ConfigError


def _cube(times, valid=None, segment=None, step=10) -> xr.Dataset:
    times = pd.DatetimeIndex(times)
    data = {"frame_valid": ("time", np.ones(len(times), bool) if valid is None else valid)}
    if segment is not None:
        data["segment"] = ("time", np.asarray(segment, np.int32))
    return xr.Dataset(data, coords={"time": times}, attrs={"timestep_minutes": step})


def _two_segments():
    """Two 12-frame segments at 10 min, 10 hours apart (a long gap that ingest did not store)."""
    first = pd.date_range("2021-06-01T00:00", periods=12, freq="10min")
    second = pd.date_range("2021-06-01T12:00", periods=12, freq="10min")
    return _cube(first.append(second), segment=[0] * 12 + [1] * 12)


def test_no_window_crosses_a_segment_boundary():
    timeline = windows.Timeline.from_cube("s", "s.zarr", _two_segments())
    labels = np.full(len(timeline), "train", dtype=object)
    table = windows.list_windows(timeline, labels, 3, 3)
    # 12 frames per segment -> 7 windows of 6 frames each; none starting in 6..11 of segment 0.
    assert len(table) == 14
    assert set(table["segment"]) == {0, 1}
    last_frame = table["start"].to_numpy() + 5
    assert (timeline.segment[table["start"]] == timeline.segment[last_frame]).all()
    span = (table["reference_time"] - table["start_time"]).unique()
    assert list(span) == [pd.Timedelta(minutes=20)]


def test_a_segment_boundary_is_respected_without_a_segment_variable():
    """Old cubes have no ``segment``; an irregular jump in time still ends a window."""
    cube = _two_segments().drop_vars("segment")
    timeline = windows.Timeline.from_cube("s", "s.zarr", cube)
    assert (timeline.segment == 0).all()
    labels = np.full(len(timeline), "train", dtype=object)
    starts = windows.valid_starts(timeline, labels, 6)
    assert len(starts) == 14 and not np.isin(np.arange(7, 12), starts).any()


def test_invalid_frames_and_split_changes_end_windows():
    times = pd.date_range("2021-06-01", periods=10, freq="10min")
    valid = np.ones(10, bool)
    valid[4] = False
    timeline = windows.Timeline.from_cube("s", "s.zarr", _cube(times, valid))
    labels = np.array(["train"] * 8 + ["val"] * 2, dtype=object)
    starts = windows.valid_starts(timeline, labels, 3)
    # Windows containing frame 4 (starts 2, 3, 4) and those mixing train and val (6, 7) are out.
    assert starts.tolist() == [0, 1, 5]


def test_resampled_timeline_is_clock_aligned_per_segment():
    first = pd.date_range("2021-06-01T00:05", periods=12, freq="5min")  # 00:05 .. 01:00
    second = pd.date_range("2021-06-02T03:10", periods=12, freq="5min")  # 03:10 .. 04:05
    cube = _cube(first.append(second), segment=[0] * 12 + [1] * 12, step=5)
    timeline = windows.Timeline.from_cube("s", "s.zarr", cube, resample_minutes=30)
    assert timeline.timestep == 30 and timeline.step == 6
    assert [t.strftime("%H:%M") for t in pd.DatetimeIndex(timeline.times)] == [
        "00:30",
        "01:00",
        "03:30",
        "04:00",
    ]
    assert timeline.cube_slice(0, 2) == slice(5, 12, 6)
    with pytest.raises(ConfigError, match="not a multiple"):
        windows.Timeline.from_cube("s", "s.zarr", cube, resample_minutes=12)


def test_valid_time_arithmetic():
    reference = np.datetime64("2021-06-01T01:00")
    inputs = windows.input_times(reference, 3, 10)
    leads = windows.valid_times(reference, 2, 10)
    assert pd.DatetimeIndex(inputs).strftime("%H:%M").tolist() == ["00:40", "00:50", "01:00"]
    assert pd.DatetimeIndex(leads).strftime("%H:%M").tolist() == ["01:10", "01:20"]
    starts = np.array(["2021-06-01T00:00"], dtype="datetime64[ns]")
    assert windows.reference_times(starts, 6, 5)[0] == np.datetime64("2021-06-01T00:25")


def test_fraction_labels_buffer_and_blocks_break_at_segments():
    timeline = windows.Timeline.from_cube("s", "s.zarr", _two_segments())
    labels = windows.labels_by_fraction(
        len(timeline), {"train": 0.5, "test": 0.5}, ["train", "test"], 1
    )
    assert labels.tolist() == ["train"] * 12 + ["test"] * 12
    carved = windows.carve_buffer(timeline.times, labels, 30)
    # The segments are 10 h apart: nothing is within 30 min of the other split.
    assert (carved == labels).all()
    blocks = windows.label_blocks(
        timeline.times, np.array(["train"] * 24, dtype=object), timeline.segment
    )
    assert [b["end"] for b in blocks] == ["2021-06-01T01:50:00", "2021-06-01T13:50:00"]


def test_thinning():
    times = np.arange(10)
    assert windows.select_windows(times, 3, None).tolist() == [0, 3, 6, 9]
    assert windows.select_windows(times, 1, 3).tolist() == [0, 4, 9]
    reference = pd.to_datetime(
        ["2021-06-01T00:00", "2021-06-01T00:10", "2021-06-01T00:30", "2021-06-01T02:00"]
    )
    assert windows.on_time_grid(reference.to_numpy(), 30).tolist() == [True, False, True, True]


def test_cube_time_indices_name_missing_times_and_segments():
    cube = _two_segments()
    indices = windows.cube_time_indices(cube, windows.input_times("2021-06-01T00:30", 3, 10))
    assert indices.tolist() == [1, 2, 3]
    with pytest.raises(ConfigError, match="2021-06-01T02:00:00 are not in the cube"):
        windows.cube_time_indices(cube, windows.input_times("2021-06-01T02:00", 2, 10))
    glued = cube.assign_coords(
        time=pd.date_range("2021-06-01", periods=24, freq="10min")
    )  # regular times but two segments: a window may still not join them
    with pytest.raises(ConfigError, match="cross segments"):
        windows.cube_time_indices(glued, glued["time"].values[10:14])


def test_frame_counts_need_one_timestep():
    a = windows.Timeline.from_cube("a", "a", _cube(pd.date_range("2021", periods=4, freq="10min")))
    b = windows.Timeline.from_cube(
        "b", "b", _cube(pd.date_range("2021", periods=4, freq="5min"), step=5)
    )
    assert windows.frame_counts([a], None, 3) == (6, 3)
    with pytest.raises(ConfigError, match="different timesteps"):
        windows.frame_counts([a, b], None, None)
