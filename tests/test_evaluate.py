"""Tests of the evaluate stage (nowcast.evaluate) on a synthetic experiment and the BoM day."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_catalog
from pysteps.verification.detcatscores import det_cat_fct
from pysteps.verification.detcontscores import det_cont_fct
from test_nowcasts import save_tiny_checkpoint, tiny_model

from nowcast.config import ConfigError, ExperimentConfig
from nowcast.evaluate.scoring import cube_windows, store_windows
from nowcast.evaluate.stage import evaluate
from nowcast.evaluate.tables import (
    DIFFERENCE_COLUMNS,
    FAMILY_SCORES,
    METRIC_COLUMNS,
    differences_table,
    stack_starts,
)
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import get_method
from nowcast.nowcasts.model import ModelNowcast
from nowcast.sources.cube import cube_path, open_cube
from nowcast.windows import select_windows

N_INPUT, N_TARGET = 4, 3
#: A small residual ConvLSTM: untrained, it is Lagrangian persistence (LK extrapolation).
TINY_RESIDUAL = {"patch_factor": 4, "hidden_channels": [8], "kernel_sizes": [3], "residual": True}
PATCHES = {
    "n_input_frames": N_INPUT,
    "n_target_frames": N_TARGET,
    "patch_size": 32,
    "stride": 32,
    "split_fractions": {"train": 0.4, "val": 0.2, "test": 0.4},
    "buffer_minutes": 0,
    "min_wet_fraction": 0.01,
}
EVALUATE = {
    "n_bootstrap": 200,
    "window_stride": 1,
    "max_windows": 6,
    "fss_scales": [1, 5],
    "map_lead_times": [30],  # one column: cartopy map panels cost seconds each
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def synthetic_experiment(root: Path, **evaluate) -> ExperimentConfig:
    return ExperimentConfig(
        name="synthetic",
        sources=["synthetic"],
        cube_dir=str(root / "cubes"),
        patch_dir=str(root / "patches"),
        run_dir=str(root / "run"),
        patches=PATCHES,
        evaluate={**EVALUATE, **evaluate},
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Cube -> patch store -> untrained checkpoint -> evaluate with the default methods."""
    from nowcast.patches.build import build_patches
    from nowcast.sources.ingest import ingest

    root = tmp_path_factory.mktemp("evaluate")
    catalog = synthetic_catalog(n_frames=36)
    ingest("synthetic", str(root / "cubes"), catalog=catalog, scheduler="threads", progress=False)
    experiment = synthetic_experiment(root)
    store = build_patches(experiment, scheduler="threads", progress=False)
    _, info = store_windows(store, "test")
    checkpoint = root / "run" / "checkpoints" / "best.pt"
    save_tiny_checkpoint(checkpoint, tiny_model(N_INPUT, N_TARGET), info["normalization"])
    outputs = evaluate(experiment, scheduler="threads", progress=False)
    return experiment, outputs, checkpoint


@pytest.fixture(scope="module")
def metrics(evaluated) -> pd.DataFrame:
    return pd.read_csv(evaluated[1]["metrics_csv"])


def test_outputs_follow_the_tidy_schema(evaluated, metrics):
    experiment, outputs, _ = evaluated
    assert Path(outputs["folder"]) == Path(experiment.run_path) / "evaluation"
    assert tuple(metrics.columns) == METRIC_COLUMNS
    # Without a methods list the model joins the baselines because best.pt exists.
    assert set(metrics["method"]) == {"persistence", "extrapolation", "model"}
    assert set(metrics["source"]) == {"synthetic"}
    assert set(metrics["lead_time"]) == {10.0, 20.0, 30.0}
    n_leads, n_thresholds, n_scales = 3, 6, 2
    # det_cat, det_cont, FSS; CSI and BIAS, MSE on all observed pixels; the dry-area FA.
    per_method = n_leads * (6 * n_thresholds + 3 + n_thresholds * n_scales + 2 * n_thresholds + 2)
    assert len(metrics) == 3 * per_method
    continuous = metrics[metrics["score"].isin(FAMILY_SCORES["det_cont"])]
    assert continuous["threshold"].isna().all() and continuous["scale"].isna().all()
    fss = metrics[metrics["score"] == "FSS"]
    assert set(fss["scale"]) == {1.0, 5.0}
    n_windows = metrics["n_starts"].unique()
    assert len(n_windows) == 1 and 2 <= n_windows[0] <= 6

    payload = json.loads(Path(outputs["metrics_json"]).read_text())
    assert payload["columns"] == list(METRIC_COLUMNS)
    from_json = pd.DataFrame(payload["metrics"], columns=list(METRIC_COLUMNS))
    pd.testing.assert_frame_equal(from_json, metrics, check_dtype=False)
    assert len(payload["sources"]["synthetic"]["reference_times"]) == n_windows[0]

    differences = pd.read_csv(outputs["differences_csv"])
    assert tuple(differences.columns) == DIFFERENCE_COLUMNS
    assert set(differences["method"]) == {"model"}
    assert set(differences["baseline"]) == {"persistence", "extrapolation"}


