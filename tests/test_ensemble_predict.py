"""The learned ensemble as a forecast method, in predict and in the NetCDF writer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import synthetic_catalog
from test_export import cf_check
from test_predict import residual_checkpoint

from nowcast.config import ConfigError
from nowcast.models.registry import build_model
from nowcast.nowcasts import runner
from nowcast.nowcasts.forecast import ENSEMBLE_DIMS, REALIZATION
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import get_method
from nowcast.nowcasts.netcdf import netcdf_bytes, write_forecast_netcdf
from nowcast.nowcasts.probability import exceedance_probability
from nowcast.nowcasts.runner import ForecastRun, forecast_inputs
from nowcast.nowcasts.seeds import window_seed
from nowcast.patches.normalization import Normalization
from nowcast.sources.cube import open_cube
from nowcast.sources.ingest import ingest
from nowcast.training.checkpoint import TrainedOn, make_checkpoint, save_checkpoint
from nowcast.windows import FrameSpec

pytestmark = pytest.mark.usefixtures("single_torch_thread")

N_INPUT, N_TARGET = 3, 4
AT = pd.Timestamp("2000-01-01T01:00")
STOCHASTIC_KWARGS = {
    "patch_factor": 2,
    "hidden_channels": [4],
    "kernel_sizes": [3],
    "noise_channels": 2,
    "noise_scale_pixels": 8,
}


def stochastic_checkpoint(path, frame: str = "lagrangian", perturbed: bool = True) -> str:
    """An untrained stochastic ConvLSTM whose zero-initialized head is perturbed (unless not
    ``perturbed``), so the noise reaches the output and members differ."""
    torch.manual_seed(0)
    model = build_model("stochastic_convlstm", N_INPUT, N_TARGET, **STOCHASTIC_KWARGS)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.head.parameters() if perturbed else []:
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    checkpoint = make_checkpoint(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        scheduler_state={},
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        config={},
        experiment="test",
        model_name="stochastic_convlstm",
        model_kwargs=STOCHASTIC_KWARGS,
        trained_on=TrainedOn(
            Normalization("log1p", {"scale": 4.0}),
            FrameSpec(N_INPUT, N_TARGET, 10),
            reference_frame=frame,
        ),
        step=0,
        epoch=0,
        batch_index=0,
        best_metric=float("inf"),
    )
    save_checkpoint(path, checkpoint)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic cube (64 x 64, a circular radar range), its inputs at AT and checkpoints."""
    root = tmp_path_factory.mktemp("ensemble")
    catalog = synthetic_catalog(n_frames=12)
    ingest("synthetic", str(root / "cubes"), catalog=catalog, scheduler="threads", progress=False)
    inputs = cube_inputs(open_cube(root / "cubes" / "synthetic.zarr"), AT, N_INPUT)
    return SimpleNamespace(
        root=root,
        catalog=catalog,
        inputs=inputs,
        stochastic=stochastic_checkpoint(root / "stochastic.pt"),
        deterministic=residual_checkpoint(root / "deterministic.pt"),
    )


def ensemble(setup, **kwargs) -> xr.DataArray:
    return get_method("ensemble")(checkpoint=setup.stochastic)(setup.inputs, N_TARGET, **kwargs)


