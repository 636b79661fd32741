"""PyTorch access to the patch store (nowcast.patches.loader)."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zarr
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from nowcast.config import ExperimentConfig
from nowcast.patches.build import build_patches
from nowcast.patches.loader import (
    PatchDataset,
    dihedral,
    make_dataloaders,
)
from nowcast.patches.reader import PatchStore
from nowcast.sources.catalog import Catalog, SourceConfig
from nowcast.sources.ingest import ingest
from nowcast.windows import FrameSpec


def _synthetic_store(tmp_path_factory, n_input_frames: int, n_target_frames: int) -> str:
    source = SourceConfig(
        name="synthetic",
        importer="synthetic",
        timestep=10,
        importer_kwargs={"shape": [64, 64], "n_frames": 36, "seed": 5},
    )
    cube_dir = tmp_path_factory.mktemp("cubes")
    catalog = Catalog(sources={"synthetic": source})
    ingest("synthetic", str(cube_dir), catalog=catalog, scheduler="threads", progress=False)
    experiment = ExperimentConfig(
        name="syn",
        sources=["synthetic"],
        cube_dir=str(cube_dir),
        patch_dir=str(tmp_path_factory.mktemp("patches")),
        patches={
            "n_input_frames": n_input_frames,
            "n_target_frames": n_target_frames,
            "patch_size": 32,
            "stride": 16,
            "buffer_minutes": 10,
            "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25},
        },
    )
    return build_patches(experiment, scheduler="threads", progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A small synthetic patch store: 3 + 3 frames of 32 x 32 pixels."""
    return _synthetic_store(tmp_path_factory, 3, 3)


@pytest.fixture(scope="module")
def uneven_store(tmp_path_factory) -> str:
    """As ``store`` with 3 input and 2 target frames (a 30-min step: leads 30 and 60 min)."""
    return _synthetic_store(tmp_path_factory, 3, 2)


def test_loaders_yield_float32_batches_without_nan(store):
    loaders = make_dataloaders(store, batch_size=8, augment=False)
    counts = PatchStore.open(store).counts["samples"]
    patch_store = PatchStore.open(store)
    for split, loader in loaders.items():
        n_seen = 0
        for inputs, targets, mask in loader:
            n = inputs.shape[0]
            assert inputs.shape == (n, 3, 1, 32, 32)
            assert targets.shape == (n, 3, 1, 32, 32) and mask.shape == (n, 3, 1, 32, 32)
            assert {t.dtype for t in (inputs, targets, mask)} == {torch.float32}
            assert torch.isfinite(inputs).all() and torch.isfinite(targets).all()
            assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
            assert (targets[mask == 0] == 0).all()
            n_seen += n
        assert n_seen == counts[split] > 0, split
    # val is read in store order: the first batch is the store's first val samples.
    first_val = int(patch_store.samples("val")["sample"].iloc[0])
    inputs, targets, mask = next(iter(loaders["val"]))
    expected = patch_store.sample(first_val)
    np.testing.assert_array_equal(inputs[0, :, 0].numpy(), expected["inputs"].values)
    np.testing.assert_array_equal(mask[0, :, 0].numpy(), expected["target_mask"].values)
    assert (mask == 0).any()  # the synthetic radar range leaves no-data corners


def test_samplers_and_workers(store):
    loaders = make_dataloaders(store, batch_size=4, num_workers=2, augment=False)
    assert isinstance(loaders["train"].sampler, RandomSampler)
    assert isinstance(loaders["val"].sampler, SequentialSampler)
    assert isinstance(loaders["test"].sampler, SequentialSampler)
    # Workers are re-created each epoch so they see the dataset's epoch (augmentation seed).
    assert not loaders["val"].persistent_workers
    in_process = make_dataloaders(store, batch_size=4, num_workers=0, augment=False)
    # Worker processes open the store themselves and return the same samples in order.
    for _ in range(2):
        for from_workers, direct in zip(loaders["val"], in_process["val"], strict=True):
            for a, b in zip(from_workers, direct, strict=True):
                torch.testing.assert_close(a, b)