def test_report_and_figures(evaluated):
    _, outputs, _ = evaluated
    report = Path(outputs["report"]).read_text()
    assert "### CSI at 1 mm/h" in report
    assert "| lead time (min) | persistence | extrapolation | model |" in report
    assert "model minus baseline" in report
    figures = [Path(path) for path in outputs["figures"]]
    suffixes = sorted(path.suffix for path in figures)
    assert suffixes.count(".png") == 4 and suffixes.count(".gif") == 1
    for path in figures:
        assert path.is_file() and path.stat().st_size > 1000
        assert f"]({path.relative_to(outputs['folder'])})" in report
    assert not list(Path(outputs["folder"]).parent.glob("evaluation.tmp-*"))


def window_stacks(experiment, reference_times, checkpoint):
    """Persistence forecasts and observations of the evaluated windows, on the common mask."""
    from nowcast.sources.cube import cube_path

    cube = open_cube(cube_path(experiment.cube_root, "synthetic"))
    model = ModelNowcast(checkpoint, device="cpu")
    step = np.timedelta64(10, "m")
    forecasts, observations = [], []
    for reference in reference_times:
        reference = np.datetime64(reference, "ns")
        inputs = cube_inputs(cube, reference, N_INPUT)
        observed = cube["rain_rate"].sel(time=reference + step * np.arange(1, N_TARGET + 1))
        observed = observed.values
        persisted = get_method("persistence")(inputs, N_TARGET).values
        valid = np.isfinite(observed) & np.isfinite(persisted)
        valid &= np.isfinite(get_method("extrapolation")(inputs, N_TARGET).values)
        valid &= np.isfinite(model(inputs, N_TARGET).values)
        forecasts.append(np.where(valid, persisted, np.nan))
        observations.append(np.where(valid, observed, np.nan))
    return np.stack(forecasts), np.stack(observations)


def test_persistence_scores_equal_pysteps_on_the_same_windows(evaluated, metrics):
    experiment, outputs, checkpoint = evaluated
    payload = json.loads(Path(outputs["metrics_json"]).read_text())
    reference_times = payload["sources"]["synthetic"]["reference_times"]
    forecast, observed = window_stacks(experiment, reference_times, checkpoint)
    persistence = metrics[metrics["method"] == "persistence"]
    for lead_index, lead_time in enumerate((10.0, 20.0, 30.0)):
        at_lead = persistence[persistence["lead_time"] == lead_time]
        pred = forecast[:, lead_index]
        obs = observed[:, lead_index]
        valid = np.isfinite(pred) & np.isfinite(obs)
        for threshold in (0.5, 1.0, 5.0):
            expected = det_cat_fct(pred[valid], obs[valid], threshold, FAMILY_SCORES["det_cat"])
            for score, value in expected.items():
                row = at_lead[(at_lead["score"] == score) & (at_lead["threshold"] == threshold)]
                np.testing.assert_allclose(row["value"].iloc[0], value, rtol=1e-6, atol=1e-9)
        expected = det_cont_fct(pred[valid], obs[valid], ["MSE", "MAE"])
        for score, value in expected.items():
            row = at_lead[at_lead["score"] == score]
            np.testing.assert_allclose(row["value"].iloc[0], value, rtol=1e-6)


