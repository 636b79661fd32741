"""Tests of the training loop (nowcast.training.loop), its checkpoints and losses."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from nowcast.config import ConfigError, ExperimentConfig
from nowcast.patches.normalization import Normalization
from nowcast.patches.reader import PatchStore
from nowcast.sources.catalog import Catalog, SourceConfig
from nowcast.storage import DiskWriteError, StoreLockedError
from nowcast.training import loop as train_module
from nowcast.training import losses
from nowcast.training import step as step_module
from nowcast.training.checkpoint import (
    CHECKPOINT_KEYS,
    capture_rng_state,
    checkpoint_bytes,
    checkpoint_path,
    load_checkpoint,
    load_model,
    restore_rng_state,
)
from nowcast.training.config import TrainingDivergedError
from nowcast.training.loop import train
from nowcast.training.setup import LOG_FIELDS, RUN_LOCK

N_INPUT, N_TARGET, SIZE = 3, 2, 32
TINY_MODEL = {
    "name": "convlstm",
    "kwargs": {"patch_factor": 4, "hidden_channels": [8], "kernel_sizes": 3},
}
MAX_RAIN_RATE = 32.0  # mm/h; scale of the log1p normalization in the loss tests
LOG1P = Normalization("log1p", {"scale": math.log1p(MAX_RAIN_RATE)})


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---- a tiny real patch store ---------------------------------------------------------------

#: Samples per split of the tiny store: 12 training samples in batches of 4 are 3 steps/epoch.
N_TRAIN = 12


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    """A synthetic cube (moving cells) cut into a small real patch store, shared by the tests."""
    from nowcast.patches.build import build_patches
    from nowcast.sources.ingest import ingest

    root = tmp_path_factory.mktemp("train_store")
    source = SourceConfig(
        name="synthetic",
        importer="synthetic",
        timestep=10,
        importer_kwargs={"shape": [64, 64], "n_frames": 40, "seed": 3, "motion": [1.0, 0.5]},
    )
    ingest(
        "synthetic",
        str(root / "cubes"),
        catalog=Catalog(sources={"synthetic": source}),
        scheduler="threads",
        progress=False,
    )
    store = build_patches(make_experiment(root), scheduler="threads", progress=False)
    # The step counts below assume it: 12 training samples, 3 batches of 4 per epoch.
    assert PatchStore.open(store).counts["samples"]["train"] == N_TRAIN
    return root


def make_experiment(root: Path, run: str = "run", store: Path | None = None, **train_section):
    """An experiment on the tiny store under ``store`` (default ``root``), run in ``root/run``."""
    section = {
        "model": TINY_MODEL,
        "optimizer": {"lr": 3e-3},
        "schedule": "cosine",
        "warmup_steps": 2,
        "epochs": 3,
        "batch_size": 4,
        "log_every": 1,
        "checkpoint_every": 2,
        "seed": 0,
    }
    section.update(train_section)
    store = store or root
    return ExperimentConfig(
        name="cells",
        sources=["synthetic"],
        cube_dir=str(store / "cubes"),
        patch_dir=str(store / "patches"),
        run_dir=str(root / run),
        patches={
            "n_input_frames": N_INPUT,
            "n_target_frames": N_TARGET,
            "patch_size": SIZE,
            "stride": SIZE // 2,
            "split_fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
            "buffer_minutes": 10,
            "min_wet_fraction": 0.05,
            "max_samples_per_split": N_TRAIN,
        },
        train=section,
    )


def run_training(experiment: ExperimentConfig, **kwargs) -> dict:
    return train(experiment, device="cpu", progress=False, **kwargs)


def read_log(run_dir: Path, timings: bool = True) -> list[dict]:
    with (run_dir / "train_log.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    if not timings:
        for row in rows:
            del row["samples_per_s"]
    return rows


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ---- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"optimizer": {"lr": -1.0}}, "optimizer.lr"),
        ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas"),
        ({"loss": "huber"}, "loss"),
        ({"model": {"name": "unet"}}, "model.name"),
        ({"amp": "fp8"}, "amp"),
        ({"schedule": "step"}, "schedule"),
        ({"batch_sise": 4}, "batch_sise"),
        ({"epochs": None, "max_steps": None}, "max_steps"),
    ],
)
def test_config_error_names_field(tmp_path, section, field):
    config_file = tmp_path / "experiment.yaml"
    config_file.write_text(
        yaml.safe_dump({"name": "cells", "sources": ["synthetic"], "train": section})
    )
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as error:
        train(config_file, device="cpu", progress=False)
    assert str(config_file) in str(error.value)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"model": {"name": "convlstm", "kwargs": {"hidden_channel": 8}}}, "model.kwargs"),
        ({"amp": "fp16"}, "amp"),  # fp16 needs a GPU
    ],
)
def test_config_error_found_at_build_time_names_field(store_root, tmp_path, section, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_training(make_experiment(tmp_path, store=store_root, **section))
    assert not checkpoint_path(tmp_path / "run").exists()


# ---- losses -----------------------------------------------------------------------------


def _loss_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, N_TARGET, 1, 8, 8)
    prediction = torch.rand(shape, generator=generator)
    target = torch.rand(shape, generator=generator)
    mask = (torch.rand(shape, generator=generator) > 0.3).float()
    target_rain_rate = LOG1P.inverse(target)
    return prediction, target, mask, target_rain_rate


def _bound_loss(name: str):
    """The registered loss, with normalised wet thresholds bound where it needs them."""
    loss_fn = losses.get_method(name)
    if name in losses.THRESHOLD_LOSSES:
        thresholds = LOG1P.forward(torch.tensor(losses.WET_AREA_THRESHOLDS))
        return functools.partial(loss_fn, wet_thresholds=thresholds)
    return loss_fn


@pytest.mark.parametrize("name", losses.registered_losses())
def test_loss_ignores_no_data(name):
    loss_fn = _bound_loss(name)
    prediction, target, mask, rain_rate = _loss_inputs()
    prediction.requires_grad_(True)
    reference = loss_fn(prediction, target, mask, rain_rate)
    reference.backward()
    no_data = mask == 0
    assert reference.item() > 0
    assert torch.all(prediction.grad[no_data] == 0)

    changed = [t.detach().clone() for t in (prediction, target, rain_rate)]
    for tensor, value in zip(changed, (math.nan, math.inf, 1e6), strict=True):
        tensor[no_data] = value
    assert torch.equal(loss_fn(changed[0], changed[1], mask, changed[2]), reference.detach())


def test_losses_are_means_over_valid_pixels():
    prediction, target, mask, rain_rate = _loss_inputs(seed=1)
    valid = mask > 0
    error = (prediction - target)[valid]
    weights = torch.ones(int(valid.sum()))
    for threshold, weight in zip(
        (0.5, 2.0, 5.0, 10.0, 30.0), (1.0, 2.0, 5.0, 10.0, 30.0), strict=True
    ):
        weights[rain_rate[valid] >= threshold] = weight
    expected = {
        "mse": (error**2).mean(),
        "mae": error.abs().mean(),
        "mse+mae": (error**2).mean() + error.abs().mean(),
        "bmse+bmae": (weights * (error**2 + error.abs())).mean(),
    }
    for name, value in expected.items():
        actual = losses.get_method(name)(prediction, target, mask, rain_rate)
        torch.testing.assert_close(actual, value, msg=name)


def test_pinball_loss_is_the_quantile_loss_and_its_minimiser_the_quantile():
    prediction, target, mask, rain_rate = _loss_inputs(seed=2)
    valid = mask > 0
    under = (target - prediction)[valid]
    for quantile in (0.5, 0.8):
        expected = torch.maximum(quantile * under, (quantile - 1) * under).mean()
        actual = losses.get_method("pinball")(prediction, target, mask, quantile=quantile)
        torch.testing.assert_close(actual, expected)
    # A constant fitted with the 0.8 pinball loss lands on the 0.8-quantile of the targets.
    values = torch.rand(2000, generator=torch.Generator().manual_seed(3))
    constant = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([constant], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        losses.pinball(
            constant.expand_as(values), values, torch.ones_like(values), quantile=0.8
        ).backward()
        optimizer.step()
    assert abs(constant.item() - torch.quantile(values, 0.8).item()) < 0.03
    with pytest.raises(ValueError, match="quantile must lie in"):
        losses.pinball(prediction, target, mask, quantile=1.5)


def test_balanced_loss_weights_at_bin_edges():
    # HKO-7: weight 1 below 0.5 mm/h, then 1, 2, 5, 10, 30 from 0.5, 2, 5, 10, 30 mm/h on.
    rain_rates = [0.0, 0.49, 0.5, 1.99, 2.0, 4.99, 5.0, 9.99, 10.0, 29.99, 30.0, 120.0]
    expected_weights = [1, 1, 1, 1, 2, 2, 5, 5, 10, 10, 30, 30]
    loss_fn = losses.get_method("bmse+bmae")
    target = torch.zeros(len(rain_rates))
    prediction = target + 1.0  # error 1: w * (1**2 + |1|) = 2 w at the one valid pixel
    for index, (rain_rate, weight) in enumerate(zip(rain_rates, expected_weights, strict=True)):
        mask = torch.zeros(len(rain_rates))
        mask[index] = 1.0
        rates = torch.full((len(rain_rates),), 1000.0)
        rates[index] = rain_rate
        assert loss_fn(prediction, target, mask, rates).item() == 2.0 * weight, rain_rate


def test_balanced_weights_match_the_verification_scores():
    from nowcast.verification import detcont

    assert losses.HKO7_THRESHOLDS == detcont.HKO7_THRESHOLDS
    assert losses.HKO7_WEIGHTS == detcont.HKO7_WEIGHTS
    edges = torch.tensor(detcont.HKO7_THRESHOLDS)
    rain_rate = torch.cat([torch.linspace(0.0, 100.0, 1001), edges, edges - 1e-4, edges + 1e-4])
    assert torch.equal(losses.balanced_weights(rain_rate), detcont.balanced_weights(rain_rate))


def test_wet_area_loss_penalises_frequency_bias():
    prediction, target, mask, _ = _loss_inputs(seed=2)
    loss_fn = _bound_loss("mse+bias")
    # A perfect forecast costs nothing; the area term of a sharp forecast is almost exact.
    assert loss_fn(target, target, mask).item() == pytest.approx(0.0, abs=1e-3)
    # Two forecasts with the same MSE: adding 0.1 everywhere wets more pixels (bias > 1) than
    # subtracting 0.1 dries (targets are uniform on [0, 1], the 0.5 mm/h threshold is ~0.1).
    wetter, drier = target + 0.1, target - 0.1
    mse = losses.get_method("mse")
    torch.testing.assert_close(mse(wetter, target, mask), mse(drier, target, mask))
    assert loss_fn(wetter, target, mask) > mse(wetter, target, mask)
    # The penalty grows with the area error, and its gradient shrinks an over-forecast area.
    over = target.clone()
    over[target < 0.3] = 0.35  # light rain everywhere below 0.35 becomes rain above threshold
    heavier = target.clone()
    heavier[target < 0.3] = 0.5
    assert loss_fn(heavier, target, mask) - mse(heavier, target, mask) >= loss_fn(
        over, target, mask
    ) - mse(over, target, mask)
    over.requires_grad_(True)
    area_only = functools.partial(_bound_loss("mse+bias"), area_weight=1.0)
    (area_only(over, target, mask) - mse(over, target, mask)).backward()
    assert over.grad[(target < 0.3) & (mask > 0)].sum() > 0  # descent lowers them
    with pytest.raises(ValueError, match="wet_thresholds"):
        losses.get_method("mse+bias")(prediction, target, mask)


def test_loss_kwargs_must_fit_the_loss(store_root, tmp_path):
    experiment = make_experiment(
        tmp_path, store=store_root, loss="mse+bias", loss_kwargs={"area_wieght": 2.0}
    )
    with pytest.raises(ConfigError, match="loss_kwargs"):
        run_training(experiment)


def test_wet_area_loss_trains(store_root, tmp_path):
    experiment = make_experiment(
        tmp_path,
        store=store_root,
        epochs=None,
        max_steps=6,
        loss="mse+bias",
        loss_kwargs={"area_weight": 2.0},
    )
    summary = run_training(experiment)
    assert summary["steps"] == 6 and math.isfinite(summary["best_val_loss"])


def test_balanced_loss_needs_rain_rate_and_unknown_loss_lists_names():
    prediction, target, mask, _ = _loss_inputs()
    with pytest.raises(ValueError, match="target_rain_rate"):
        losses.get_method("bmse+bmae")(prediction, target, mask)
    with pytest.raises(ValueError, match="mse, mse\\+bias, mse\\+mae"):
        losses.get_method("huber")


# ---- training ---------------------------------------------------------------------------


def test_loss_decreases_and_logs(store_root, tmp_path):
    experiment = make_experiment(
        tmp_path,
        store=store_root,
        epochs=None,
        max_steps=30,
        optimizer={"lr": 1e-2},
        loss="mse",
        augment=False,
    )
    summary = run_training(experiment)
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 30
    rows = read_log(tmp_path / "run")
    assert set(rows[0]) == set(LOG_FIELDS)
    train_losses = [float(row["loss"]) for row in rows if row["split"] == "train"]
    assert len(train_losses) == 30
    assert np.mean(train_losses[-5:]) < 0.7 * np.mean(train_losses[:5])
    val_rows = [row for row in rows if row["split"] == "val"]
    assert len(val_rows) == 30 // 3  # every epoch (3 steps each)
    assert float(val_rows[-1]["loss"]) < float(val_rows[0]["loss"])
    assert all(float(row["mse_mmh"]) >= 0 and 0 <= float(row["csi_1mmh"]) <= 1 for row in val_rows)
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    best = load_checkpoint(checkpoint_path(tmp_path / "run", "best"))
    assert best["best_metric"] == min(float(row["loss"]) for row in val_rows)


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch, and at an epoch end (3 steps/epoch)
def test_resume_continues_exactly(store_root, tmp_path, stop_at):
    uninterrupted = run_training(make_experiment(tmp_path, store=store_root, run="whole"))
    first = run_training(
        make_experiment(tmp_path, store=store_root, run="split"),
        stop_requested=lambda step: step == stop_at,
    )
    assert first["stop_reason"] == "stop_requested" and first["steps"] == stop_at
    stopped = load_checkpoint(checkpoint_path(tmp_path / "split"))
    assert (stopped["epoch"], stopped["batch_index"]) == divmod(stop_at, 3)

    resumed = run_training(make_experiment(tmp_path, store=store_root, run="split"), resume=True)
    assert resumed["steps"] == uninterrupted["steps"] == 9
    assert uninterrupted["resumed_from"] is None
    epoch, batch = divmod(stop_at, 3)
    assert resumed["resumed_from"] == {
        "checkpoint": str(checkpoint_path(tmp_path / "split")),
        "step": stop_at,
        "epoch": epoch,
        "batch_index": batch,
        "best_metric": stopped["best_metric"],
    }
    whole = load_checkpoint(checkpoint_path(tmp_path / "whole"))
    split = load_checkpoint(checkpoint_path(tmp_path / "split"))
    assert_same_tensors(split["model_state"], whole["model_state"])
    for a, b in zip(
        split["optimizer_state"]["state"].values(),
        whole["optimizer_state"]["state"].values(),
        strict=True,
    ):
        assert_same_tensors(a, b)
    assert split["best_metric"] == whole["best_metric"]
    # The log of the resumed run reads as one run: the same rows, no duplicates.
    assert read_log(tmp_path / "split", timings=False) == read_log(
        tmp_path / "whole", timings=False
    )


class _KilledWhileSaving(BaseException):
    """Stands for a kill: raised instead of writing a file, so nothing of that write lands."""


@pytest.mark.parametrize("killed_at", [1, 2, 3])  # the n-th best.pt write of the run
def test_a_kill_while_best_is_written_keeps_the_best_model(
    store_root, tmp_path, monkeypatch, killed_at
):
    from nowcast.training import loop

    uninterrupted = run_training(make_experiment(tmp_path, store=store_root, run="whole"))
    assert uninterrupted["stop_reason"] == "epochs"
    real_save, best_writes = loop.save_checkpoint, []

    def save_or_die(path, checkpoint):
        if Path(path).name == "best.pt":
            best_writes.append(path)
            if len(best_writes) == killed_at:
                raise _KilledWhileSaving
        real_save(path, checkpoint)

    monkeypatch.setattr(loop, "save_checkpoint", save_or_die)
    with pytest.raises(_KilledWhileSaving):
        run_training(make_experiment(tmp_path, store=store_root, run="killed"))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    run_training(make_experiment(tmp_path, store=store_root, run="killed"), resume=True)
    for name in ("last", "best"):
        whole = load_checkpoint(checkpoint_path(tmp_path / "whole", name))
        killed = load_checkpoint(checkpoint_path(tmp_path / "killed", name))
        assert (killed["step"], killed["best_metric"]) == (whole["step"], whole["best_metric"])
        assert_same_tensors(killed["model_state"], whole["model_state"])


#: A fresh process (numba changes the count only when its threading layer starts) validates
#: once with torch on one thread and prints torch's thread count before and after.
_VALIDATE_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import math
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from nowcast.patches.normalization import Normalization
    from nowcast.training import losses
    from nowcast.training.loop import validate
    from nowcast.training.step import StepParts

    class LastFrames(torch.nn.Module):
        def forward(self, frames):
            return frames[:, -2:]

    torch.set_num_threads(1)
    model = LastFrames()
    parts = StepParts(model, model, None, None, losses.get_method("mse"), torch.device("cpu"))
    data = torch.rand(8, 3, 1, 32, 32)
    loader = DataLoader(TensorDataset(data, data[:, :2], torch.ones(8, 2, 1, 32, 32)), 4)
    print(torch.get_num_threads())
    validate(model, loader, parts, Normalization("log1p", {"scale": math.log1p(32.0)}))
    print(torch.get_num_threads())
    """
)


