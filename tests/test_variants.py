"""Forecast-method variants (nowcast.nowcasts.variants): blending and probability matching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_catalog
from pysteps.postprocessing.probmatching import nonparam_match_empirical_cdf
from test_evaluate import synthetic_experiment

from nowcast.config import ConfigError
from nowcast.evaluate.scoring import score_window
from nowcast.evaluate.setup import ForecastSetup, Window
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import get_method
from nowcast.nowcasts.matching import probability_match
from nowcast.nowcasts.variants import (
    MethodSpec,
    apply_variant,
    blend_values,
    parse_variants,
)
from nowcast.sources.cube import cube_path, open_cube


def _field(seed: int, shape=(3, 40, 50), wet=0.3, scale=4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.gamma(0.8, scale, size=shape).astype(np.float32)
    values[rng.random(shape) > wet] = 0.0
    return values


def test_cdf_matching_takes_the_targets_values_and_keeps_the_ranks():
    forecast = _field(0) * 0.3 + 0.2  # a smooth, weak forecast with a drizzle floor everywhere
    target = _field(1)[0]
    matched = probability_match(forecast, target, "cdf")
    for lead in range(forecast.shape[0]):
        # The same numbers as pysteps on the whole field, and the target's sorted values.
        expected = nonparam_match_empirical_cdf(forecast[lead], target)
        np.testing.assert_allclose(matched[lead], expected, rtol=1e-6)
        # Every value is one of the target's, and the heavy tail is the target's.
        assert np.isin(matched[lead], target).all()
        top = int(0.1 * target.size)
        np.testing.assert_array_equal(
            np.sort(matched[lead].ravel())[-top:], np.sort(target.ravel())[-top:]
        )
        order = np.argsort(forecast[lead].ravel(), kind="stable")
        assert np.all(np.diff(matched[lead].ravel()[order]) >= 0)
    # The drizzle floor is gone: nothing was dry, now at least the target's share is.
    assert (forecast < 0.1).mean() == 0.0
    assert (matched < 0.1).mean() >= (target < 0.1).mean()


def test_matching_uses_only_pixels_where_both_have_data():
    forecast = _field(2)
    target = _field(3)[0]
    forecast[:, :5] = np.nan  # forecast no-data stays no-data
    target[-5:] = np.nan  # target no-data: those forecast pixels keep their values
    matched = probability_match(forecast, target, "cdf")
    assert np.isnan(matched[:, :5]).all()
    np.testing.assert_array_equal(matched[:, -5:], forecast[:, -5:])
    both = np.isfinite(forecast[0]) & np.isfinite(target)
    assert np.isin(matched[0][both], target[both]).all()
    assert matched[0][both].max() == target[both].max()


def test_mean_matching_keeps_the_wet_fraction_and_the_wet_mean():
    forecast = _field(4) * 0.5 + 0.3
    target = _field(5)[0]
    matched = probability_match(forecast, target, "mean")
    wet_target = target >= 0.1
    for lead in matched:
        assert abs((lead > 0).mean() - wet_target.mean()) < 0.01
        assert np.isclose(lead[lead > 0].mean(), target[wet_target].mean(), rtol=1e-4)


def test_blend_weights_per_lead_and_the_last_weight_repeats():
    base, other = _field(6), _field(7)
    other[:, 0, 0] = np.nan
    mixed = blend_values(base, other, [1.0, 0.25])
    np.testing.assert_array_equal(mixed[0], base[0])
    expected = 0.25 * base[1:] + 0.75 * other[1:]
    np.testing.assert_allclose(mixed[1:, 1:, 1:], expected[:, 1:, 1:], rtol=1e-6)
    np.testing.assert_array_equal(mixed[:, 0, 0], base[:, 0, 0])  # other has no data


def test_variant_config_errors_name_the_variant_and_field():
    with pytest.raises(ConfigError, match="forecast_methods.m1: unknown method 'stepz'"):
        parse_variants({"m1": {"method": "stepz"}})
    with pytest.raises(ConfigError, match="forecast_methods.m2.*postprocess.method"):
        parse_variants({"m2": {"method": "model", "postprocess": {"method": "quantile"}}})
    with pytest.raises(ConfigError, match="forecast_methods.m3.*weights"):
        parse_variants({"m3": {"method": "model", "blend": {"method": "sprog", "weights": [2]}}})
    with pytest.raises(ConfigError, match="'sprog' is a registered method"):
        parse_variants({"sprog": {"method": "model"}})
    spec = parse_variants(
        {
            "Mix": {
                "method": "model",
                "blend": {"method": "sprog", "weights": [1]},
                "postprocess": {"method": "cdf", "target": "extrapolation"},
            }
        }
    )
    assert spec["mix"].bases() == ["model", "sprog", "extrapolation"]


@pytest.fixture(scope="module")
def cube_root(tmp_path_factory) -> Path:
    from nowcast.sources.ingest import ingest

    root = tmp_path_factory.mktemp("variants")
    catalog = synthetic_catalog(n_frames=36)
    ingest("synthetic", str(root / "cubes"), catalog=catalog, scheduler="threads", progress=False)
    return root


def test_apply_variant_keeps_the_grid_and_no_data_area(cube_root):
    cube = open_cube(cube_path(str(cube_root / "cubes"), "synthetic"))
    inputs = cube_inputs(cube, cube["time"].values[10], 4).copy()
    inputs.values[:, :, :3] = np.nan  # a no-data strip
    base = get_method("persistence")(inputs, 3)
    spec = MethodSpec.model_validate({"method": "persistence", "postprocess": {"method": "cdf"}})
    result = apply_variant("persistence_cdf", spec, {"persistence": base}, inputs)
    assert result.attrs["method"] == "persistence_cdf"
    assert json.loads(result.attrs["method_config"])["postprocess"]["method"] == "cdf"
    assert result.dims == base.dims
    np.testing.assert_array_equal(result["x"], base["x"])
    assert np.isnan(result.values[:, :, :3]).all()
    np.testing.assert_array_equal(np.isfinite(result.values), np.isfinite(base.values))
    expected = probability_match(base.values, inputs.values[-1], "cdf")
    np.testing.assert_allclose(result.values, expected, rtol=1e-6)


def test_evaluate_scores_a_variant_from_its_base_forecast(cube_root, tmp_path):
    """A variant in forecast_methods is scored beside its base, built from the same forecast."""
    from nowcast.evaluate.stage import evaluate

    experiment = synthetic_experiment(
        cube_root, methods=["persistence", "persistence_cdf"], figures=False
    )
    experiment = experiment.model_copy(
        update={
            "run_dir": str(tmp_path / "run"),
            "forecast_methods": {
                "persistence_cdf": {"method": "persistence", "postprocess": {"method": "cdf"}}
            },
        }
    )
    outputs = evaluate(experiment, scheduler="threads", progress=False)
    payload = json.loads(Path(outputs["metrics_json"]).read_text())
    assert payload["forecast_methods"]["persistence_cdf"]["postprocess"]["method"] == "cdf"
    report = Path(outputs["report"]).read_text()
    assert (
        '- `persistence_cdf`: `{"method": "persistence", "postprocess": {"method": "cdf"' in report
    )
    metrics = pd.read_csv(outputs["metrics_csv"])
    assert set(metrics["method"]) == {"persistence", "persistence_cdf"}
    # CDF matching persistence to its own last frame changes nothing but ties: same MSE.
    mse = metrics[metrics["score"] == "MSE"].pivot(index="lead_time", columns="method")["value"]
    np.testing.assert_allclose(mse["persistence_cdf"], mse["persistence"], rtol=1e-4)
    # And a scored window equals the variant built by hand.
    source = payload["sources"]["synthetic"]
    window = Window("synthetic", source["cube"], np.datetime64(source["reference_times"][0]))
    setup = ForecastSetup(
        methods=("persistence_cdf",),
        method_kwargs={},
        checkpoint=None,
        device=None,
        n_input_frames=payload["n_input_frames"],
        n_leadtimes=len(payload["lead_times"]),
        timestep_minutes=payload["timestep_minutes"],
        thresholds=(1.0,),
        scales=(1,),
        variants=parse_variants(experiment.forecast_methods),
    )
    assert set(score_window(window, setup).accumulators) == {"persistence_cdf"}


def test_cli_zero_shot_scores_the_variants_of_a_config(tmp_path):
    """nowcast evaluate --source S --methods-from CONFIG: the config's variants, zero-shot."""
    import yaml
    from test_predict import residual_checkpoint
    from test_zeroshot import five_minute_catalog
    from typer.testing import CliRunner

    from nowcast.cli import app

    source = five_minute_catalog(n_frames=16).sources["synthetic"]
    (tmp_path / "catalog.yaml").write_text(
        yaml.safe_dump({"sources": {"synthetic": source.model_dump(mode="json", exclude={"name"})}})
    )
    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=3, n_target=2)
    config = {
        "name": "routes",
        "sources": ["synthetic"],
        "forecast_methods": {"model_cdf": {"method": "model", "postprocess": {"method": "cdf"}}},
        "evaluate": {"methods": ["extrapolation", "model", "model_cdf"], "checkpoint": checkpoint},
    }
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "zero"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--source",
            "synthetic",
            "--catalog",
            str(tmp_path / "catalog.yaml"),
            "--methods-from",
            str(tmp_path / "routes.yaml"),
            "--out-dir",
            str(out),
            "--cube-dir",
            str(tmp_path / "cubes"),
            "--no-figures",
            "--scheduler",
            "threads",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["method"]) == {"extrapolation", "model", "model_cdf"}
    assert {"DRY_FA", "CSI_ALLOBS"} <= set(metrics["score"])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["forecast_methods"]["model_cdf"]["postprocess"]["method"] == "cdf"
    assert summary["checkpoint"] == checkpoint