def test_all_observed_and_dry_area_scores_equal_pysteps(evaluated, metrics):
    """CSI_ALLOBS counts no-data as no rain on every observed pixel; DRY_FA is pysteps' FA."""
    experiment, outputs, checkpoint = evaluated
    payload = json.loads(Path(outputs["metrics_json"]).read_text())
    cube = open_cube(cube_path(experiment.cube_root, "synthetic"))
    model = ModelNowcast(checkpoint, device="cpu")
    step = np.timedelta64(10, "m")
    stacks = {"model": [], "lk": [], "obs": []}
    for reference in payload["sources"]["synthetic"]["reference_times"]:
        reference = np.datetime64(reference, "ns")
        inputs = cube_inputs(cube, reference, N_INPUT)
        times = reference + step * np.arange(1, N_TARGET + 1)
        stacks["obs"].append(cube["rain_rate"].sel(time=times).values)
        stacks["lk"].append(get_method("extrapolation")(inputs, N_TARGET).values)
        stacks["model"].append(model(inputs, N_TARGET).values)
    obs, lk, forecast = (np.stack(stacks[k]) for k in ("obs", "lk", "model"))
    rows = metrics[metrics["method"] == "model"]
    for lead_index, lead_time in enumerate((10.0, 20.0, 30.0)):
        at_lead = rows[rows["lead_time"] == lead_time]
        pred, truth = forecast[:, lead_index], obs[:, lead_index]
        observed = np.isfinite(truth)
        filled = np.nan_to_num(pred, nan=0.0)
        expected = det_cat_fct(filled[observed], truth[observed], 1.0, ["CSI", "BIAS"])
        for score, value in expected.items():
            row = at_lead[(at_lead["score"] == f"{score}_ALLOBS") & (at_lead["threshold"] == 1.0)]
            np.testing.assert_allclose(row["value"].iloc[0], value, rtol=1e-6)
        expected = det_cont_fct(filled[observed], truth[observed], ["MSE"])["MSE"]
        row = at_lead[at_lead["score"] == "MSE_ALLOBS"]
        np.testing.assert_allclose(row["value"].iloc[0], expected, rtol=1e-6)
        lk_lead = lk[:, lead_index]
        valid = observed & np.isfinite(pred) & np.isfinite(lk_lead)
        dry = valid & (truth < 0.1) & (lk_lead < 0.1)
        assert dry.sum() > 100
        share = np.mean(pred[dry] > 0.5)  # events are "> threshold" throughout
        row = at_lead[at_lead["score"] == "DRY_FA"]
        assert row["threshold"].iloc[0] == 0.5
        np.testing.assert_allclose(row["value"].iloc[0], share, rtol=1e-6, atol=1e-12)


def test_bootstrap_intervals_bracket_the_pooled_value(metrics):
    finite = metrics[np.isfinite(metrics["value"])]
    main = finite[finite["score"].isin(["CSI", "POD", "MSE", "MAE", "FSS"])]
    assert len(main) > 100
    assert (main["ci_low"] <= main["value"] + 1e-12).all()
    assert (main["value"] <= main["ci_high"] + 1e-12).all()
    # With several starts the intervals have width somewhere.
    assert (main["ci_high"] - main["ci_low"] > 0).any()


def test_differences_are_paired_and_zero_for_the_same_method(evaluated, metrics):
    _, outputs, _ = evaluated
    differences = pd.read_csv(outputs["differences_csv"])
    keys = ["source", "lead_time", "threshold", "scale", "score"]
    for baseline in ("persistence", "extrapolation"):
        joined = (
            metrics[metrics["method"] == "model"]
            .merge(metrics[metrics["method"] == baseline], on=keys, suffixes=("", "_baseline"))
            .merge(differences[differences["baseline"] == baseline], on=keys, suffixes=("", "_d"))
        )
        assert len(joined) == len(metrics) / 3
        np.testing.assert_allclose(
            joined["value_d"], joined["value"] - joined["value_baseline"], rtol=1e-9, atol=1e-12
        )

    per_start = _per_start_with_copy(evaluated)
    same = differences_table(per_start, "persistence", n_bootstrap=50, confidence=0.95, seed=0)
    same = same[same["baseline"] == "persistence_copy"]
    finite = same[np.isfinite(same["value"])]
    assert len(finite) > 50
    assert (finite["value"] == 0).all()
    assert (finite["ci_low"] == 0).all() and (finite["ci_high"] == 0).all()


def _per_start_with_copy(evaluated):
    """Per-start accumulators of two windows, with persistence also listed as a second method."""
    from nowcast.evaluate.scoring import score_window
    from nowcast.evaluate.setup import ForecastSetup, Window

    experiment, outputs, _ = evaluated
    payload = json.loads(Path(outputs["metrics_json"]).read_text())
    cube = payload["sources"]["synthetic"]["cube"]
    setup = ForecastSetup(
        methods=("persistence",),
        method_kwargs={},
        checkpoint=None,
        device=None,
        n_input_frames=N_INPUT,
        n_leadtimes=N_TARGET,
        timestep_minutes=10,
        thresholds=(0.5, 1.0, 5.0),
        scales=(1, 5),
    )
    results = []
    for reference in payload["sources"]["synthetic"]["reference_times"][:2]:
        result = score_window(Window("synthetic", cube, np.datetime64(reference, "ns")), setup)
        result.accumulators["persistence_copy"] = result.accumulators["persistence"]
        results.append(result)
    return stack_starts(results, ("persistence", "persistence_copy"))