def test_distributed_sampler(store, tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        loaders = make_dataloaders(store, batch_size=4, distributed=True, seed=3)
        train, val = loaders["train"].sampler, loaders["val"].sampler
        assert isinstance(train, DistributedSampler) and train.shuffle and train.seed == 3
        assert isinstance(val, DistributedSampler) and not val.shuffle
        assert len(list(train)) == len(loaders["train"].dataset)
        inputs, _, _ = next(iter(loaders["train"]))
        assert inputs.shape[1:] == (3, 1, 32, 32)
    finally:
        dist.destroy_process_group()


def _patterned_store(store: str, tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    """Copy of the store whose first train sample's frames hold asymmetric random patterns."""
    copy = str(tmp_path / "patterned.zarr")
    shutil.copytree(store, copy)
    patch_store = PatchStore.open(copy)
    row = patch_store._table.iloc[int(patch_store.samples("train")["sample"].iloc[0])]
    rng = np.random.default_rng(0)
    values = rng.random((6, 32, 32)).astype(np.float16)
    valid = rng.random((6, 32, 32)) > 0.5
    frames = zarr.open_group(copy, mode="r+")["frames/synthetic/frames"]
    region = (
        slice(row.frame_start, row.frame_start + 6),
        slice(row.y0, row.y0 + 32),
        slice(row.x0, row.x0 + 32),
    )
    frames[region] = np.where(valid, values, np.nan).astype(np.float16)
    patterns = {
        "inputs": np.where(valid, values, 0)[:3],
        "targets": np.where(valid, values, 0)[3:],
        "target_mask": valid[3:],
    }
    return copy, patterns


def test_augmentation_is_one_transform_for_inputs_targets_and_mask(store, tmp_path):
    path, patterns = _patterned_store(store, tmp_path)
    dataset = PatchDataset(path, "train", augment=True, seed=1)
    transforms = [(k, flip) for flip in (False, True) for k in range(4)]
    seen = set()
    for epoch in range(40):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        matches = {}
        for name, tensor in zip(patterns, sample, strict=True):
            assert tensor.shape == (3, 1, 32, 32)
            matches[name] = {
                t
                for t in transforms
                if np.array_equal(
                    tensor[:, 0].numpy(), dihedral(patterns[name], *t).astype(np.float32)
                )
            }
        assert len(matches["inputs"]) == 1
        assert matches["inputs"] == matches["targets"] == matches["target_mask"]
        seen |= matches["inputs"]
    assert len(seen) >= 4  # augmentation really varies between epochs

    plain = PatchDataset(path, "train", augment=False)
    np.testing.assert_array_equal(plain[0][0][:, 0].numpy(), patterns["inputs"])


def test_dihedral_transforms_are_the_eight_symmetries_of_the_square():
    square = np.arange(16).reshape(1, 4, 4)
    images = {dihedral(square, k, flip).tobytes() for k in range(4) for flip in (False, True)}
    assert len(images) == 8
    np.testing.assert_array_equal(dihedral(square, 1, False)[0], np.rot90(square[0]))
    np.testing.assert_array_equal(dihedral(square, 0, True)[0], square[0, :, ::-1])


def test_normalization_and_store_attributes(store):
    patch_store = PatchStore.open(store)
    normalization, info = patch_store.normalization, patch_store.attrs
    assert normalization.method == info["normalization"]["method"] == "log1p"
    assert normalization.params == info["normalization"]["params"]
    assert normalization.params["scale"] > 0
    assert normalization.fitted_on["split"] == "train"
    assert normalization.to_dict() == info["normalization"]
    assert patch_store.frame_spec == FrameSpec(3, 3, info["timestep_minutes"])
    assert (info["n_input_frames"], info["n_target_frames"], info["patch_size"]) == (3, 3, 32)
    assert set(info["counts"]["windows"]) == {"train", "val", "test"}
    assert set(info["cube_paths"]) == {"synthetic"}
    _, targets, mask = PatchDataset(store, "test")[0]
    rain_rate = normalization.inverse(targets)
    assert isinstance(rain_rate, torch.Tensor) and (rain_rate >= 0).all()
    np.testing.assert_allclose(rain_rate.numpy(), normalization.inverse(targets.numpy()), rtol=1e-6)


def test_dataset_pickles_without_open_handles(store):
    dataset = PatchDataset(store, "val")
    expected = dataset[1]
    state = dataset.store.__getstate__()
    assert dataset.store._arrays is not None  # opened by the read above
    assert state["_arrays"] is None and state["_pid"] is None
    clone = pickle.loads(pickle.dumps(dataset))
    for a, b in zip(clone[1], expected, strict=True):
        torch.testing.assert_close(a, b)


def test_unknown_split(store):
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        PatchDataset(store, "validation")


def test_augmentation_is_a_function_of_seed_epoch_and_sample(store):
    from nowcast.patches.loader import PatchDataset

    dataset = PatchDataset(store, "train", augment=True, seed=5)
    again = PatchDataset(store, "train", augment=True, seed=5)
    first = [dataset[i][0] for i in range(6)]
    torch.testing.assert_close(first, [again[i][0] for i in range(6)])
    dataset.set_epoch(1)
    later = [dataset[i][0] for i in range(6)]
    assert any(not torch.equal(a, b) for a, b in zip(first, later, strict=True))


@pytest.mark.parametrize("name", ["store", "uneven_store"])
def test_time_reversal_plays_the_window_backwards(name, request):
    from nowcast.patches.loader import PatchDataset

    store = request.getfixturevalue(name)
    patch_store = PatchStore.open(store)
    plain = PatchDataset(store, "train")
    reversing = PatchDataset(store, "train", time_reversal=True, seed=2)
    n_input = plain.n_input_frames
    flipped = 0
    for index in range(len(plain)):
        inputs, targets, mask = reversing[index]
        sample = int(plain.indices[index])
        if torch.equal(inputs, plain[index][0]):
            continue
        flipped += 1
        window = patch_store.sample(sample)
        frames = np.concatenate([window["inputs"].values, window["targets"].values])[::-1]
        masks = np.concatenate([window["input_mask"].values, window["target_mask"].values])[::-1]
        assert inputs.shape[0] == n_input and targets.shape[0] == plain.n_target_frames
        np.testing.assert_array_equal(inputs[:, 0].numpy(), frames[:n_input].astype(np.float32))
        np.testing.assert_array_equal(targets[:, 0].numpy(), frames[n_input:].astype(np.float32))
        np.testing.assert_array_equal(mask[:, 0].numpy(), masks[n_input:].astype(np.float32))
    assert 0 < flipped < len(plain)  # about half of the windows are reversed