def wet_centroid(field: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    rows, columns = np.nonzero(np.nan_to_num(field) >= threshold)
    return np.array([rows.mean(), columns.mean()])


def test_the_ensemble_method_forecasts_members_in_the_forecast_contract(setup):
    run = ForecastRun(
        methods=("ensemble", "extrapolation"),
        method_kwargs={"ensemble": {"checkpoint": setup.stochastic, "n_members": 3}},
        checkpoint=None,
        device="cpu",
        n_input_frames=N_INPUT,
        n_leadtimes=N_TARGET,
        timestep_minutes=10,
    )
    window = forecast_inputs(setup.inputs, run)
    forecast = window.forecasts["ensemble"]
    assert forecast.dims == ENSEMBLE_DIMS and forecast.dtype == np.float32
    assert forecast.sizes == {REALIZATION: 3, "lead_time": N_TARGET, "y": 64, "x": 64}
    np.testing.assert_array_equal(forecast[REALIZATION].values, [0, 1, 2])
    deterministic = window.forecasts["extrapolation"]
    for name in ("lead_time", "time", "forecast_reference_time", "y", "x"):
        np.testing.assert_array_equal(forecast[name].values, deterministic[name].values)
    assert forecast.attrs["method"] == "ensemble"
    assert forecast.attrs["window_seed"] == window_seed(0, "synthetic", AT)
    # The last input frame's no-data area (outside the radar range) in every member and lead.
    no_data = np.isnan(setup.inputs.values[-1])
    assert no_data.any()
    np.testing.assert_array_equal(
        np.isnan(forecast.values), np.broadcast_to(no_data, (3, 4, 64, 64))
    )
    assert (forecast.values[:, :, ~no_data] >= 0).all()
    # The shared full-resolution motion reached the model, as for extrapolation.
    assert window.motion is not None
    alone = ensemble(setup, n_members=3)
    np.testing.assert_allclose(forecast.values, alone.values, atol=1e-3)


def test_members_differ_in_intensity_and_in_position(setup):
    forecast = ensemble(setup, n_members=4)
    last = forecast.isel(lead_time=-1).values
    for member in range(1, 4):
        assert np.nanmax(np.abs(last[member] - last[0])) > 0.5
    # Each member moves along its own bps-perturbed motion: the wet areas' centroids part.
    centroids = np.array([wet_centroid(field) for field in last])
    spread = np.abs(centroids - centroids.mean(axis=0)).max()
    assert spread > 0.5, centroids
    # A member's position does not follow from another's: the wet masks differ.
    wet = np.nan_to_num(last) >= 1.0
    assert (wet[0] != wet[1]).sum() > 10


def test_members_of_an_untrained_model_differ_in_position_only(setup, tmp_path):
    """With the head at zero every member is the last frame in the Lagrangian frame: they differ
    only by their bps-perturbed motions, more and more with lead time."""
    checkpoint = stochastic_checkpoint(tmp_path / "zero.pt", perturbed=False)
    forecast = get_method("ensemble")(checkpoint=checkpoint)(setup.inputs, N_TARGET, n_members=4)
    values = np.nan_to_num(forecast.values)
    spread = []
    for lead in range(N_TARGET):
        centroids = np.array([wet_centroid(member) for member in values[:, lead]])
        spread.append(np.abs(centroids - centroids.mean(axis=0)).max())
        # The same rain moved: the wet areas keep their size to a few edge pixels.
        areas = (values[:, lead] >= 1.0).sum(axis=(1, 2))
        assert areas.max() - areas.min() <= 0.2 * areas.max()
    assert spread[-1] > 1.0 and spread[-1] > spread[0], spread


def test_the_same_seed_gives_the_same_members_and_another_seed_others(setup):
    first = ensemble(setup, n_members=3, seed=7)
    # A new method object (the checkpoint loaded again) draws the same members.
    again = get_method("ensemble")(checkpoint=setup.stochastic, seed=7)(
        setup.inputs, N_TARGET, n_members=3
    )
    np.testing.assert_array_equal(first.values, again.values)
    assert first.attrs["window_seed"] == window_seed(7, "synthetic", AT)
    other = ensemble(setup, n_members=3, seed=8)
    assert not np.allclose(first.values, other.values, equal_nan=True)
    # Member j is the same whatever the number of members after it.
    more = ensemble(setup, n_members=5, seed=7, member_batch=3)
    np.testing.assert_array_equal(more.values[:3], first.values)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_member_batches_give_the_same_members(setup):
    one = ensemble(setup, n_members=4, member_batch=1)
    four = ensemble(setup, n_members=4, member_batch=4)
    # oneDNN's convolutions round differently for other batch sizes: the same to float rounding.
    np.testing.assert_allclose(one.values, four.values, rtol=1e-5, atol=1e-4)
    # With batch-invariant convolutions the members are the same bit for bit: the noise and the
    # motion perturbations do not depend on the member batches.
    with torch.backends.mkldnn.flags(enabled=False):
        one = ensemble(setup, n_members=4, member_batch=1)
        four = ensemble(setup, n_members=4, member_batch=4)
    np.testing.assert_array_equal(one.values, four.values)


def test_an_eulerian_stochastic_model_gives_members_too(setup, tmp_path):
    method = get_method("ensemble")(checkpoint=stochastic_checkpoint(tmp_path / "e.pt", "eulerian"))
    forecast = method(setup.inputs, N_TARGET, n_members=2)
    assert forecast.sizes[REALIZATION] == 2 and not method.uses_motion
    assert not np.allclose(forecast.values[0], forecast.values[1], equal_nan=True)


def test_a_deterministic_checkpoint_is_unchanged_and_not_an_ensemble(setup, monkeypatch):
    model = get_method("model")(checkpoint=setup.deterministic)
    forecast = model(setup.inputs, N_TARGET)
    assert forecast.dims == ("lead_time", "y", "x") and not model.stochastic
    # The untrained residual model is persistence of the last frame.
    last = np.broadcast_to(setup.inputs.values[-1], forecast.shape)
    np.testing.assert_allclose(forecast.values, last, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="is deterministic; the ensemble method needs"):
        get_method("ensemble")(checkpoint=setup.deterministic)
    # Without a checkpoint the ensemble is the packaged one; when that is missing, one line.
    monkeypatch.setattr(runner, "PRETRAINED_ENSEMBLE", Path(setup.deterministic).parent / "none.pt")
    run = ForecastRun(("ensemble",), {}, None, "cpu", N_INPUT, N_TARGET, 10)
    with pytest.raises(ConfigError, match="needs method_kwargs.*none.pt is missing"):
        forecast_inputs(setup.inputs, run)


def test_an_ensemble_netcdf_round_trip_is_exact_and_cf_clean(setup, tmp_path):
    forecast = ensemble(setup, n_members=3)
    assert np.isnan(forecast.values).any()
    path = write_forecast_netcdf(
        forecast, tmp_path / "ensemble.nc", {"checkpoint_sha256": "0f" * 32}
    )
    with xr.open_dataset(path) as ds:
        ds.load()
    read = ds["precip_intensity"]
    assert read.dims == ENSEMBLE_DIMS and read.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(read.values), np.isnan(forecast.values))
    np.testing.assert_array_equal(read.values, forecast.values)
    for name in (REALIZATION, "lead_time", "time", "forecast_reference_time", "x", "y"):
        assert ds[name].dtype == forecast[name].dtype, name
        np.testing.assert_array_equal(ds[name].values, forecast[name].values)
    assert ds[REALIZATION].attrs["standard_name"] == "realization"
    assert read.encoding["chunksizes"] == (1, 1, 64, 64)
    probability = ds["exceedance_probability"]
    assert probability.dims == ("threshold", "lead_time", "y", "x")
    assert probability.attrs["units"] == "1" and "standard_name" not in probability.attrs
    assert ds["threshold"].attrs["units"] == "mm h-1"
    np.testing.assert_array_equal(ds["threshold"].values, [1.0, 5.0, 10.0])
    expected = exceedance_probability(forecast)
    np.testing.assert_array_equal(probability.values, expected.values)
    report = cf_check(Path(path))
    assert re.search(r"ERRORS detected: 0\b", report), report
    assert re.search(r"WARNINGS given: 0\b", report), report
    # The free-space estimate counts the members and the probabilities.
    one = forecast.isel(realization=0, drop=True)
    fields = 3 - 1 + 3  # two more members, three thresholds
    assert netcdf_bytes(forecast) - netcdf_bytes(one) == fields * 4 * 64 * 64 * 4 + 3 * 4 + 3 * 8
    assert Path(path).stat().st_size < netcdf_bytes(forecast)


