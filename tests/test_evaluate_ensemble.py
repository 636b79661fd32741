"""Probabilistic scores of the evaluate stage (nowcast.evaluate.ensemble): STEPS beside
persistence (and lagrangian_probability) on the small synthetic source, with 4 members and 3
lead times on 2 windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import synthetic_catalog
from pysteps.verification.probscores import CRPS_accum, CRPS_compute, CRPS_init

from nowcast.config import ConfigError, ExperimentConfig, stage_config
from nowcast.evaluate.ensemble import (
    ENSEMBLE_CURVE_COLUMNS,
    accumulate_ensemble_scores,
    stack_ensemble,
)
from nowcast.evaluate.scoring import cube_windows
from nowcast.evaluate.setup import EvaluateConfig, Window, WindowScores
from nowcast.evaluate.stage import evaluate, plan_evaluation
from nowcast.evaluate.tables import METRIC_COLUMNS
from nowcast.nowcasts import steps as steps_module
from nowcast.nowcasts.forecast import ensemble_mean, make_ensemble_forecast
from nowcast.nowcasts.runner import forecast_window
from nowcast.sources.cube import open_cube
from nowcast.sources.ingest import ingest

N_TARGET, MEMBERS = 3, 4
LEAD_TIMES = [10.0, 20.0, 30.0]
PROBABILITY_THRESHOLDS = [1.0, 5.0, 10.0]
PATCHES = {
    "n_input_frames": 4,
    "n_target_frames": N_TARGET,
    "patch_size": 32,
    "stride": 32,
    "split_fractions": {"train": 0.4, "val": 0.2, "test": 0.4},
    "buffer_minutes": 0,
}
EVALUATE = {
    "members": MEMBERS,
    "window_stride": 1,
    "max_windows": 2,
    "n_bootstrap": 50,
    "thresholds": [1.0],
    "fss_scales": [1],
    "figures": False,
    "map_lead_times": [30],
    "animate": False,
}


def ensemble_experiment(root: Path, name: str, **evaluate) -> ExperimentConfig:
    """Windows come from the cube (no patch store); outputs in ``root/name``."""
    return ExperimentConfig(
        name=name,
        sources=["synthetic"],
        cube_dir=str(root / "cubes"),
        patch_dir=str(root / "patches"),
        run_dir=str(root / name),
        patches=PATCHES,
        evaluate={**EVALUATE, **evaluate},
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate_ensemble")
    catalog = synthetic_catalog(n_frames=24)
    ingest("synthetic", str(root / "cubes"), catalog=catalog, scheduler="threads", progress=False)
    return root


@pytest.fixture(scope="module")
def evaluated(root):
    experiment = ensemble_experiment(root, "steps", methods=["persistence", "steps"])
    return experiment, evaluate(experiment, scheduler="threads", progress=False)


@pytest.fixture(scope="module")
def ensemble_metrics(evaluated) -> pd.DataFrame:
    return pd.read_csv(evaluated[1]["ensemble_metrics_csv"])


def _rows(table: pd.DataFrame, method: str, score: str) -> pd.DataFrame:
    chosen = table[(table["method"] == method) & (table["score"] == score)]
    return chosen.sort_values(["lead_time", "threshold", "scale"])


def test_crps_of_both_methods_and_a_deterministic_crps_is_its_mae(evaluated, ensemble_metrics):
    _, outputs = evaluated
    assert tuple(ensemble_metrics.columns) == METRIC_COLUMNS
    assert set(ensemble_metrics["n_starts"]) == {2}
    metrics = pd.read_csv(outputs["metrics_csv"])
    for method in ("persistence", "steps"):
        crps = _rows(ensemble_metrics, method, "CRPS")
        assert crps["lead_time"].tolist() == LEAD_TIMES
        assert (crps["value"] > 0).all()
        pooled = _rows(ensemble_metrics, method, "CRPS_POOLED")
        assert sorted(set(pooled["scale"])) == [1.0, 4.0, 16.0]
        # k = 1 pooling is no pooling.
        at_one = pooled[pooled["scale"] == 1.0]["value"].to_numpy()
        np.testing.assert_allclose(at_one, crps["value"].to_numpy(), rtol=1e-12)
    mae = _rows(metrics, "persistence", "MAE")["value"].to_numpy()
    crps = _rows(ensemble_metrics, "persistence", "CRPS")
    np.testing.assert_allclose(crps["value"].to_numpy(), mae, rtol=1e-5)
    # A deterministic method gets no ensemble-only scores (its member CSI is its CSI, and its
    # CRPS is compared with the ensemble's).
    persistence = set(ensemble_metrics[ensemble_metrics["method"] == "persistence"]["score"])
    assert persistence == {"CRPS", "CRPS_POOLED", "BRIER", "MEMBER_CSI", "CRPS_DIFF"}
    finite = ensemble_metrics[np.isfinite(ensemble_metrics["value"])]
    assert (finite["ci_low"] <= finite["value"] + 1e-12).all()
    assert (finite["value"] <= finite["ci_high"] + 1e-12).all()


def _windows_forecast(experiment: ExperimentConfig):
    """The evaluated windows' forecasts, made as the evaluation makes them."""
    table, info = cube_windows(experiment, "test")
    eval_config = stage_config(experiment, "evaluate", EvaluateConfig)
    plan = plan_evaluation(experiment, eval_config, table, info)
    for window in plan.windows:
        yield forecast_window(open_cube(window.cube_path), window.reference_time, plan.setup)


