"""MEMBER_CSI (median over members of each member's CSI) and CRPS_DIFF (paired CRPS difference
against a reference ensemble) of the probabilistic tables, on small synthetic ensembles."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from nowcast.evaluate.ensemble import (
    accumulate_ensemble_scores,
    crps_difference_reference,
    ensemble_metrics_table,
    probabilistic_tables,
    stack_ensemble,
)
from nowcast.evaluate.scoring import accumulate_scores
from nowcast.evaluate.setup import Window, WindowScores
from nowcast.nowcasts.forecast import make_ensemble_forecast, make_forecast
from nowcast.verification import (
    contingency_accum,
    contingency_compute,
    contingency_init,
    get_method,
    member_csi_accum,
    member_csi_compute,
    member_csi_init,
    member_csi_merge,
    sum_starts,
)

LEAD_TIMES = [10.0, 20.0, 30.0]
THRESHOLDS = (1.0, 5.0, 10.0)
MEMBERS, SIZE, N_WINDOWS = 5, 32, 4
BOOTSTRAP = (200, 0.9, 3)


def synthetic_windows(seed: int = 0, n_members: int = MEMBERS):
    """Ensembles (n_windows, n_members, n_lead, y, x) and observations with no-data and ties.

    Intensities differ per window so that per-start scores differ; some pixels hold exactly a
    threshold (events are ``>``), some observations and one member's pixels are NaN.
    """
    rng = np.random.default_rng(seed)
    scale = rng.uniform(2.0, 8.0, size=(N_WINDOWS, 1, 1, 1))
    shape = (N_WINDOWS, len(LEAD_TIMES), SIZE, SIZE)
    observed = (rng.gamma(0.6, 1.0, size=shape) * scale).astype(np.float32)
    noise = rng.gamma(0.6, 1.0, size=(N_WINDOWS, n_members) + shape[1:])
    forecast = (0.6 * observed[:, None] + noise * scale[:, None]).astype(np.float32)
    for value, rows in zip(THRESHOLDS, (slice(0, 2), slice(2, 4), slice(4, 6)), strict=True):
        observed[:, :, rows, :8] = value
        forecast[:, :, :, rows, 4:12] = value
    observed[:, :, -3:, :5] = np.nan
    forecast[:, -1, :, 10:12, 20:23] = np.nan
    return forecast, observed


def csi_by_hand(forecast: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Median over members of each member's pooled CSI, (n_lead, n_thresholds), with numpy."""
    valid = np.isfinite(observed) & np.isfinite(forecast).all(axis=1)
    n_members = forecast.shape[1]
    csi = np.empty((len(LEAD_TIMES), len(THRESHOLDS), n_members))
    for t, threshold in enumerate(THRESHOLDS):
        seen = (observed > threshold) & valid
        for member in range(n_members):
            said = (forecast[:, member] > threshold) & valid
            hits = (said & seen).sum(axis=(0, 2, 3))
            misses = (~said & seen).sum(axis=(0, 2, 3))
            false_alarms = (said & ~seen & valid).sum(axis=(0, 2, 3))
            csi[:, t, member] = hits / (hits + misses + false_alarms)
    return np.median(csi, axis=-1)


def accumulate(forecast: np.ndarray, observed: np.ndarray, windows) -> object:
    table = member_csi_init(LEAD_TIMES, forecast.shape[1], THRESHOLDS)
    for index in windows:
        member_csi_accum(table, forecast[index], observed[index])
    return table


def test_member_csi_is_the_median_of_the_members_csi():
    forecast, observed = synthetic_windows()
    table = accumulate(forecast, observed, range(N_WINDOWS))
    result = member_csi_compute(table)["MEMBER_CSI"]
    assert result.shape == (len(LEAD_TIMES), len(THRESHOLDS))
    assert np.isfinite(result).all()
    np.testing.assert_allclose(result, csi_by_hand(forecast, observed), rtol=1e-12)
    # The ties at the thresholds are non-events: counting them (>=) would change the score.
    wider = csi_by_hand(forecast, np.where(observed == THRESHOLDS[1], 5.5, observed))
    assert not np.allclose(result[:, 1], wider[:, 1])
    assert get_method("MEMBER_CSI").compute is member_csi_compute
    with pytest.raises(ValueError, match="for 5 members, the ensemble has 3"):
        member_csi_accum(table, forecast[0, :3], observed[0])