def run_cli(args):
    from typer.testing import CliRunner

    from nowcast.cli import app

    return CliRunner().invoke(app, args)


def predict_args(setup, out: Path, checkpoint: str, members: int) -> list[str]:
    return [
        "predict",
        "--source",
        "synthetic",
        "--at",
        AT.isoformat(),
        "--cube-dir",
        str(setup.root / "cubes"),
        "--out-dir",
        str(out),
        "--checkpoint",
        checkpoint,
        "--members",
        str(members),
    ]


def test_predict_members_writes_the_ensemble_its_probabilities_and_their_map(
    setup, tmp_path, monkeypatch
):
    from nowcast.sources import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "load_catalog", lambda *args, **kwargs: setup.catalog)
    result = run_cli(predict_args(setup, tmp_path / "out", setup.stochastic, 3))
    assert result.exit_code == 0, result.output
    netcdf = tmp_path / "out" / "synthetic_20000101T0100Z.nc"
    with xr.open_dataset(netcdf) as ds:
        ds.load()
    assert ds["precip_intensity"].dims[0] == REALIZATION and ds.sizes[REALIZATION] == 3
    assert ds.attrs["nowcast_method"] == "ensemble"
    assert json.loads(ds.attrs["config"])["members"] == 3
    # The members are the ensemble method's, and the probabilities are theirs.
    expected = ensemble(setup, n_members=3)
    np.testing.assert_array_equal(ds["precip_intensity"].values, expected.values)
    probability = exceedance_probability(ds["precip_intensity"])
    np.testing.assert_array_equal(ds["exceedance_probability"].values, probability.values)
    values = ds["exceedance_probability"].values
    assert np.nanmin(values) >= 0 and np.nanmax(values) <= 1
    report = cf_check(netcdf)
    assert re.search(r"ERRORS detected: 0\b", report) and re.search(r"WARNINGS given: 0\b", report)
    manifest = json.loads((tmp_path / "out" / "synthetic_20000101T0100Z.json").read_text())
    probability_map = "synthetic_20000101T0100Z_p10.png"
    assert probability_map in manifest["files"] and manifest["method"] == "ensemble"
    assert (tmp_path / "out" / probability_map).stat().st_size > 1000
    assert f"probability map: {tmp_path / 'out' / probability_map}" in result.output