def test_steps_scores_equal_pysteps_and_its_tables_use_the_ensemble_mean(
    evaluated, ensemble_metrics
):
    experiment, outputs = evaluated
    metrics = pd.read_csv(outputs["metrics_csv"])
    crps = [CRPS_init() for _ in LEAD_TIMES]
    squared, counts = np.zeros(N_TARGET), np.zeros(N_TARGET)
    for window in _windows_forecast(experiment):
        ensemble = window.forecasts["steps"]
        assert ensemble.sizes["realization"] == MEMBERS
        mean = ensemble_mean(ensemble).values
        observed = window.observed.values
        valid = np.isfinite(observed) & np.isfinite(mean)
        valid &= np.isfinite(window.forecasts["persistence"].values)
        for lead in range(N_TARGET):
            truth = np.where(valid[lead], observed[lead], np.nan)
            CRPS_accum(crps[lead], ensemble.values[:, lead], truth)
            error = (mean[lead] - observed[lead])[valid[lead]].astype(np.float64)
            squared[lead] += np.square(error).sum()
            counts[lead] += error.size
    expected = [CRPS_compute(c) for c in crps]
    np.testing.assert_allclose(_rows(ensemble_metrics, "steps", "CRPS")["value"], expected)
    mse = _rows(metrics, "steps", "MSE")["value"].to_numpy()
    np.testing.assert_allclose(mse, squared / counts, rtol=1e-5)


def test_ensemble_scores_and_curves_of_steps(evaluated, ensemble_metrics):
    _, outputs = evaluated
    for score in ("RANK_KL", "SPREAD_SKILL"):
        rows = _rows(ensemble_metrics, "steps", score)
        assert rows["lead_time"].tolist() == LEAD_TIMES
        assert (rows["value"] > 0).all() and rows["threshold"].isna().all()
    for score in ("ROC_AREA", "BRIER"):
        rows = _rows(ensemble_metrics, "steps", score)
        assert sorted(set(rows["threshold"])) == PROBABILITY_THRESHOLDS
        assert len(rows) == 3 * len(LEAD_TIMES)
    area = _rows(ensemble_metrics, "steps", "ROC_AREA")["value"]
    assert (area[np.isfinite(area)] > 0.5).all()

    curves = pd.read_csv(outputs["ensemble_curves_csv"])
    assert tuple(curves.columns) == ENSEMBLE_CURVE_COLUMNS
    assert set(curves["method"]) == {"steps"}
    histogram = curves[curves["curve"] == "RANK_HISTOGRAM"]
    assert sorted(set(histogram["point"])) == list(range(MEMBERS + 1))
    for _, at_lead in histogram.groupby("lead_time"):
        np.testing.assert_allclose(at_lead["y"].sum(), 1.0)
    for curve in ("ROC", "RELIABILITY"):
        assert sorted(set(curves[curves["curve"] == curve]["threshold"])) == PROBABILITY_THRESHOLDS
    assert {"RAPSD_FORECAST", "RAPSD_OBSERVED"} <= set(curves["curve"])

    summary = json.loads(Path(outputs["metrics_json"]).read_text())
    assert summary["probabilistic"]["members"] == {"persistence": 1, "steps": MEMBERS}
    assert summary["config"]["members"] == MEMBERS