def test_patch_scores_equal_a_direct_computation(evaluated, tmp_path):
    from nowcast.patches.reader import PatchStore

    experiment, _, _ = evaluated
    update = {
        "run_dir": str(tmp_path / "run"),
        "evaluate": {
            "methods": ["persistence"],
            "score_patches": True,
            "max_patches": 10_000,  # all of them
            "figures": False,
            "n_bootstrap": 20,
        },
    }
    outputs = evaluate(experiment.model_copy(update=update), scheduler="threads", progress=False)
    table = pd.read_csv(outputs["patch_metrics_csv"])
    assert tuple(table.columns) == METRIC_COLUMNS

    store = PatchStore.open(experiment.patch_store)
    test = store.samples("test")["sample"].to_numpy()
    normalization = store.normalization
    samples = [store.sample(int(index)) for index in test]
    last = np.stack([normalization.inverse(s["inputs"].values[-1]) for s in samples])
    last = np.where(np.stack([s["input_mask"].values[-1] for s in samples]), last, np.nan)
    target = np.stack([normalization.inverse(s["targets"].values[0]) for s in samples])
    target = np.where(np.stack([s["target_mask"].values[0] for s in samples]), target, np.nan)
    valid = np.isfinite(last) & np.isfinite(target)
    expected = np.mean((last[valid] - target[valid]) ** 2, dtype=np.float64)

    mse = table[(table["score"] == "MSE") & (table["lead_time"] == 10.0)]
    assert set(mse["source"]) == {"synthetic"}
    assert mse["n_starts"].iloc[0] == test.size
    np.testing.assert_allclose(mse["value"].iloc[0], expected, rtol=1e-5)


def test_windows_from_the_cubes_equal_the_store_windows(evaluated):
    experiment, _, _ = evaluated
    from_store, store_info = store_windows(experiment.patch_store, "test")
    from_cubes, cube_info = cube_windows(experiment, "test")
    assert len(from_store) > 0
    pd.testing.assert_frame_equal(from_store, from_cubes)
    for key in ("n_input_frames", "n_target_frames", "timestep_minutes"):
        assert store_info[key] == cube_info[key]


