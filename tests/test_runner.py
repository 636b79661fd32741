"""The forecast runner: one window's inputs, observations and every method, motion shared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import synthetic_catalog
from test_predict import residual_checkpoint

from nowcast.advection import motion
from nowcast.nowcasts import extrapolation, runner, sprog
from nowcast.nowcasts.runner import ForecastRun, forecast_window
from nowcast.nowcasts.variants import parse_variants
from nowcast.sources.cube import cube_path, open_cube
from nowcast.sources.ingest import ingest


@pytest.fixture(scope="module")
def cube_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cubes")
    catalog = synthetic_catalog(n_frames=30)
    ingest("synthetic", str(folder), catalog=catalog, scheduler="threads", progress=False)
    return folder


def _run(methods, **kwargs) -> ForecastRun:
    settings = dict(
        methods=tuple(methods),
        method_kwargs={},
        checkpoint=None,
        device="cpu",
        n_input_frames=3,
        n_leadtimes=4,
        timestep_minutes=10,
    )
    return ForecastRun(**{**settings, **kwargs})


@pytest.fixture
def motion_calls(monkeypatch):
    """Count the runner's motion estimates; the methods must not estimate their own."""
    calls = []

    def counted(rain_rate, *args, **kwargs):
        calls.append(rain_rate.shape)
        return motion.motion_field(rain_rate, *args, **kwargs)

    def refused(*args, **kwargs):
        raise AssertionError("a method estimated its own motion")

    monkeypatch.setattr(runner, "motion_field", counted)
    monkeypatch.setattr(extrapolation, "motion_field", refused)
    monkeypatch.setattr(sprog, "motion_field", refused)
    return calls


def test_motion_is_estimated_once_per_window_and_shared(cube_dir, motion_calls):
    cube = open_cube(cube_path(str(cube_dir), "synthetic"))
    reference = cube["time"].values[10]
    variants = parse_variants(
        {"lk_mix": {"method": "extrapolation", "blend": {"method": "sprog", "weights": [0.5]}}}
    )
    run = _run(["persistence", "extrapolation", "sprog", "lk_mix"], variants=variants)
    window = forecast_window(cube, reference, run)
    assert len(motion_calls) == 1
    np.testing.assert_array_equal(window.motion, motion.motion_field(window.inputs.values))
    assert list(window.forecasts) == ["persistence", "extrapolation", "sprog", "lk_mix"]
    assert window.reference_time == np.datetime64(reference, "ns")
    # Observations are the cube's frames after the reference time.
    np.testing.assert_array_equal(
        window.observed.values, cube["rain_rate"].isel(time=slice(11, 15)).values
    )


def test_no_motion_without_an_advecting_baseline(cube_dir, motion_calls):
    cube = open_cube(cube_path(str(cube_dir), "synthetic"))
    window = forecast_window(cube, cube["time"].values[10], _run(["persistence"]), observe=False)
    assert motion_calls == [] and window.motion is None and window.observed is None
    assert window.forecasts["persistence"].dims == ("lead_time", "y", "x")


def test_shared_motion_gives_the_values_of_each_method_alone(cube_dir):
    cube = open_cube(cube_path(str(cube_dir), "synthetic"))
    reference = cube["time"].values[12]
    together = forecast_window(cube, reference, _run(["extrapolation", "sprog"]), observe=False)
    for name in ("extrapolation", "sprog"):
        alone = forecast_window(cube, reference, _run([name]), observe=False)
        np.testing.assert_array_equal(together.forecasts[name].values, alone.forecasts[name].values)


def test_a_lagrangian_model_alone_uses_its_own_coarse_motion(cube_dir, tmp_path, motion_calls):
    from nowcast.nowcasts.model import ModelNowcast

    checkpoint = residual_checkpoint(tmp_path / "model.pt")
    model = runner.model_method(checkpoint, "cpu")
    model.frame, model.uses_motion = "lagrangian", True
    try:
        cube = open_cube(cube_path(str(cube_dir), "synthetic"))
        reference = cube["time"].values[12]
        run = _run(["model"], checkpoint=checkpoint)
        window = forecast_window(cube, reference, run, observe=False)
        assert motion_calls == [] and window.motion is None
        direct = ModelNowcast(checkpoint=checkpoint, device="cpu")
        direct.frame, direct.uses_motion = "lagrangian", True
        np.testing.assert_array_equal(
            window.forecasts["model"].values, direct(window.inputs, 4).values
        )
        # With an advecting baseline the model gets the shared full-resolution field.
        shared = forecast_window(
            cube, reference, _run(["model", "extrapolation"], checkpoint=checkpoint)
        )
        assert len(motion_calls) == 1
        np.testing.assert_array_equal(
            shared.forecasts["model"].values,
            direct(shared.inputs, 4, velocity=shared.motion).values,
        )
    finally:
        runner._cached_model.cache_clear()