def test_report_has_the_probabilistic_section(evaluated):
    report = Path(evaluated[1]["report"]).read_text()
    assert "### Probabilistic scores" in report
    assert f"`steps` has {MEMBERS} members" in report
    section = report[report.index("### Probabilistic scores") :]
    assert "#### CRPS (mm/h)\n\n| lead time (min) | persistence | steps |" in section
    for heading in ("Spread/skill ratio", "Rank-histogram divergence", "ROC area", "Brier score"):
        assert f"#### {heading}" in section
    assert "| steps, ≥ 10 mm/h |" in section
    assert "`steps` forecast every window." in section
    assert "`ensemble_metrics.csv`" in report


def test_a_rerun_on_another_schedule_gives_identical_tables(root, evaluated):
    _, first = evaluated
    experiment = ensemble_experiment(root, "rerun", methods=["persistence", "steps"])
    second = evaluate(experiment, scheduler="processes", progress=False)
    for key in ("ensemble_metrics_csv", "ensemble_curves_csv", "metrics_csv"):
        assert Path(second[key]).read_bytes() == Path(first[key]).read_bytes()


def test_lagrangian_probability_gives_the_brier_skill_score_and_the_figures(root):
    methods = ["persistence", "steps", "lagrangian_probability"]
    experiment = ensemble_experiment(root, "lagrangian", methods=methods, figures=True)
    outputs = evaluate(experiment, scheduler="threads", progress=False)
    table = pd.read_csv(outputs["ensemble_metrics_csv"])
    reference = _rows(table, "lagrangian_probability", "BRIER")
    assert set(table[table["method"] == "lagrangian_probability"]["score"]) == {"BRIER"}
    for method in ("persistence", "steps"):
        skill = _rows(table, method, "BSS")
        assert sorted(set(skill["threshold"])) == PROBABILITY_THRESHOLDS
        brier = _rows(table, method, "BRIER")["value"].to_numpy()
        expected = 1.0 - brier / reference["value"].to_numpy()
        np.testing.assert_allclose(skill["value"].to_numpy(), expected, rtol=1e-9)
    # Probabilities are no rain: they stay out of the deterministic tables.
    metrics = pd.read_csv(outputs["metrics_csv"])
    assert set(metrics["method"]) == {"persistence", "steps"}
    assert json.loads(Path(outputs["metrics_json"]).read_text())["compare"] == "steps"

    report = Path(outputs["report"]).read_text()
    assert "#### Brier skill score against `lagrangian_probability`" in report
    assert "| lead time (min) | persistence | steps |" in report
    figures = {Path(path).name: Path(path) for path in outputs["figures"]}
    for name in (
        "crps_vs_lead_time_synthetic.png",
        "rank_histograms_synthetic.png",
        "reliability_synthetic.png",
        "roc_synthetic.png",
        "power_spectra_synthetic.png",
    ):
        assert figures[name].stat().st_size > 1000
    maps = [name for name in figures if name.startswith("probability_maps_steps_synthetic_")]
    assert len(maps) == 1
    for path in figures.values():
        assert f"]({path.relative_to(outputs['folder'])})" in report


