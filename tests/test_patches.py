"""Patch store builder (nowcast.patches) and normalization transforms
(nowcast.patches.normalization)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import bom_experiment
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nowcast import storage
from nowcast.config import ConfigError, ExperimentConfig
from nowcast.patches import build as patches
from nowcast.patches.build import build_patches
from nowcast.patches.normalization import Normalization, get_method
from nowcast.patches.reader import PatchStore, open_patch_store
from nowcast.sources.catalog import Catalog, SourceConfig
from nowcast.sources.cube import open_cube, write_cube
from nowcast.sources.ingest import ingest
from nowcast.storage import DiskWriteError, StoreLockedError
from nowcast.windows import carve_buffer, default_frame_counts, labels_by_fraction

GAP_TIME = "2000-01-01T02:00"
STEP = np.timedelta64(10, "m")


def _catalog() -> Catalog:
    source = SourceConfig(
        name="synthetic",
        importer="synthetic",
        timestep=10,
        importer_kwargs={"shape": [64, 64], "n_frames": 40, "seed": 3, "drop_times": [GAP_TIME]},
    )
    return Catalog(sources={"synthetic": source})


def _experiment(cube_dir, patch_dir, name="syn", **overrides) -> ExperimentConfig:
    section = {
        "n_input_frames": 3,
        "n_target_frames": 3,
        "patch_size": 32,
        "stride": 16,
        "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25},
        "buffer_minutes": 20,
        "min_wet_fraction": 0.2,
        "dry_share": 0.2,
    }
    section.update(overrides)
    return ExperimentConfig(
        name=name,
        sources=["synthetic"],
        cube_dir=str(cube_dir),
        patch_dir=str(patch_dir),
        patches=section,
    )


@pytest.fixture(scope="module")
def cube_dir(tmp_path_factory):
    """40 frames of 64 x 64 synthetic rain with one missing frame (a gap) at 02:00."""
    cube_dir = tmp_path_factory.mktemp("cubes")
    ingest("synthetic", str(cube_dir), catalog=_catalog(), scheduler="threads", progress=False)
    return cube_dir


@pytest.fixture(scope="module")
def store(cube_dir, tmp_path_factory):
    experiment = _experiment(cube_dir, tmp_path_factory.mktemp("patches"))
    return build_patches(experiment, scheduler="threads", progress=False)


def _window_frames(start_times: np.ndarray, n_frames: int) -> np.ndarray:
    """Frame times (window, frame) of windows starting at ``start_times``."""
    return start_times[:, None] + np.arange(n_frames)[None, :] * STEP


def _cube_index(ds, cube) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: index of its first frame in the cube, and its y0, x0."""
    times = {t: i for i, t in enumerate(cube["time"].values)}
    first = np.array([times[t] for t in ds["start_time"].values])
    return first, ds["y0"].values, ds["x0"].values