def test_member_csi_halves_merge_and_starts_stack_into_the_whole():
    forecast, observed = synthetic_windows(seed=1)
    whole = accumulate(forecast, observed, range(N_WINDOWS))
    halves = member_csi_merge(
        accumulate(forecast, observed, range(2)), accumulate(forecast, observed, range(2, 4))
    )
    per_start = member_csi_accum(
        member_csi_init(LEAD_TIMES, MEMBERS, THRESHOLDS, n_starts=N_WINDOWS), forecast, observed
    )
    assert per_start.n_starts == N_WINDOWS
    for merged in (halves, sum_starts(per_start)):
        for name in type(whole).additive_fields:
            np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
        np.testing.assert_array_equal(
            member_csi_compute(merged)["MEMBER_CSI"], member_csi_compute(whole)["MEMBER_CSI"]
        )


def _grid() -> xr.Dataset:
    return xr.Dataset(
        coords={"y": np.arange(SIZE) * 1000.0, "x": np.arange(SIZE) * 1000.0},
        attrs={"crs_wkt": "EPSG:3035"},
    )


def test_a_one_member_member_csi_is_its_deterministic_csi():
    forecast, observed = synthetic_windows(seed=2, n_members=1)
    ensemble_table = member_csi_init(LEAD_TIMES, 1, THRESHOLDS)
    deterministic = contingency_init(LEAD_TIMES, THRESHOLDS)
    for index in range(N_WINDOWS):
        values = forecast[index, 0]
        window = make_forecast(values, "2000-01-01", 10, _grid(), method="persistence")
        valid = np.isfinite(observed[index]) & np.isfinite(values)
        # The evaluate stage's two paths: metrics.csv (det_cat) and ensemble_metrics.csv.
        scores = accumulate_ensemble_scores(
            {"persistence": window}, {}, observed[index], valid, LEAD_TIMES, 1.0, {}
        )
        ensemble_table = member_csi_merge(ensemble_table, scores["persistence"]["member_csi"])
        tables = accumulate_scores(
            {"persistence": values}, observed[index], LEAD_TIMES, THRESHOLDS, [1], valid=valid
        )
        deterministic = get_method("det_cat").merge(deterministic, tables["persistence"]["det_cat"])
    member_csi = member_csi_compute(ensemble_table)["MEMBER_CSI"]
    csi = contingency_compute(deterministic, ("CSI",))["CSI"]
    np.testing.assert_array_equal(member_csi, csi)
    direct = contingency_accum(contingency_init(LEAD_TIMES, THRESHOLDS), forecast[:, 0], observed)
    np.testing.assert_array_equal(member_csi, contingency_compute(direct, ("CSI",))["CSI"])
    np.testing.assert_allclose(member_csi, csi_by_hand(forecast, observed), rtol=1e-12)


def scored_windows() -> list[WindowScores]:
    """Two ensembles (``steps``, ``learned``) and a deterministic method on every window."""
    forecast, observed = synthetic_windows(seed=3)
    results = []
    for index in range(N_WINDOWS):
        reference_time = np.datetime64("2000-01-01T00:00", "ns") + np.timedelta64(index, "h")
        rain = {
            "persistence": make_forecast(forecast[index, 0], reference_time, 10, _grid()),
            "steps": make_ensemble_forecast(forecast[index, 1:], reference_time, 10, _grid()),
            "learned": make_ensemble_forecast(
                0.8 * forecast[index, :4], reference_time, 10, _grid()
            ),
        }
        valid = np.isfinite(observed[index]) & np.isfinite(forecast[index]).all(axis=0)
        states = {name: np.random.default_rng(index) for name in rain}
        scores = accumulate_ensemble_scores(
            rain, {}, observed[index], valid, LEAD_TIMES, 1.0, states
        )
        window = Window("synthetic", "cube.zarr", reference_time)
        results.append(WindowScores(window, {}, 0.5, 1.0, ensemble=scores))
    return results