def test_failed_steps_windows_are_named_in_the_report(root, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("a field pysteps cannot model")

    monkeypatch.setattr(steps_module, "_pysteps_forecast", fail)
    experiment = ensemble_experiment(root, "failed", methods=["persistence", "steps"])
    outputs = evaluate(experiment, scheduler="threads", progress=False)
    summary = json.loads(Path(outputs["metrics_json"]).read_text())
    failed = summary["failed_windows"]
    assert [f["reference_time"] for f in failed] == summary["sources"]["synthetic"][
        "reference_times"
    ]
    assert {f["method"] for f in failed} == {"steps"}
    report = Path(outputs["report"]).read_text()
    assert "### Windows a method could not forecast" in report
    for failure in failed:
        assert f"- `steps` from {failure['reference_time']}: pysteps raised ValueError" in report


def test_without_an_ensemble_the_outputs_are_unchanged(root):
    experiment = ensemble_experiment(root, "deterministic", methods=["persistence"])
    outputs = evaluate(experiment, scheduler="threads", progress=False)
    folder = Path(outputs["folder"])
    assert "ensemble_metrics_csv" not in outputs
    assert sorted(p.name for p in folder.iterdir()) == [
        "differences.csv",
        "metrics.csv",
        "metrics.json",
        "report.md",
    ]
    assert "Probabilistic" not in (folder / "report.md").read_text()
    assert "members" not in json.loads((folder / "metrics.json").read_text())["config"]


def test_compare_must_forecast_rain(root):
    experiment = ensemble_experiment(
        root, "compare", methods=["persistence", "lagrangian_probability"]
    )
    broken = experiment.model_copy(
        update={"evaluate": {**experiment.evaluate, "compare": "lagrangian_probability"}}
    )
    with pytest.raises(ConfigError, match="forecasts probabilities, not rain"):
        evaluate(broken, scheduler="threads", progress=False)


def test_evaluate_source_takes_members(tmp_path):
    from test_predict import residual_checkpoint

    from nowcast.evaluate.zeroshot import evaluate_source

    checkpoint = residual_checkpoint(tmp_path / "model.pt", n_input=3, n_target=2)
    options = dict(
        catalog=synthetic_catalog(n_frames=12),
        checkpoint=checkpoint,
        cube_dir=str(tmp_path / "cubes"),
        scheduler="threads",
        progress=False,
        figures=False,
    )
    with pytest.raises(ConfigError, match="--members must be at least 1, got 0"):
        evaluate_source("synthetic", members=0, **options)
    outputs = evaluate_source(
        "synthetic",
        methods=["persistence", "steps"],
        members=3,
        start=pd.Timestamp("2000-01-01T00:40").to_pydatetime(),
        end=pd.Timestamp("2000-01-01T00:50").to_pydatetime(),
        out_dir=tmp_path / "zero",
        **options,
    )
    curves = pd.read_csv(outputs["ensemble_curves_csv"])
    ranks = curves[curves["curve"] == "RANK_HISTOGRAM"]["point"]
    assert sorted(set(ranks)) == [0, 1, 2, 3]
    assert "`steps` has 3 members" in Path(outputs["report"]).read_text()


def test_cli_members_only_applies_with_source():
    from typer.testing import CliRunner

    from nowcast.cli import app

    result = CliRunner().invoke(app, ["evaluate", "x.yaml", "--members", "4"])
    assert result.exit_code == 2 and "--members only apply with --source" in result.output


def test_sources_pool_into_all_except_spectra_of_other_grids():
    rng = np.random.default_rng(0)
    results = []
    for source, size in (("a", 32), ("b", 48)):
        grid = xr.Dataset(
            coords={"y": np.arange(size) * 1000.0, "x": np.arange(size) * 1000.0},
            attrs={"crs_wkt": "EPSG:3035"},
        )
        values = rng.gamma(0.5, 4.0, size=(MEMBERS, N_TARGET, size, size))
        ensemble = make_ensemble_forecast(values, "2000-01-01", 10, grid, method="steps")
        observed = rng.gamma(0.5, 4.0, size=(N_TARGET, size, size)).astype(np.float32)
        window = Window(source, "cube.zarr", np.datetime64("2000-01-01", "ns"))
        scores = accumulate_ensemble_scores(
            {"steps": ensemble},
            {},
            observed,
            np.ones(observed.shape, dtype=bool),
            LEAD_TIMES,
            1.0,
            {"steps": np.random.default_rng(1)},
        )
        results.append(WindowScores(window, {}, 0.5, 1.0, ensemble=scores))
    stacked = stack_ensemble(results)
    assert list(stacked) == ["a", "b", "all"]
    assert "rapsd" in stacked["a"]["steps"] and "rapsd" not in stacked["all"]["steps"]
    crps = [stacked[source]["steps"]["crps"] for source in ("a", "b")]
    np.testing.assert_array_equal(
        stacked["all"]["steps"]["crps"].sum_crps, np.concatenate([c.sum_crps for c in crps])
    )
