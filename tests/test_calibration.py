"""Isotonic calibration of forecast intensities on the validation split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_catalog
from test_predict import residual_checkpoint

from nowcast.config import ConfigError, ExperimentConfig
from nowcast.evaluate.calibration import calibrate, calibration_path
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.isotonic import apply_calibration, fit_isotonic, load_calibration
from nowcast.nowcasts.model import ModelNowcast
from nowcast.nowcasts.variants import apply_variant, parse_variants
from nowcast.patches.build import build_patches
from nowcast.sources.cube import cube_path, open_cube
from nowcast.sources.ingest import ingest
from nowcast.storage import file_sha256
from nowcast.training.checkpoint import load_checkpoint, save_checkpoint


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


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A synthetic experiment with a patch store, a checkpoint and its calibration file."""
    tmp_path = tmp_path_factory.mktemp("calibration")
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
    before = file_sha256(checkpoint)
    summary = calibrate(experiment, checkpoint)
    return experiment, checkpoint, before, summary


def test_calibrate_writes_a_file_and_never_touches_the_checkpoint(calibrated):
    experiment, checkpoint, before, summary = calibrated
    assert file_sha256(checkpoint) == before  # checkpoints are never modified after training
    assert "calibration" not in load_checkpoint(checkpoint)
    assert summary["path"] == str(calibration_path(experiment))
    payload = json.loads(Path(summary["path"]).read_text())
    assert payload["checkpoint_sha256"] == before and payload["split"] == "val"
    assert summary["n_windows"] > 0 and summary["n_pairs"] > 1000
    curves = load_calibration(summary["path"], checkpoint)
    assert len(curves) == 4 and all(np.all(np.diff(c["y"]) >= 0) for c in curves)
    # Calibrating again fits the same curves from the raw model.
    again = calibrate(experiment, checkpoint, out=Path(summary["path"]).with_name("again.json"))
    for first, second in zip(load_calibration(again["path"], checkpoint), curves, strict=True):
        np.testing.assert_allclose(first["y"], second["y"])


def test_a_variant_applies_the_file_and_refuses_another_checkpoint(calibrated, tmp_path):
    experiment, checkpoint, _, summary = calibrated
    spec = parse_variants(
        {"iso": {"method": "model", "postprocess": {"method": "isotonic", "file": summary["path"]}}}
    )["iso"]
    cube = open_cube(cube_path(experiment.cube_root, "synthetic"))
    inputs = cube_inputs(cube, cube["time"].values[10], 3)
    raw = ModelNowcast(checkpoint=checkpoint)(inputs, 4)
    result = apply_variant("iso", spec, {"model": raw}, inputs)
    curves = load_calibration(summary["path"], checkpoint)
    np.testing.assert_allclose(result.values, apply_calibration(raw.values, curves))
    assert not np.allclose(result.values, raw.values, equal_nan=True)
    other = residual_checkpoint(
        tmp_path / "other.pt",
        n_target=4,
        model_kwargs={
            "patch_factor": 2,
            "hidden_channels": [6],
            "kernel_sizes": [3],
            "residual": True,
        },
    )
    with pytest.raises(ConfigError, match="was fitted on checkpoint sha256"):
        load_calibration(summary["path"], other)
    forecast = ModelNowcast(checkpoint=other)(inputs, 4)
    with pytest.raises(ConfigError, match="was fitted on checkpoint sha256"):
        apply_variant("iso", spec, {"model": forecast}, inputs)
    with pytest.raises(ConfigError, match="file.*isotonic"):
        parse_variants({"x": {"method": "model", "postprocess": {"method": "isotonic"}}})


def test_a_legacy_checkpoint_calibration_keeps_working_with_a_warning(calibrated, tmp_path):
    experiment, checkpoint, _, summary = calibrated
    curves = load_calibration(summary["path"], checkpoint)
    legacy = tmp_path / "legacy.pt"
    state = load_checkpoint(checkpoint)
    state["calibration"] = curves  # as calibrate stored it before calibration files
    save_checkpoint(legacy, state)
    with pytest.warns(DeprecationWarning, match="calibration stored in a checkpoint"):
        assert load_calibration(legacy, legacy) == curves
    with pytest.warns(DeprecationWarning, match="applying the isotonic calibration stored"):
        method = ModelNowcast(checkpoint=legacy)
    frames = np.random.default_rng(1).gamma(1.0, 2.0, (3, 40, 40)).astype(np.float32)
    raw = ModelNowcast(checkpoint=checkpoint).predict_values(frames)
    np.testing.assert_allclose(method.predict_values(frames), apply_calibration(raw, curves))


def test_cli_calibrate_writes_the_file_a_config_names(calibrated, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from nowcast.cli import app

    experiment, checkpoint, before, _ = calibrated
    config = tmp_path / "syn.yaml"
    config.write_text(yaml.safe_dump(experiment.model_dump(mode="json")))
    out = tmp_path / "cal.json"
    result = CliRunner().invoke(
        app, ["calibrate", str(config), "--checkpoint", checkpoint, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"postprocess: {{method: isotonic, file: {out}}}" in result.output
    assert json.loads(out.read_text())["checkpoint_sha256"] == before == file_sha256(checkpoint)
    missing = CliRunner().invoke(app, ["calibrate", str(config), "--checkpoint", "nope.pt"])
    assert missing.exit_code == 1 and "checkpoint not found: nope.pt" in missing.output


def test_predict_calibration_applies_the_file(calibrated, tmp_path):
    import xarray as xr
    from typer.testing import CliRunner

    from nowcast.cli import app

    experiment, checkpoint, _, summary = calibrated
    args = [
        "predict",
        "--source",
        "synthetic",
        "--checkpoint",
        checkpoint,
        "--cube-dir",
        experiment.cube_root,
        "--at",
        "2000-01-01T02:00",
    ]
    raw = CliRunner().invoke(app, [*args, "--out-dir", str(tmp_path / "raw")])
    iso = CliRunner().invoke(
        app, [*args, "--out-dir", str(tmp_path / "iso"), "--calibration", summary["path"]]
    )
    assert raw.exit_code == 0 and iso.exit_code == 0, raw.output + iso.output
    (raw_file,), (iso_file,) = (list((tmp_path / d).glob("*.nc")) for d in ("raw", "iso"))
    raw_values = xr.open_dataset(raw_file)["precip_intensity"].values
    expected = apply_calibration(raw_values, load_calibration(summary["path"], checkpoint))
    np.testing.assert_allclose(
        xr.open_dataset(iso_file)["precip_intensity"].values, expected, atol=1e-5
    )