def test_select_windows_by_stride_and_maximum():
    times = np.arange(10)
    np.testing.assert_array_equal(select_windows(times, 3, None), [0, 3, 6, 9])
    np.testing.assert_array_equal(select_windows(times, 1, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(select_windows(times, 2, 2), [0, 8])
    np.testing.assert_array_equal(select_windows(times[:1], 3, 5), [0])


def test_config_errors_name_the_problem(evaluated, tmp_path):
    experiment, _, _ = evaluated
    broken = experiment.model_copy(update={"evaluate": {"methods": ["nosuchmethod"]}})
    with pytest.raises(ConfigError, match="methods.*unknown forecast method 'nosuchmethod'"):
        evaluate(broken, scheduler="threads", progress=False)
    broken = experiment.model_copy(update={"evaluate": {"thresholds": [2.0]}})
    with pytest.raises(ConfigError, match="report_threshold 1.0 is not in thresholds"):
        evaluate(broken, scheduler="threads", progress=False)
    missing = str(tmp_path / "none.pt")
    broken = experiment.model_copy(
        update={"evaluate": {"methods": ["model"], "checkpoint": missing}}
    )
    with pytest.raises(ConfigError, match="needs the checkpoint"):
        evaluate(broken, scheduler="threads", progress=False)
    broken = experiment.model_copy(update={"evaluate": {"n_leadtimes": N_TARGET + 1}})
    with pytest.raises(ConfigError, match="exceeds the windows' 3 target frames"):
        evaluate(broken, scheduler="threads", progress=False)


@pytest.mark.realdata
def test_bom_extrapolation_is_plausible_and_beats_persistence(bom_cube, tmp_path):
    experiment = ExperimentConfig(
        name="bom",
        sources=["bom"],
        cube_dir=str(Path(bom_cube).parent),
        patch_dir=str(tmp_path / "patches"),  # no store: windows come from the cube
        run_dir=str(tmp_path / "run"),
        patches={
            "n_input_frames": 6,
            "n_target_frames": 6,
            "split_times": {
                "test": [{"start": "2020-10-31T08:00", "end": "2020-10-31T11:50"}],
                "val": [{"start": "2020-10-31T12:00", "end": "2020-10-31T16:50"}],
            },
            "buffer_minutes": 60,
        },
        evaluate={
            "methods": ["persistence", "extrapolation"],
            "window_stride": 6,  # hourly starts: 08:50, 09:50, 10:50
            "thresholds": [1.0],
            "fss_scales": [1],
            "n_bootstrap": 100,
            "figures": False,
        },
    )
    outputs = evaluate(experiment, scheduler="threads", progress=False)
    table = pd.read_csv(outputs["metrics_csv"])
    csi = table[(table["score"] == "CSI") & (table["threshold"] == 1.0)]
    csi = csi.set_index(["method", "lead_time"])["value"]
    assert set(table["n_starts"]) == {3}
    # Documented for LK on this day (starts every 30 min): 0.77 at 10 min, 0.56 at 30 min.
    assert 0.6 < csi["extrapolation", 10.0] < 0.95
    assert csi["extrapolation", 30.0] > csi["persistence", 30.0]


@pytest.mark.realdata
def test_multi_source_experiment_is_scored_per_source(catalog, tmp_path):
    """Two radars at different timesteps (BoM 10 min, KNMI 5 min) share a 30-min step: one
    Lagrangian residual model is trained on both and every source is scored on its own test
    block, as in pipelines/configs/multi_source.yaml."""
    from nowcast.patches.build import build_patches
    from nowcast.patches.reader import evaluation_windows
    from nowcast.sources.ingest import ingest
    from nowcast.training.loop import train

    cube_dir = tmp_path / "cubes"
    ranges = {
        "bom": ("2020-10-31T03:00", "2020-10-31T07:30"),
        "knmi": ("2010-08-26T00:00", "2010-08-26T04:30"),
    }
    for source, (start, end) in ranges.items():
        ingest(
            source, str(cube_dir), catalog=catalog, start=start, end=end,
            scheduler="threads", progress=False,
        )  # fmt: skip
    experiment = ExperimentConfig(
        name="two_radars",
        sources=["bom", "knmi"],
        cube_dir=str(cube_dir),
        patch_dir=str(tmp_path / "patches"),
        run_dir=str(tmp_path / "run"),
        patches={
            "resample_minutes": 30,
            "n_input_frames": 3,
            "n_target_frames": 2,
            "patch_size": 64,
            "stride": 64,
            "split_times": {
                "test": [
                    {"start": "2020-10-31T05:30", "end": "2020-10-31T07:30"},
                    {"start": "2010-08-26T02:30", "end": "2010-08-26T04:30"},
                ],
                "val": [{"start": "2010-08-26T00:00", "end": "2010-08-26T02:00"}],
            },
            "buffer_minutes": 0,
            "max_samples_per_split": 64,
            "frame": "lagrangian",
        },
        train={
            "model": {"name": "convlstm", "kwargs": TINY_RESIDUAL},
            "loss": "mse+bias",
            "epochs": None,
            "max_steps": 2,
            "batch_size": 4,
            "time_reversal": True,
        },
        evaluate={
            "methods": ["extrapolation", "model"],
            "thresholds": [1.0],
            "fss_scales": [1],
            "n_bootstrap": 20,
            "figures": False,
        },
    )
    store = build_patches(experiment, scheduler="threads", progress=False)
    windows = evaluation_windows(store, "test")
    assert set(windows["source"]) == {"bom", "knmi"}
    # Clock-aligned 30-min frames only, whatever the source's own step.
    minutes = pd.DatetimeIndex(windows["reference_time"]).minute
    assert set(minutes) <= {0, 30}
    train(experiment, device="cpu", progress=False)
    outputs = evaluate(experiment, scheduler="threads", progress=False)
    table = pd.read_csv(outputs["metrics_csv"])
    assert set(table["source"]) == {"bom", "knmi", "all"}
    assert sorted(table["lead_time"].unique()) == [30.0, 60.0]
    csi = table[(table["score"] == "CSI") & (table["threshold"] == 1.0)]
    csi = csi.set_index(["source", "method", "lead_time"])["value"]
    for method in ("extrapolation", "model"):
        for lead in (30.0, 60.0):
            # Pooled contingency tables: the pooled CSI is a mediant of the sources' CSIs.
            per_source = [csi["bom", method, lead], csi["knmi", method, lead]]
            assert min(per_source) - 1e-9 <= csi["all", method, lead] <= max(per_source) + 1e-9
    # The residual model starts as LK extrapolation and two small steps keep it close to it.
    for source in ("bom", "knmi"):
        assert abs(csi[source, "model", 30.0] - csi[source, "extrapolation", 30.0]) < 0.1