@pytest.mark.parametrize(
    ("members", "checkpoint", "code", "words"),
    [
        (0, "stochastic", 2, "--members 0: give at least 1 member"),
        (-3, "stochastic", 2, "--members -3: give at least 1 member"),
        (3, "deterministic", 1, "is a deterministic model ('convlstm')"),
    ],
)
def test_predict_refuses_members_below_one_and_a_deterministic_ensemble(
    setup, tmp_path, members, checkpoint, code, words
):
    args = predict_args(setup, tmp_path / "out", getattr(setup, checkpoint), members)
    result = run_cli(args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_predict_refuses_an_ensemble_that_will_not_fit_in_memory(setup, tmp_path, monkeypatch):
    import psutil

    from nowcast.predict import predict

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=10 * 2**20))
    with pytest.raises(ConfigError) as raised:
        predict(
            "synthetic",
            setup.stochastic,
            at=AT.to_pydatetime(),
            cube_dir=str(setup.root / "cubes"),
            out_dir=tmp_path / "out",
            catalog=setup.catalog,
            members=1000,
        )
    message = str(raised.value)
    assert "\n" not in message and "predict --members 1000" in message
    estimate = int(re.search(r"an estimated (\d+) bytes", message).group(1))
    assert estimate > 1000 * N_TARGET * 64 * 64 * 4  # at least the members themselves
    assert "10.0 MiB" in message or "10 MiB" in message, message
    assert not (tmp_path / "out").exists()


def test_predict_one_member_of_a_deterministic_model_is_its_forecast(setup, tmp_path):
    from nowcast.predict import predict

    kwargs = dict(at=AT.to_pydatetime(), cube_dir=str(setup.root / "cubes"), catalog=setup.catalog)
    one = predict("synthetic", setup.deterministic, out_dir=tmp_path / "one", members=1, **kwargs)
    plain = predict("synthetic", setup.deterministic, out_dir=tmp_path / "plain", **kwargs)
    assert plain.probability_png is None and one.probability_png is not None
    with xr.open_dataset(one.netcdf) as ensemble_ds, xr.open_dataset(plain.netcdf) as ds:
        assert (
            ensemble_ds["precip_intensity"].dims == ENSEMBLE_DIMS
            and "exceedance_probability" in ensemble_ds
        )
        assert (
            ds["precip_intensity"].dims == ("lead_time", "y", "x")
            and "exceedance_probability" not in ds
        )
        np.testing.assert_array_equal(
            ensemble_ds["precip_intensity"].values[0], ds["precip_intensity"].values
        )
        probability = ensemble_ds["exceedance_probability"].values
        assert set(np.unique(probability[np.isfinite(probability)])) <= {0.0, 1.0}


def test_the_export_stage_writes_the_learned_ensemble(setup, tmp_path):
    from nowcast.config import ExperimentConfig
    from nowcast.export import export
    from nowcast.patches.build import build_patches

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
            "n_input_frames": N_INPUT,
            "n_target_frames": N_TARGET,
            "patch_size": 32,
            "stride": 32,
            "split_fractions": {"train": 0.3, "val": 0.3, "test": 0.4},
            "buffer_minutes": 0,
            "min_wet_fraction": 0.0,
        },
        export={
            "methods": ["ensemble"],
            "method_kwargs": {"ensemble": {"checkpoint": setup.stochastic, "n_members": 2}},
            "max_forecasts": 1,
        },
    )
    build_patches(experiment, scheduler="threads", progress=False)
    (path,) = export(experiment)
    with xr.open_dataset(path) as ds:
        assert ds["precip_intensity"].dims == ENSEMBLE_DIMS and ds.sizes[REALIZATION] == 2
        assert ds["exceedance_probability"].dims == ("threshold", "lead_time", "y", "x")
        assert ds.attrs["nowcast_method"] == "ensemble"
        assert len(ds.attrs["ensemble_checkpoint_sha256"]) == 64