def test_validation_keeps_torchs_thread_count():
    # The validation CSI counts with the verification package's numba kernels; starting numba's
    # threading layer would reset the OpenMP thread count it shares with torch, and the steps
    # after a validation would then sum in another order than those of a run resumed in a new
    # process (and a torchrun rank would take every core).
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", _VALIDATE_IN_A_FRESH_PROCESS],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert result.stdout.split() == ["1", "1"]


def test_time_budget_stops_cleanly_with_a_checkpoint(store_root, tmp_path):
    summary = run_training(make_experiment(tmp_path, store=store_root, max_minutes=1e-9))
    assert summary["stop_reason"] == "time_budget" and summary["steps"] == 1
    checkpoint = load_checkpoint(checkpoint_path(tmp_path / "run"))
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["batch_index"]) == (1, 0, 1)
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(make_experiment(tmp_path, store=store_root))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(store_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_training(make_experiment(tmp_path, store=store_root, epochs=1))
    last_path, best_path = checkpoint_path(run_dir), checkpoint_path(run_dir, "best")
    good_last, good_best = load_checkpoint(last_path), load_checkpoint(best_path)
    assert good_last["step"] == 3

    # Checkpoint after every step: a loop that saved before checking would overwrite last.pt.
    experiment = make_experiment(tmp_path, store=store_root, epochs=2, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError, match="step 4: loss is nan") as error:
        # A loss that turns NaN (as it would on poisoned data), from the resumed step on.
        monkeypatch.setattr(
            step_module,
            "build_loss",
            lambda *args: lambda prediction, *rest: prediction.sum() * math.nan,
        )
        run_training(experiment, resume=True)
    assert error.value.step == 4 and str(last_path) in str(error.value)
    assert_same_tensors(load_checkpoint(last_path)["model_state"], good_last["model_state"])
    assert_same_tensors(load_checkpoint(best_path)["model_state"], good_best["model_state"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_a_second_train_of_a_running_run_fails_on_its_lock(store_root, tmp_path):
    experiment = make_experiment(tmp_path, store=store_root, epochs=1)
    lock = tmp_path / "run" / RUN_LOCK
    refused = []

    def start_another(step: int) -> bool:
        if step == 1:  # the first run is between steps, no checkpoint written yet
            assert lock.is_file()
            with pytest.raises(StoreLockedError) as error:
                run_training(experiment)
            refused.append(str(error.value))
        return False

    summary = run_training(experiment, stop_requested=start_another)
    assert len(refused) == 1 and f"{lock} is held" in refused[0]
    assert f"pid {os.getpid()}" in refused[0]
    assert summary["stop_reason"] == "epochs" and summary["steps"] == 3  # undisturbed
    assert not lock.exists()

    # A lock of another live process: refused before anything is read or written.
    live = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(StoreLockedError, match=f"pid {live.pid}"):
            run_training(experiment, resume=True)
        assert lock.is_file()
    finally:
        live.kill()
        live.wait()


def test_a_too_small_disk_stops_before_a_checkpoint_is_written(store_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    experiment = make_experiment(tmp_path, store=store_root, epochs=1)
    monkeypatch.setattr("nowcast.storage.free_bytes", lambda path: 4096)
    with pytest.raises(DiskWriteError) as error:
        run_training(experiment)
    message = str(error.value)
    assert (
        str(checkpoint_path(run_dir)) in message and "free disk space for the checkpoint" in message
    )
    assert "4.0 KiB free" in message
    assert list((run_dir / "checkpoints").glob("*")) == [] and not (run_dir / RUN_LOCK).exists()

    # The estimate bounds the file written (tensors, optimizer state and metadata).
    monkeypatch.undo()
    run_training(experiment)
    path = checkpoint_path(run_dir)
    assert path.stat().st_size <= checkpoint_bytes(load_checkpoint(path))


def test_checkpoint_round_trip_with_weights_only(store_root, tmp_path):
    run_dir = tmp_path / "run"
    run_training(
        make_experiment(tmp_path, store=store_root, epochs=1, schedule="plateau", loss="mse+mae")
    )
    path = checkpoint_path(run_dir)
    checkpoint = torch.load(path, weights_only=True)
    assert set(CHECKPOINT_KEYS) <= set(checkpoint)
    assert (
        checkpoint["normalization"]
        == PatchStore.open(make_experiment(store_root).patch_store).attrs["normalization"]
    )
    assert (checkpoint["n_input_frames"], checkpoint["n_target_frames"]) == (N_INPUT, N_TARGET)
    assert checkpoint["timestep_minutes"] == 10
    assert checkpoint["config"]["loss"] == "mse+mae"
    assert checkpoint["scheduler_state"]["plateau"] is not None

    model, meta = load_model(path)
    assert not model.training
    assert_same_tensors(model.state_dict(), checkpoint["model_state"])
    assert meta["model_name"] == "convlstm" and meta["step"] == checkpoint["step"]
    assert "optimizer_state" not in meta
    frames = torch.rand(2, N_INPUT, 1, SIZE, SIZE)
    assert model(frames).shape == (2, N_TARGET, 1, SIZE, SIZE)


def test_rng_state_round_trip_with_weights_only(tmp_path):
    # The legacy global numpy generator is the one the checkpoint must restore.
    draw_numpy = np.random.rand  # noqa: NPY002
    state = capture_rng_state()
    expected = (torch.rand(3), draw_numpy(3), random.random())
    torch.save(state, tmp_path / "rng.pt")
    torch.rand(5), draw_numpy(5), random.random()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    actual = (torch.rand(3), draw_numpy(3), random.random())
    assert torch.equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
    assert actual[2] == expected[2]


# ---- distributed ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_environment(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _ddp_worker(rank: int, world_size: int, port: int, root: Path, store: Path) -> None:
    _torchrun_environment(rank, world_size, port)
    built = []
    build_model = train_module.build_model

    def keep_model(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[-1]

    train_module.build_model = keep_model  # this process only: to read its final weights
    summary = run_training(make_experiment(root, store=store, epochs=2, checkpoint_every=1))
    torch.save({"summary": summary, "state": built[0].state_dict()}, root / f"rank{rank}.pt")


def test_ddp_two_processes_gloo(store_root, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), tmp_path, store_root), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert_same_tensors(results[1]["state"], results[0]["state"])
    summaries = [result["summary"] for result in results]
    assert [s["world_size"] for s in summaries] == [2, 2]
    # 12 samples over 2 ranks: 6 each, in batches of 4 and 2, so 2 steps per epoch.
    assert [s["steps"] for s in summaries] == [4, 4]
    assert summaries[0]["checkpoints_written"] > 0 and summaries[1]["checkpoints_written"] == 0
    assert summaries[0]["val"] == summaries[1]["val"]  # reduced over both shards
    checkpoint = load_checkpoint(checkpoint_path(tmp_path / "run"))
    assert_same_tensors(checkpoint["model_state"], results[0]["state"])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "best.pt",
        "last.pt",
    ]
    assert not (tmp_path / "run" / RUN_LOCK).exists()  # rank 0 held it, and released it


def _ddp_refused_worker(rank: int, world_size: int, port: int, root: Path, store: Path) -> None:
    _torchrun_environment(rank, world_size, port)
    try:
        run_training(make_experiment(root, store=store, epochs=1))
    except StoreLockedError as error:
        (root / f"refused{rank}.txt").write_text(str(error))


def test_ddp_every_rank_stops_on_a_locked_run(store_root, tmp_path):
    lock = tmp_path / "run" / RUN_LOCK
    lock.parent.mkdir()
    live = subprocess.Popen(["sleep", "120"])  # stands for another run of this folder
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        workers = mp.spawn(
            _ddp_refused_worker,
            args=(2, _free_port(), tmp_path, store_root),
            nprocs=2,
            join=False,
        )
        deadline, finished = time.monotonic() + 120, False
        try:
            while not finished and time.monotonic() < deadline:  # join() returns at each exit
                finished = workers.join(timeout=deadline - time.monotonic())
        finally:
            for process in workers.processes:
                process.kill()  # a rank left waiting for another would hang the test otherwise
        assert finished, "a rank kept waiting after rank 0 found the run locked"
    finally:
        live.kill()
        live.wait()
    refused = [(tmp_path / f"refused{rank}.txt").read_text() for rank in (0, 1)]
    assert f"pid {live.pid}" in refused[0] and str(lock) in refused[1]
    assert lock.is_file() and not (tmp_path / "run" / "checkpoints").exists()


# ---- the real patch-store loader --------------------------------------------------------


def test_training_on_a_real_patch_store_resumes_exactly(tmp_path):
    from nowcast.patches.build import build_patches
    from nowcast.sources.ingest import ingest

    source = SourceConfig(
        name="synthetic",
        importer="synthetic",
        timestep=10,
        importer_kwargs={"shape": [64, 64], "n_frames": 36, "seed": 5, "motion": [1.5, -1.0]},
    )
    ingest(
        "synthetic",
        str(tmp_path / "cubes"),
        catalog=Catalog(sources={"synthetic": source}),
        scheduler="threads",
        progress=False,
    )

    def experiment(run: str) -> ExperimentConfig:
        return ExperimentConfig(
            name="syn",
            sources=["synthetic"],
            cube_dir=str(tmp_path / "cubes"),
            patch_dir=str(tmp_path / "patches"),
            run_dir=str(tmp_path / run),
            patches={
                "n_input_frames": 3,
                "n_target_frames": 2,
                "patch_size": 32,
                "stride": 16,
                "split_fractions": {"train": 0.6, "val": 0.2, "test": 0.2},
                "buffer_minutes": 10,
                "min_wet_fraction": 0.1,
                "max_samples_per_split": 16,
            },
            train={
                "model": TINY_MODEL,
                "epochs": None,
                "max_steps": 6,
                "batch_size": 4,
                "checkpoint_every": 2,
                # Flips/rotations are a function of (seed, epoch, sample), so an augmented run
                # resumes bit for bit too.
                "augment": True,
            },
        )

    store = build_patches(experiment("whole"), scheduler="threads", progress=False)
    whole = train(experiment("whole"), device="cpu", progress=False)
    assert whole["stop_reason"] == "max_steps" and whole["steps"] == 6
    assert 0.0 <= whole["val"]["csi_1mmh"] <= 1.0 and whole["val"]["mse_mmh"] >= 0.0

    # 16 samples, 4 steps per epoch: stop in the second epoch.
    train(experiment("split"), device="cpu", progress=False, stop_requested=lambda s: s == 5)
    train(experiment("split"), device="cpu", progress=False, resume=True)
    expected = load_checkpoint(checkpoint_path(tmp_path / "whole"))
    actual = load_checkpoint(checkpoint_path(tmp_path / "split"))
    assert_same_tensors(actual["model_state"], expected["model_state"])

    info = PatchStore.open(store).attrs
    assert info["counts"]["samples"]["train"] == 16  # so the stop above is mid-epoch 2
    assert expected["normalization"] == info["normalization"]
    assert expected["n_input_frames"] == info["n_input_frames"] == 3
    assert expected["timestep_minutes"] == info["timestep_minutes"]
    # The training grid is recorded (the synthetic source's 1 km pixels), for zero-shot reports.
    assert expected["pixel_size_m"] == {"synthetic": 1000.0}