def _rows(table: pd.DataFrame, method: str, score: str) -> pd.DataFrame:
    chosen = table[(table["method"] == method) & (table["score"] == score)]
    return chosen.sort_values(["lead_time", "threshold"])


@pytest.fixture(scope="module")
def results() -> list[WindowScores]:
    return scored_windows()


def test_member_csi_rows_of_every_rain_method(results):
    tables = probabilistic_tables(results, *BOOTSTRAP)
    for method in ("persistence", "steps", "learned"):
        rows = _rows(tables.metrics, method, "MEMBER_CSI")
        assert len(rows) == len(LEAD_TIMES) * len(THRESHOLDS)
        assert sorted(set(rows["threshold"])) == list(THRESHOLDS)
        assert rows["scale"].isna().all() and (rows["n_starts"] == N_WINDOWS).all()
        pooled = sum_starts(tables.per_start["synthetic"][method]["member_csi"])
        expected = member_csi_compute(pooled)["MEMBER_CSI"]
        np.testing.assert_array_equal(rows["value"].to_numpy(), expected.ravel())


def test_crps_diff_is_the_paired_difference_against_the_reference(results):
    tables = probabilistic_tables(results, *BOOTSTRAP, compare="learned")
    assert tables.crps_reference == "learned"
    assert tables.summary()["crps_difference_reference"] == "learned"
    metrics = tables.metrics
    assert _rows(metrics, "learned", "CRPS_DIFF").empty
    reference = _rows(metrics, "learned", "CRPS")["value"].to_numpy()
    for method in ("persistence", "steps"):
        difference = _rows(metrics, method, "CRPS_DIFF")
        assert difference["lead_time"].tolist() == LEAD_TIMES
        assert difference["threshold"].isna().all() and difference["scale"].isna().all()
        crps = _rows(metrics, method, "CRPS")["value"].to_numpy()
        np.testing.assert_allclose(difference["value"].to_numpy(), crps - reference, rtol=1e-12)
        assert (difference["ci_low"] <= difference["value"]).all()
        assert (difference["value"] <= difference["ci_high"]).all()


def test_the_reference_is_compare_if_an_ensemble_else_the_first_ensemble(results):
    methods = stack_ensemble(results)["synthetic"]
    assert crps_difference_reference(methods, "learned") == "learned"
    assert crps_difference_reference(methods, "persistence") == "steps"
    assert crps_difference_reference(methods, None) == "steps"
    assert crps_difference_reference({"persistence": methods["persistence"]}, None) is None
    table = probabilistic_tables(results, *BOOTSTRAP).metrics
    assert set(table[table["score"] == "CRPS_DIFF"]["method"]) == {"persistence", "learned"}


def test_crps_diff_resamples_both_methods_with_the_same_starts(results):
    per_start = stack_ensemble(results)
    steps = per_start["synthetic"]["steps"]["crps"]
    offset = 0.25
    # Every start's CRPS is steps' plus the offset: only a paired resampling gives the offset
    # in every bootstrap sample.
    shifted = dataclasses.replace(steps, sum_crps=steps.sum_crps + offset * steps.n)
    per_start["synthetic"]["shifted"] = {"crps": shifted}
    table = ensemble_metrics_table(per_start, *BOOTSTRAP, compare="steps")
    difference = _rows(table, "shifted", "CRPS_DIFF")
    np.testing.assert_allclose(difference["value"], offset, rtol=1e-9)
    np.testing.assert_allclose(difference["ci_low"], offset, rtol=1e-9)
    np.testing.assert_allclose(difference["ci_high"], offset, rtol=1e-9)
    # Steps' own CRPS varies between the resampled starts, so unpaired intervals would not
    # collapse.
    crps = _rows(table, "steps", "CRPS")
    assert (crps["ci_high"] - crps["ci_low"] > 0.01).all()