def test_extra_forecast_dimensions_pass_through(cube_dir, monkeypatch):
    """A method returning (realization, lead_time, y, x) reaches the caller, variants too."""
    cube = open_cube(cube_path(str(cube_dir), "synthetic"))
    persistence = runner.get_method("persistence")

    def members(inputs, n_leadtimes, **kwargs):
        one = persistence(inputs, n_leadtimes)
        return xr.concat([one, one * 2], dim="realization").transpose("realization", ...)

    original = runner.get_method
    monkeypatch.setattr(
        runner, "get_method", lambda name: members if name == "persistence" else original(name)
    )
    variants = parse_variants(
        {"mix": {"method": "persistence", "blend": {"method": "extrapolation", "weights": [0.5]}}}
    )
    window = forecast_window(
        cube, cube["time"].values[10], _run(["persistence", "mix"], variants=variants)
    )
    assert window.forecasts["persistence"].dims == ("realization", "lead_time", "y", "x")
    mix = window.forecasts["mix"]
    assert mix.dims == ("realization", "lead_time", "y", "x")
    lk = forecast_window(cube, cube["time"].values[10], _run(["extrapolation"])).forecasts
    member = window.forecasts["persistence"].isel(realization=1).values
    expected = np.where(
        np.isfinite(lk["extrapolation"].values),
        np.float32(0.5) * member + np.float32(0.5) * lk["extrapolation"].values,
        member,
    )
    np.testing.assert_allclose(mix.isel(realization=1).values, expected, rtol=1e-6)


def test_export_and_predict_give_identical_values(tmp_path):
    from nowcast.config import ExperimentConfig
    from nowcast.export import export
    from nowcast.patches.build import build_patches
    from nowcast.predict import predict

    catalog = synthetic_catalog(n_frames=30)
    ingest(
        "synthetic", str(tmp_path / "cubes"), catalog=catalog, scheduler="threads", progress=False
    )
    checkpoint = residual_checkpoint(tmp_path / "model.pt")
    variants = {"model_cdf": {"method": "model", "postprocess": {"method": "cdf"}}}
    experiment = ExperimentConfig(
        name="syn",
        sources=["synthetic"],
        cube_dir=str(tmp_path / "cubes"),
        patch_dir=str(tmp_path / "patches"),
        run_dir=str(tmp_path / "run"),
        forecast_methods=variants,
        patches={
            "n_input_frames": 3,
            "n_target_frames": 4,
            "patch_size": 32,
            "stride": 32,
            "split_fractions": {"train": 0.3, "val": 0.3, "test": 0.4},
            "buffer_minutes": 0,
            "min_wet_fraction": 0.0,
        },
        export={
            "methods": ["model", "model_cdf"],
            "checkpoint": checkpoint,
            "max_forecasts": 2,
            "window_stride_minutes": 10,
        },
    )
    build_patches(experiment, scheduler="threads", progress=False)
    paths = sorted(export(experiment))
    assert len(paths) == 4
    for path in paths:
        with xr.open_dataset(path) as exported:
            method = exported.attrs["nowcast_method"]
            at = pd.Timestamp(exported["forecast_reference_time"].values)
            values = exported["precip_intensity"].values
        result = predict(
            "synthetic",
            checkpoint,
            at=at.to_pydatetime(),
            cube_dir=str(tmp_path / "cubes"),
            out_dir=tmp_path / "predict",
            catalog=catalog,
            method=method,
            forecast_methods=variants,
        )
        with xr.open_dataset(result.netcdf) as predicted:
            np.testing.assert_array_equal(predicted["precip_intensity"].values, values)