def _cut(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """inputs, targets, input_mask, target_mask of every sample, cut from the store."""
    store = PatchStore.open(path)
    values, valid = store.cut(np.arange(len(store)))
    n = store.n_input_frames
    return values[:, :n], values[:, n:], valid[:, :n], valid[:, n:]


def _blocks(ds) -> list[tuple[str, np.datetime64, np.datetime64]]:
    blocks = json.loads(ds.attrs["splits"])["blocks"]["synthetic"]
    return [(b["split"], np.datetime64(b["start"]), np.datetime64(b["end"])) for b in blocks]


# --------------------------------------------------------------------------------------------
# windows and splits


def test_no_window_crosses_a_gap(store, cube_dir):
    ds = open_patch_store(store)
    cube = open_cube(f"{cube_dir}/synthetic.zarr")
    valid_times = set(cube["time"].values[cube["frame_valid"].values])
    frames = _window_frames(ds["window_start_time"].values, 6)
    assert np.datetime64(GAP_TIME) not in valid_times
    assert all(time in valid_times for time in frames.ravel())
    # The gap splits the train block, but windows survive on both sides of it.
    train = frames[ds["window_split"].values == "train"]
    assert (train[:, -1] < np.datetime64(GAP_TIME)).any()
    assert (train[:, 0] > np.datetime64(GAP_TIME)).any()
    # Every sample comes from a listed window of its own split.
    listed = set(
        zip(ds["window_start_time"].values, ds["window_split"].values.astype(object), strict=True)
    )
    for start, split in zip(
        ds["start_time"].values, ds["split"].values.astype(object), strict=True
    ):
        assert (start, split) in listed


def test_splits_are_separated_by_the_buffer(store):
    ds = open_patch_store(store)
    buffer = np.timedelta64(20, "m")
    frames = _window_frames(ds["window_start_time"].values, 6)
    splits = ds["window_split"].values.astype(object)
    assert set(splits) == {"train", "val", "test"}
    for i in range(len(splits)):
        for j in range(len(splits)):
            if splits[i] != splits[j]:
                gap = max(frames[j, 0] - frames[i, -1], frames[i, 0] - frames[j, -1])
                assert gap >= buffer, (splits[i], frames[i, 0], splits[j], frames[j, 0])
    # Windows lie inside the recorded blocks of their split.
    for split, start, end in zip(splits, frames[:, 0], frames[:, -1], strict=True):
        assert any(s == split and b0 <= start and end <= b1 for s, b0, b1 in _blocks(ds))
    # Time order of the fraction blocks: train, then val, then test.
    assert [b[0] for b in _blocks(ds)] == ["train", "val", "test"]


def test_reference_time_is_the_last_input_frame(store):
    ds = open_patch_store(store)
    np.testing.assert_array_equal(
        ds["reference_time"].values - ds["start_time"].values, np.full(ds.sizes["sample"], 2 * STEP)
    )
    np.testing.assert_array_equal(
        ds["window_reference_time"].values - ds["window_start_time"].values,
        np.full(ds.sizes["window"], 2 * STEP),
    )
    assert ds["input_time"].values[-1] == np.timedelta64(0)
    assert ds["target_time"].values[0] == STEP


def test_split_labels_from_fractions_and_pattern():
    labels = labels_by_fraction(
        40, {"train": 0.5, "val": 0.25, "test": 0.25}, ["train", "val", "train", "test"], 2
    )
    runs = [labels[0]] + [labels[i] for i in range(1, 40) if labels[i] != labels[i - 1]]
    assert runs == ["train", "val", "train", "test"] * 2
    values, counts = np.unique(labels.astype(str), return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == {
        "train": 20,
        "val": 10,
        "test": 10,
    }


def test_default_frame_counts_are_one_hour_each():
    assert default_frame_counts(10) == (6, 6)
    assert default_frame_counts(5) == (12, 12)
    with pytest.raises(ConfigError, match="7-minute"):
        default_frame_counts(7)


def test_buffer_is_taken_from_the_lower_priority_split():
    times = np.datetime64("2020-01-01T00:00") + np.arange(12) * STEP
    labels = np.array(["train"] * 4 + ["test"] * 4 + ["val"] * 4, dtype=object)
    carved = carve_buffer(times, labels, 20)
    # test keeps all its frames; train and val lose the frames within < 20 min of it.
    assert list(carved) == ["train"] * 3 + [""] + ["test"] * 4 + [""] + ["val"] * 3


def test_explicit_split_times_with_rest_as_train(cube_dir, tmp_path):
    experiment = _experiment(
        cube_dir,
        tmp_path,
        split_times={
            "test": [{"start": "2000-01-01T00:00", "end": "2000-01-01T01:10"}],
            "val": [{"start": "2000-01-01T05:00", "end": "2000-01-01T06:30"}],
        },
    )
    ds = open_patch_store(build_patches(experiment, scheduler="threads", progress=False))
    blocks = _blocks(ds)
    assert blocks[0] == (
        "test",
        np.datetime64("2000-01-01T00:00"),
        np.datetime64("2000-01-01T01:10"),
    )
    assert blocks[-1] == (
        "val",
        np.datetime64("2000-01-01T05:00"),
        np.datetime64("2000-01-01T06:30"),
    )
    assert {b[0] for b in blocks[1:-1]} == {"train"}
    in_test = ds["window_split"].values == "test"
    test_frames = _window_frames(ds["window_start_time"].values[in_test], 6)
    assert test_frames.max() <= np.datetime64("2000-01-01T01:10")


def test_resampling_to_a_common_step(cube_dir, tmp_path):
    experiment = _experiment(
        cube_dir, tmp_path, n_input_frames=2, n_target_frames=2, resample_minutes=20,
        buffer_minutes=0,
    )  # fmt: skip
    ds = open_patch_store(build_patches(experiment, scheduler="threads", progress=False))
    assert ds.attrs["timestep_minutes"] == 20
    minutes = ds["window_start_time"].values.astype("datetime64[m]").astype(np.int64)
    assert (minutes % 20 == 0).all()
    np.testing.assert_array_equal(ds["target_time"].values, np.arange(1, 3) * STEP * 2)
    np.testing.assert_array_equal(
        ds["reference_time"].values - ds["start_time"].values, np.full(ds.sizes["sample"], 2 * STEP)
    )

    with pytest.raises(ConfigError, match="resample_minutes=15"):
        build_patches(_experiment(cube_dir, tmp_path, resample_minutes=15), scheduler="threads")


# --------------------------------------------------------------------------------------------
# patches


def test_store_schema_masks_and_no_nan(store, cube_dir):
    ds = open_patch_store(store)
    assert ds.attrs["store_schema_version"] == 2
    assert ds["input_time"].shape == (3,) and ds["target_time"].shape == (3,)
    group = zarr.open_group(store, mode="r")
    frames = group["frames/synthetic/frames"]
    assert frames.dtype == np.float16 and frames.shape[1:] == (64, 64)
    assert group["frames/synthetic/time"].shape == frames.shape[:1]
    for key in ("normalization", "splits", "cube_paths", "source_crs", "config"):
        json.loads(ds.attrs[key])
    assert json.loads(ds.attrs["cube_paths"]) == {"synthetic": f"{cube_dir}/synthetic.zarr"}
    assert "PROJCRS" in json.loads(ds.attrs["source_crs"])["synthetic"]
    assert ds.attrs["Conventions"] == "CF-1.8"

    cube = open_cube(f"{cube_dir}/synthetic.zarr")
    inputs, targets, input_mask, target_mask = _cut(store)
    assert inputs.shape[1:] == (3, 32, 32) and targets.shape[1:] == (3, 32, 32)
    assert np.isfinite(inputs).all() and np.isfinite(targets).all()
    # Masks mark exactly the cube's no-data pixels (outside the synthetic radar range), and
    # the values there are 0.
    rain = cube["rain_rate"].values
    for k, (t0, y0, x0) in enumerate(zip(*_cube_index(ds, cube), strict=True)):
        window = rain[t0 : t0 + 6, y0 : y0 + 32, x0 : x0 + 32]
        mask = np.concatenate([input_mask[k], target_mask[k]])
        values = np.concatenate([inputs[k], targets[k]])
        np.testing.assert_array_equal(mask, np.isfinite(window))
        assert (values[~mask] == 0).all()
    assert not input_mask.all()  # corners outside the radar range are no-data


def test_wet_fraction_and_dry_share(store, cube_dir):
    ds = open_patch_store(store)
    cube = open_cube(f"{cube_dir}/synthetic.zarr")
    rain = cube["rain_rate"].values
    wet_fraction = ds["wet_fraction"].values
    # The recorded wet fraction is the share of target pixels >= 0.5 mm/h.
    for k, (t0, y0, x0) in enumerate(zip(*_cube_index(ds, cube), strict=True)):
        target = rain[t0 + 3 : t0 + 6, y0 : y0 + 32, x0 : x0 + 32]
        assert wet_fraction[k] == pytest.approx(np.mean(target >= 0.5), abs=1e-6)
    # Per split: every wet candidate is kept, and dry patches are 20 % of the kept ones (as
    # far as there are dry candidates).
    n_positions = 3 * 3
    for split in ("train", "val", "test"):
        in_split = ds["split"].values == split
        wet = int((ds["wet_fraction"].values[in_split] >= 0.2).sum())
        dry = int(in_split.sum()) - wet
        n_windows = int((ds["window_split"].values == split).sum())
        dry_candidates = n_windows * n_positions - wet
        assert dry == min(round(wet * 0.2 / 0.8), dry_candidates), split


def test_dry_patch_draw_is_seeded(cube_dir, tmp_path):
    first = open_patch_store(
        build_patches(_experiment(cube_dir, tmp_path / "a"), scheduler="threads", progress=False)
    )
    again = open_patch_store(
        build_patches(_experiment(cube_dir, tmp_path / "b"), scheduler="threads", progress=False)
    )
    other = open_patch_store(
        build_patches(
            _experiment(cube_dir, tmp_path / "c", seed=1), scheduler="threads", progress=False
        )
    )

    def keys(ds):
        return list(zip(ds["start_time"].values, ds["y0"].values, ds["x0"].values, strict=True))

    assert keys(first) == keys(again)
    assert keys(first) != keys(other)


# --------------------------------------------------------------------------------------------
# normalization


def _train_frame_values(store_ds, cube) -> np.ndarray:
    train_starts = store_ds["window_start_time"].values[store_ds["window_split"].values == "train"]
    frame_times = np.unique(_window_frames(train_starts, 6))
    return cube["rain_rate"].sel(time=frame_times).values


def test_normalization_is_fitted_on_train_only(store, cube_dir, tmp_path):
    ds = open_patch_store(store)
    cube = open_cube(f"{cube_dir}/synthetic.zarr")
    recorded = json.loads(ds.attrs["normalization"])
    assert recorded["method"] == "log1p"
    expected = get_method("log1p").fit(_train_frame_values(ds, cube))
    assert recorded["params"] == pytest.approx(expected)

    # A much wetter test block does not change the fitted parameters.
    wet_dir = tmp_path / "wet_cubes"
    wetter = cube.load().drop_encoding()
    in_test_windows = ds["window_split"].values == "test"
    test_times = _window_frames(ds["window_start_time"].values[in_test_windows], 6)
    in_test = np.isin(wetter["time"].values, test_times)
    wetter["rain_rate"][in_test] = wetter["rain_rate"][in_test] * 20 + 5
    write_cube(wetter, f"{wet_dir}/synthetic.zarr")
    wet_store_path = build_patches(
        _experiment(wet_dir, tmp_path / "p"), scheduler="threads", progress=False
    )
    wet_store = open_patch_store(wet_store_path)
    assert json.loads(wet_store.attrs["normalization"])["params"] == recorded["params"]
    test = wet_store["split"].values == "test"
    assert _cut(wet_store_path)[1][test].max() > _cut(store)[1].max()


@pytest.mark.parametrize("method", ["log1p", "dbz", "none"])
def test_store_values_invert_to_the_cube(method, cube_dir, tmp_path):
    experiment = _experiment(cube_dir, tmp_path, normalization=method, dtype="float32")
    path = build_patches(experiment, scheduler="threads", progress=False)
    ds = open_patch_store(path)
    normalization = patches_normalization(ds)
    params = normalization.params
    cube = open_cube(f"{cube_dir}/synthetic.zarr")
    rain = cube["rain_rate"].values
    targets = _cut(path)[1].astype(np.float64)
    for k, (t0, y0, x0) in enumerate(zip(*_cube_index(ds, cube), strict=True)):
        truth = rain[t0 + 3 : t0 + 6, y0 : y0 + 32, x0 : x0 + 32]
        restored = normalization.inverse(targets[k])
        valid = np.isfinite(truth)
        if method == "dbz":
            # Rain rates at or below the 0 dBZ floor come back as 0.
            floor = (1 / params["a"]) ** (1 / params["b"])
            truth = np.where(truth <= floor, 0.0, truth)
        np.testing.assert_allclose(restored[valid], truth[valid], rtol=1e-5, atol=1e-5)


def patches_normalization(ds) -> Normalization:
    return Normalization.from_dict(ds.attrs["normalization"])


rain_rates = arrays(
    np.float64, st.integers(1, 50), elements=st.floats(0.0, 1000.0, allow_subnormal=False)
)


@settings(max_examples=60, deadline=None)
@given(rain_rate=rain_rates, scale=st.floats(0.5, 10.0))
def test_log1p_round_trip(rain_rate, scale):
    method, params = get_method("log1p"), {"scale": scale}
    np.testing.assert_allclose(
        method.inverse(method.forward(rain_rate, params), params), rain_rate, rtol=1e-12, atol=1e-12
    )
    tensor = torch.from_numpy(rain_rate)
    restored = method.inverse(method.forward(tensor, params), params)
    assert isinstance(restored, torch.Tensor)
    np.testing.assert_allclose(restored.numpy(), rain_rate, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(rain_rate=rain_rates)
def test_dbz_round_trip_on_the_representable_range(rain_rate):
    method = get_method("dbz")
    params = method.fit(None)
    floor = (10 ** (params["dbz_min"] / 10) / params["a"]) ** (1 / params["b"])
    ceiling = (10 ** (params["dbz_max"] / 10) / params["a"]) ** (1 / params["b"])
    values = method.forward(rain_rate, params)
    assert ((values >= 0) & (values <= 1)).all()
    zero = values == 0
    # Only rain rates at the clip floor (up to rounding) or below map to 0, and they stay 0.
    assert (rain_rate[zero] <= floor * (1 + 1e-9)).all()
    expected = np.where(zero, 0.0, np.minimum(rain_rate, ceiling))
    np.testing.assert_allclose(method.inverse(values, params), expected, rtol=1e-9, atol=1e-12)
    restored = method.inverse(method.forward(torch.from_numpy(rain_rate), params), params)
    np.testing.assert_allclose(restored.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_transforms_keep_nan_and_reject_unknown_names():
    rain_rate = np.array([np.nan, 0.0, 1.0])
    for name in ("log1p", "dbz", "none"):
        method = get_method(name)
        params = method.fit(np.array([0.0, 1.0, 30.0]))
        forward = method.forward(rain_rate, params)
        assert np.isnan(forward[0]) and forward[1] == 0.0
        forward_torch = method.forward(torch.from_numpy(rain_rate), params)
        assert torch.isnan(forward_torch[0]) and forward_torch[1] == 0.0
    with pytest.raises(ValueError, match="registered: dbz, log1p, none"):
        get_method("minmax")


# --------------------------------------------------------------------------------------------
# errors


def test_too_few_windows_reports_counts_per_split(cube_dir, tmp_path):
    experiment = _experiment(cube_dir, tmp_path, buffer_minutes=90)
    with pytest.raises(ConfigError, match=r"split 'val'.*train=\d+, val=0, test=\d+"):
        build_patches(experiment, scheduler="threads", progress=False)
    assert not storage.exists(f"{tmp_path}/syn.zarr")


def test_more_frames_than_the_cube_has(cube_dir, tmp_path):
    experiment = _experiment(cube_dir, tmp_path, n_input_frames=30, n_target_frames=12)
    with pytest.raises(ConfigError, match="30 \\+ 12 = 42 frames.*only 40 frames"):
        build_patches(experiment, scheduler="threads", progress=False)


def test_unknown_source_and_missing_cube(cube_dir, tmp_path):
    unknown = _experiment(cube_dir, tmp_path).model_copy(update={"sources": ["nexrad"]})
    with pytest.raises(ConfigError, match="unknown source 'nexrad'"):
        build_patches(unknown, scheduler="threads")
    missing = _experiment(tmp_path / "no_cubes", tmp_path).model_copy(update={"sources": ["bom"]})
    with pytest.raises(ConfigError, match="no cube for source 'bom'.*nowcast ingest bom"):
        build_patches(missing, scheduler="threads")


def test_bad_patches_section_names_the_field(cube_dir, tmp_path):
    with pytest.raises(ConfigError, match="section 'patches'.*split_fractions"):
        build_patches(_experiment(cube_dir, tmp_path, split_fractions={"train": 0.9}))
    with pytest.raises(ConfigError, match="normalization.*registered"):
        build_patches(_experiment(cube_dir, tmp_path, normalization="zscore"))


# --------------------------------------------------------------------------------------------
# re-runs


def test_rerun_is_a_noop_until_config_or_force_changes(cube_dir, tmp_path, monkeypatch):
    experiment = _experiment(cube_dir, tmp_path)
    path = build_patches(experiment, scheduler="threads", progress=False)
    history = open_patch_store(path).attrs["history"]
    writes = []
    original = patches.write_store
    monkeypatch.setattr(patches, "write_store", lambda *args: writes.append(1) or original(*args))
    assert build_patches(experiment, scheduler="threads", progress=False) == path
    assert writes == [] and open_patch_store(path).attrs["history"] == history
    build_patches(experiment, scheduler="threads", progress=False, force=True)
    build_patches(_experiment(cube_dir, tmp_path, stride=32), scheduler="threads", progress=False)
    assert writes == [1, 1]
    assert open_patch_store(path).attrs["stride"] == 32


def test_rerun_after_a_killed_write(cube_dir, tmp_path, monkeypatch):
    experiment = _experiment(cube_dir, tmp_path)
    final = f"{tmp_path}/syn.zarr"
    original = patches.write_store

    def write_then_die(ds, path, client, progress):
        original(ds, path, client, progress)
        assert os.path.isdir(path) and path != final
        raise RuntimeError("killed")

    monkeypatch.setattr(patches, "write_store", write_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        build_patches(experiment, scheduler="threads", progress=False)
    assert not os.path.exists(final)
    # A SIGKILL leaves its temporary store behind; the next run removes it.
    leftover = f"{final}.tmp-99999-deadbeef"
    os.makedirs(leftover)
    monkeypatch.setattr(patches, "write_store", original)
    assert build_patches(experiment, scheduler="threads", progress=False) == final
    assert open_patch_store(final).sizes["sample"] > 0
    assert storage.stale_temporaries(final) == []


def test_a_second_build_of_a_store_in_use_fails_and_leaves_its_files(cube_dir, tmp_path):
    experiment = _experiment(cube_dir, tmp_path)
    final = f"{tmp_path}/syn.zarr"
    live = subprocess.Popen(["sleep", "60"])  # stands for a build that is writing the store
    try:
        Path(f"{final}.lock").write_text(
            json.dumps({"host": socket.gethostname(), "pid": live.pid})
        )
        in_use = f"{final}.tmp-{live.pid}-0123abcd"
        os.makedirs(in_use)
        with pytest.raises(StoreLockedError, match=f"pid {live.pid}"):
            build_patches(experiment, scheduler="threads", progress=False)
        assert os.path.isdir(in_use) and not os.path.exists(final)
    finally:
        live.kill()
        live.wait()
    # Its holder gone, the lock is stale: the next build takes it over and cleans up.
    assert build_patches(experiment, scheduler="threads", progress=False) == final
    assert storage.stale_temporaries(final) == [] and not os.path.exists(f"{final}.lock")


def test_a_too_small_disk_stops_the_build_before_writing(cube_dir, tmp_path, monkeypatch):
    experiment = _experiment(cube_dir, tmp_path / "patches")
    final = f"{tmp_path}/patches/syn.zarr"
    monkeypatch.setattr("nowcast.storage.free_bytes", lambda path: 4096)
    with pytest.raises(DiskWriteError) as error:
        build_patches(experiment, scheduler="threads", progress=False)
    message = str(error.value)
    assert message.startswith(f"{final}: not enough free disk space for the patch store")
    assert "4.0 KiB free" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "patches")  # no store, temporary or lock

    # The estimate (the arrays uncompressed) bounds the store written.
    monkeypatch.undo()
    estimates = []
    check = storage.check_free_space
    monkeypatch.setattr(
        storage,
        "check_free_space",
        lambda path, needed, what: estimates.append(needed) or check(path, needed, what),
    )
    assert build_patches(experiment, scheduler="threads", progress=False) == final
    stored = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(final)
        for name in names
    )
    assert len(estimates) == 1 and stored <= estimates[0]


# --------------------------------------------------------------------------------------------
# real data


@pytest.mark.realdata
def test_bom_store(bom_cube, tmp_path):
    experiment = bom_experiment(
        bom_cube, tmp_path, patch_size=128, stride=192, max_samples_per_split=30
    )
    path = build_patches(experiment, scheduler="threads", progress=False)
    ds = open_patch_store(path)
    assert ds.attrs["timestep_minutes"] == 10
    assert (ds.attrs["n_input_frames"], ds.attrs["n_target_frames"]) == (6, 6)
    windows = pd.DataFrame(
        {
            "start": ds["window_start_time"].values,
            "split": ds["window_split"].values.astype(object),
        }
    )
    end = windows["start"] + 11 * STEP
    test = windows["split"] == "test"
    # The 08:00-11:50 block holds 24 frames: 13 windows of 12 frames, all kept.
    assert test.sum() == 13
    assert (windows["start"][test] >= np.datetime64("2020-10-31T08:00")).all()
    assert (end[test] <= np.datetime64("2020-10-31T11:50")).all()
    train = windows["split"] == "train"
    assert (
        (end[train] <= np.datetime64("2020-10-31T07:30"))
        | (windows["start"][train] >= np.datetime64("2020-10-31T12:20"))
    ).all()

    cube = open_cube(bom_cube)
    normalization = patches_normalization(ds)
    rain = cube["rain_rate"].values
    ds = ds.load()
    inputs, targets, input_mask, target_mask = _cut(path)
    wettest = 0.0
    for k, (t0, y0, x0) in enumerate(zip(*_cube_index(ds, cube), strict=True)):
        truth = rain[t0 : t0 + 12, y0 : y0 + 128, x0 : x0 + 128]
        stored = np.concatenate([inputs[k], targets[k]])
        mask = np.concatenate([input_mask[k], target_mask[k]])
        np.testing.assert_array_equal(mask, np.isfinite(truth))
        restored = normalization.inverse(stored.astype(np.float64))
        # float16 keeps 11 significant bits of the normalized value x; R = expm1(x * scale)
        # then carries a relative error of about (1 + R) / R * log1p(R) * 2**-11.
        tolerance = (1 + truth) * np.log1p(np.nan_to_num(truth)) * 2.0**-10 + 1e-6
        assert (np.abs(restored - truth)[mask] <= tolerance[mask]).all()
        wettest = max(wettest, float(truth[mask].max()))
    assert wettest > 10  # the checked samples include heavy rain, not only zeros


def test_lagrangian_store_moves_targets_onto_the_reference_frame(cube_dir, tmp_path):
    eulerian_path = build_patches(
        _experiment(cube_dir, tmp_path / "e"), scheduler="threads", progress=False
    )
    lagrangian_path = build_patches(
        _experiment(cube_dir, tmp_path / "l", frame="lagrangian"),
        scheduler="threads",
        progress=False,
    )
    eulerian, lagrangian = open_patch_store(eulerian_path), open_patch_store(lagrangian_path)
    assert lagrangian.attrs["frame"] == "lagrangian" and eulerian.attrs["frame"] == "eulerian"
    assert lagrangian.sizes == eulerian.sizes
    np.testing.assert_array_equal(lagrangian["y0"].values, eulerian["y0"].values)
    assert lagrangian.attrs["margin"] >= 2 and eulerian.attrs["margin"] == 0
    e_inputs, e_targets, e_input_mask, e_target_mask = _cut(eulerian_path)
    l_inputs, l_targets, l_input_mask, l_target_mask = _cut(lagrangian_path)
    # The reference (last input) frame is not moved (only re-normalized in float32).
    np.testing.assert_array_equal(l_input_mask[:, -1], e_input_mask[:, -1])
    np.testing.assert_allclose(l_inputs[:, -1], e_inputs[:, -1], rtol=1e-6, atol=1e-7)

    def spread(inputs, targets, input_mask, target_mask):
        both = target_mask[:, -1] & input_mask[:, -1]
        return float(((targets[:, -1] - inputs[:, -1]) ** 2)[both].mean())

    # In the Lagrangian frame the last target differs from the reference by growth/decay only.
    assert spread(l_inputs, l_targets, l_input_mask, l_target_mask) < 0.6 * spread(
        e_inputs, e_targets, e_input_mask, e_target_mask
    )
    assert np.isfinite(l_targets).all()
