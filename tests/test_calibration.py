"""Isotonic calibration of forecast intensities on the validation split."""

from __future__ import annotations

import numpy as np
import torch
from conftest import synthetic_catalog
from test_predict import residual_checkpoint

from nowcast.calibration import apply_calibration, calibrate, fit_isotonic
from nowcast.checkpoint import load_checkpoint
from nowcast.experiment import ExperimentConfig
from nowcast.ingest import ingest
from nowcast.nowcasts.model import ModelNowcast
from nowcast.patches import build_patches


def test_isotonic_curve_removes_drizzle_and_keeps_order():
    rng = np.random.default_rng(0)
    observed = np.where(rng.random(20_000) < 0.7, 0.0, rng.gamma(2.0, 3.0, 20_000))
    forecast = 1.5 * observed + 0.4 + rng.normal(0, 0.05, observed.size).clip(0)  # wet bias
    curve = fit_isotonic(forecast, observed)
    calibrated = apply_calibration(forecast.reshape(1, 100, 200), [curve]).ravel()
    assert np.mean((calibrated - observed) ** 2) < 0.2 * np.mean((forecast - observed) ** 2)
    # Frequency bias at 1 mm/h moves towards 1; the ranking of intensities is kept.
    bias = lambda f: (f > 1).sum() / (observed > 1).sum()  # noqa: E731
    assert abs(bias(calibrated) - 1) < abs(bias(forecast) - 1)
    order = np.argsort(forecast)
    assert np.all(np.diff(calibrated[order]) >= -1e-6)
    with_nan = forecast.reshape(1, 100, 200).copy()
    with_nan[0, 0, 0] = np.nan
    assert np.isnan(apply_calibration(with_nan, [curve])[0, 0, 0])


def test_calibrate_stores_curves_that_the_model_method_applies(tmp_path):
    ingest(
        "synthetic",
        str(tmp_path / "cubes"),
        catalog=synthetic_catalog(n_frames=30),
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
            "n_target_frames": 4,
            "patch_size": 32,
            "stride": 32,
            "split_fractions": {"train": 0.3, "val": 0.3, "test": 0.4},
            "buffer_minutes": 0,
            "min_wet_fraction": 0.0,
        },
    )
    build_patches(experiment, scheduler="threads", progress=False)
    checkpoint = residual_checkpoint(tmp_path / "model.pt")
    summary = calibrate(experiment, checkpoint)
    assert summary["n_windows"] > 0 and summary["n_pairs"] > 1000
    stored = load_checkpoint(checkpoint)  # still loads with weights_only=True
    assert len(stored["calibration"]) == 4
    assert all(np.all(np.diff(c["y"]) >= 0) for c in stored["calibration"])

    raw = ModelNowcast(checkpoint=checkpoint, calibrated=False)
    calibrated = ModelNowcast(checkpoint=checkpoint)
    frames = np.random.default_rng(1).gamma(1.0, 2.0, (3, 40, 40)).astype(np.float32)
    expected = apply_calibration(raw.predict_values(frames), stored["calibration"])
    np.testing.assert_allclose(calibrated.predict_values(frames), expected)
    # Re-calibrating starts from the raw model, not from the calibrated one.
    again = calibrate(experiment, checkpoint)
    assert again["n_pairs"] == summary["n_pairs"]
    for first, second in zip(
        load_checkpoint(checkpoint)["calibration"], stored["calibration"], strict=True
    ):
        np.testing.assert_allclose(first["y"], second["y"])
    assert torch.is_tensor(stored["model_state"][next(iter(stored["model_state"]))])