def _with_training(path, source: str, matching: str | None) -> str:
    """The stochastic checkpoint as if trained on ``source``, with ``unseen_radar_matching``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["pixel_size_m"] = {source: 1000.0}
    if matching is not None:
        state["unseen_radar_matching"] = matching
    target = Path(path).with_name(f"trained_on_{source}_{matching}.pt")
    save_checkpoint(target, state)
    return str(target)


def _assert_matched_to(members: np.ndarray, raw: np.ndarray, last: np.ndarray) -> None:
    """Each lead's members, pooled, have ``last``'s values and keep the raw members' order."""
    np.testing.assert_array_equal(np.isfinite(members), np.isfinite(raw))
    assert not np.allclose(np.nan_to_num(members), np.nan_to_num(raw))
    for lead in range(members.shape[1]):
        pooled = members[:, lead]
        both = np.isfinite(pooled) & np.isfinite(last)[None]
        target = np.broadcast_to(last, pooled.shape)[both]
        np.testing.assert_allclose(np.sort(pooled[both]), np.sort(target), rtol=1e-6)
        # Monotone in the raw values (ties, such as the dry zeros, take any of their values).
        levels, group = np.unique(raw[:, lead][both], return_inverse=True)
        highest = np.full(levels.size, -np.inf)
        lowest = np.full(levels.size, np.inf)
        np.maximum.at(highest, group, pooled[both])
        np.minimum.at(lowest, group, pooled[both])
        assert levels.size > 10 and np.all(highest[:-1] <= lowest[1:] + 1e-6)


def test_auto_matching_applies_on_a_radar_the_checkpoint_was_not_trained_on(setup):
    """probability_matching="auto": the checkpoint's unseen_radar_matching off its own radars."""
    raw = ensemble(setup, n_members=3, probability_matching="none")
    last = setup.inputs.values[-1]
    elsewhere = get_method("ensemble")(checkpoint=_with_training(setup.stochastic, "bom", "cdf"))
    matched = elsewhere(setup.inputs, N_TARGET, n_members=3)
    assert matched.attrs["probability_matching"] == "cdf"
    _assert_matched_to(matched.values, raw.values, last)
    # On its own radar, or without a recorded choice, the members are left as they are.
    for source, matching in (("synthetic", "cdf"), ("bom", None)):
        method = get_method("ensemble")(
            checkpoint=_with_training(setup.stochastic, source, matching)
        )
        forecast = method(setup.inputs, N_TARGET, n_members=3)
        assert forecast.attrs["probability_matching"] == "none"
        np.testing.assert_array_equal(forecast.values, raw.values)
    # An explicit setting overrides the checkpoint's, either way.
    kept = elsewhere(setup.inputs, N_TARGET, n_members=3, probability_matching="none")
    np.testing.assert_array_equal(kept.values, raw.values)
    with pytest.raises(ValueError, match="probability_matching must be one of auto, none"):
        elsewhere(setup.inputs, N_TARGET, n_members=3, probability_matching="quantile")


@pytest.fixture(scope="module")
def grown(setup):
    """The deterministic checkpoint with every weight perturbed: an untrained residual model is
    persistence, whose values already are the last frame's."""
    state = torch.load(setup.deterministic, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for name, tensor in state["model_state"].items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            state["model_state"][name] = tensor + 0.1 * noise
    path = setup.root / "grown.pt"
    save_checkpoint(path, state)
    return str(path)


def test_auto_matching_of_a_deterministic_model_off_its_training_radar(setup, grown):
    """The deterministic model follows the same rule: one lead at a time, to the last frame."""
    raw = get_method("model")(checkpoint=grown)(setup.inputs, N_TARGET)
    assert raw.attrs["probability_matching"] == "none"
    elsewhere = get_method("model")(checkpoint=_with_training(grown, "bom", "cdf"))
    matched = elsewhere(setup.inputs, N_TARGET)
    assert matched.attrs["probability_matching"] == "cdf" and matched.dims == raw.dims
    _assert_matched_to(matched.values[None], raw.values[None], setup.inputs.values[-1])
    own = get_method("model")(checkpoint=_with_training(grown, "synthetic", "cdf"))
    np.testing.assert_array_equal(own(setup.inputs, N_TARGET).values, raw.values)
    kept = elsewhere(setup.inputs, N_TARGET, probability_matching="none")
    np.testing.assert_array_equal(kept.values, raw.values)


def test_predict_members_matched_to_the_last_frame_take_its_distribution(
    setup, tmp_path, monkeypatch
):
    """--probability-matching cdf: every lead's members, pooled, take the last frame's values."""
    from nowcast.sources import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "load_catalog", lambda *args, **kwargs: setup.catalog)
    args = predict_args(setup, tmp_path / "out", setup.stochastic, 3)
    result = run_cli([*args, "--probability-matching", "cdf"])
    assert result.exit_code == 0, result.output
    with xr.open_dataset(tmp_path / "out" / "synthetic_20000101T0100Z.nc") as ds:
        members = ds["precip_intensity"].load()
        config = json.loads(ds.attrs["config"])
    assert config["members"] == 3 and config["probability_matching"] == "cdf"
    raw = ensemble(setup, n_members=3)
    _assert_matched_to(members.values, raw.values, setup.inputs.values[-1])


def test_predict_matches_a_deterministic_forecast_on_request(setup, grown, tmp_path, monkeypatch):
    from nowcast.sources import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "load_catalog", lambda *args, **kwargs: setup.catalog)
    args = predict_args(setup, tmp_path / "out", grown, 3)
    args = args[: args.index("--members")]
    result = run_cli([*args, "--probability-matching", "cdf"])
    assert result.exit_code == 0, result.output
    assert "forecast matched to the last frame (cdf)" in result.output
    # On its own radar, by default, the model is left as it is, and no line says otherwise.
    plain = run_cli([*args[: args.index("--out-dir") + 1], str(tmp_path / "plain"), *args[-2:]])
    assert plain.exit_code == 0 and "matched" not in plain.output, plain.output
    with xr.open_dataset(tmp_path / "out" / "synthetic_20000101T0100Z.nc") as ds:
        forecast = ds["precip_intensity"].load()
        config = json.loads(ds.attrs["config"])
    assert forecast.dims == ("lead_time", "y", "x") and config["probability_matching"] == "cdf"
    raw = get_method("model")(checkpoint=grown)(setup.inputs, N_TARGET)
    _assert_matched_to(forecast.values[None], raw.values[None], setup.inputs.values[-1])


def test_predict_refuses_matching_a_variant_that_declares_its_own(setup, tmp_path):
    from nowcast.predict import predict

    variant = {"model_mean": {"method": "model", "postprocess": {"method": "mean"}}}
    with pytest.raises(
        ConfigError,
        match="--probability-matching cdf with --method model_mean: a variant declares",
    ):
        predict(
            "synthetic",
            setup.deterministic,
            at=AT.to_pydatetime(),
            cube_dir=str(setup.root / "cubes"),
            catalog=setup.catalog,
            out_dir=tmp_path / "out",
            method="model_mean",
            forecast_methods=variant,
            probability_matching="cdf",
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("checkpoint", "members", "words"),
    [
        ("stochastic", "3", "--probability-matching quantile: give one of auto, none, cdf, mean"),
        ("deterministic", None, "--probability-matching quantile: give one of auto, none"),
    ],
)
def test_predict_refuses_a_matching_it_cannot_apply(setup, tmp_path, checkpoint, members, words):
    args = predict_args(setup, tmp_path / "out", getattr(setup, checkpoint), 3)
    if members is None:
        args = args[: args.index("--members")]
    result = run_cli([*args, "--probability-matching", "quantile"])
    lines = result.output.strip().splitlines()
    assert result.exit_code in (1, 2) and len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_counts_the_matching_of_members(setup):
    from nowcast.predict.issue import check_ensemble_memory

    model = get_method("ensemble")(checkpoint=setup.stochastic)
    plain = check_ensemble_memory(model, 20, 4, N_TARGET, (2200, 1900))
    matched = check_ensemble_memory(model, 20, 4, N_TARGET, (2200, 1900), matched=True)
    # One more copy of a lead's 20 members in float32 and their pooled sort.
    assert matched - plain >= 20 * 2200 * 1900 * (4 + 8)
