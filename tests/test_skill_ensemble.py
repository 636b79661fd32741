"""The gates, choices and targets that docs/skill.md reports of the learned ensemble
(pipelines/skill_ensemble.py, pipelines/skill_ensemble_report.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines import skill_ensemble as ens
from pipelines import skill_ensemble_report as report

LEADS = ens.LEADS


def table(rows: dict) -> pd.DataFrame:
    """Tidy ensemble metrics from {(method, score, threshold, scale): value or per-lead list}."""
    out = []
    for (method, score, threshold, scale), values in rows.items():
        values = np.broadcast_to(np.asarray(values, float), (len(LEADS),))
        for lead, value in zip(LEADS, values, strict=True):
            out.append(
                {"method": method, "source": "bom", "lead_time": lead, "threshold": threshold,
                 "scale": scale, "score": score, "value": value, "ci_low": value - 0.01,
                 "ci_high": value + 0.01, "n_starts": 7}
            )  # fmt: skip
    return pd.DataFrame(out)


def good_ensemble(overrides: dict | None = None) -> dict:
    rows = {
        ("ensemble", "CRPS", np.nan, np.nan): [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        ("model", "CRPS", np.nan, np.nan): [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        ("ensemble", "SPREAD_SKILL", np.nan, np.nan): 1.0,
        ("ensemble", "CRPS_POOLED", np.nan, 16.0): 0.2,
        ("extrapolation", "CRPS_POOLED", np.nan, 16.0): 0.3,
    }
    rows.update(overrides or {})
    return rows


def test_gates_pass_and_each_fails_on_its_own_number():
    passing = ens.gates(table(good_ensemble()), [0.6, 1.8])
    assert [gate["met"] for gate in passing] == [True, True, True, True]
    over = {("ensemble", "SPREAD_SKILL", np.nan, np.nan): [1.0, 1.0, 1.0, 1.0, 1.0, 1.6]}
    assert [g["met"] for g in ens.gates(table(good_ensemble(over)), [0.6, 1.8])] == [
        True, False, True, True,
    ]  # fmt: skip
    worse = {("ensemble", "CRPS", np.nan, np.nan): [0.2, 0.3, 0.4, 0.5, 0.6, 0.9]}
    assert not ens.gates(table(good_ensemble(worse)), [0.6, 1.8])[0]["met"]
    pooled = {("ensemble", "CRPS_POOLED", np.nan, 16.0): 0.35}
    assert not ens.gates(table(good_ensemble(pooled)), [0.6, 1.8])[2]["met"]
    # The spectrum gate: within a factor 2 either way.
    assert not ens.gates(table(good_ensemble()), [0.45, 1.8])[3]["met"]
    assert not ens.gates(table(good_ensemble()), [0.6, 2.2])[3]["met"]
    assert not ens.gates(table(good_ensemble()), None)[3]["met"]


def test_the_gain_meeting_most_gates_wins_then_the_lower_crps(tmp_path):
    def summary(name, rows, band):
        path = tmp_path / f"{name}.csv"
        table(rows).to_csv(path, index=False)
        return {"ensemble_metrics": str(path), "rapsd_ratio_range": {"ensemble": band}}

    lower_crps = {("ensemble", "CRPS", np.nan, np.nan): [0.1] * 6}
    over = {("ensemble", "SPREAD_SKILL", np.nan, np.nan): 2.0, **lower_crps}
    sweep = {
        "0.5": summary("a", good_ensemble(), [0.6, 1.8]),  # 4 gates
        "0.8": summary("b", good_ensemble(lower_crps), [0.6, 1.8]),  # 4 gates, lower CRPS
        "1": summary("c", good_ensemble(over), [0.6, 1.8]),  # lowest CRPS, 3 gates
    }
    assert ens.select_gain(sweep) == 0.8


def test_rapsd_ratio_keeps_the_band_and_divides_by_the_observation():
    x = np.array([2.0, 4.0, 8.0, 32.0, 64.0])
    rows = [
        {"method": "ensemble", "lead_time": 60.0, "curve": curve, "x": w, "y": y}
        for w in x
        for curve, y in (("RAPSD_FORECAST", 3.0 * w), ("RAPSD_OBSERVED", w))
    ]
    rows += [{"method": "ensemble", "lead_time": 30.0, "curve": "RAPSD_FORECAST", "x": 4.0,
              "y": 99.0}]  # fmt: skip
    ratio = ens.rapsd_ratio(pd.DataFrame(rows), "ensemble")
    assert list(ratio.index) == [4.0, 8.0, 32.0]
    np.testing.assert_allclose(ratio.to_numpy(), 3.0)


def test_steps_is_held_to_the_same_gates_beside_the_ensemble_where_it_ran():
    # STEPS meets the first three gates here but not the spectrum's; the ensemble meets all.
    steps = {
        ("steps", "CRPS", np.nan, np.nan): [0.25, 0.35, 0.45, 0.55, 0.65, 0.75],
        ("steps", "SPREAD_SKILL", np.nan, np.nan): 1.1,
        ("steps", "CRPS_POOLED", np.nan, 16.0): 0.25,
    }
    with_steps = table(good_ensemble(steps))
    without = table(good_ensemble())
    bands = {"ensemble": [0.6, 1.8], "steps": [0.7, 2.3]}
    blocks = {"validation": (with_steps, bands), "test": (without, bands)}
    summary = "\n".join(report.gates_summary(blocks))
    assert "| validation | 4 of 4 | 3 of 4 |" in summary
    assert "| test | 4 of 4 | – |" in summary  # STEPS did not run there: no row made up
    lines = report.block_gate_lines("validation", with_steps, bands)
    steps_at = lines.index("validation, STEPS (the reference) in the same run:")
    assert sum("**not met**" in line for line in lines[:steps_at]) == 0
    assert sum("**not met**" in line for line in lines[steps_at:]) == 1
    assert "0.7 / 2.3" in lines[-2]  # the spectrum gate quotes STEPS' own band
    assert not any("STEPS" in line for line in report.block_gate_lines("test", without, bands))


@pytest.mark.parametrize(("ours", "met"), [(0.5, True), (0.7, False)])
def test_targets_compare_with_steps_and_lk(ours, met):
    rows = {
        ("ensemble", "CRPS", np.nan, np.nan): ours,
        ("steps", "CRPS", np.nan, np.nan): 0.6,
        ("ensemble", "ROC_AREA", 5.0, np.nan): 0.9,
        ("steps", "ROC_AREA", 5.0, np.nan): 0.8,
        ("ensemble", "ROC_AREA", 10.0, np.nan): 0.7,
        ("steps", "ROC_AREA", 10.0, np.nan): [0.6, 0.6, 0.6, 0.6, 0.6, 0.75],
        ("ensemble", "RANK_KL", np.nan, np.nan): 0.01,
        ("steps", "RANK_KL", np.nan, np.nan): 0.02,
        ("ensemble", "SPREAD_SKILL", np.nan, np.nan): 1.2,
        ("steps", "SPREAD_SKILL", np.nan, np.nan): 0.7,
        ("ensemble", "MEMBER_CSI", 10.0, np.nan): [0.1, 0.1, 0.3, 0.3, 0.3, 0.3],
        ("extrapolation", "MEMBER_CSI", 10.0, np.nan): 0.2,
    }
    found = {t["name"]: t for t in report.targets(table(rows))}
    assert found["CRPS ≤ STEPS, averaged over 10–60 min"]["met"] is met
    assert found["ROC area at 5 mm/h ≥ STEPS at every lead"]["met"]
    assert not found["ROC area at 10 mm/h ≥ STEPS at every lead"]["met"]  # 0.7 < 0.75 at 60
    assert found["rank-histogram KL ≤ STEPS at every lead"]["met"]
    assert found["spread/skill at least as close to 1 as STEPS at every lead"]["met"]
    # The heavy-rain target looks at 30-60 min only: the low early leads do not count.
    heavy = found["median member CSI > 10 mm/h ≥ LK's at 30–60 min"]
    assert heavy["met"] and len(heavy["values"]) == 4
    lines = report.target_lines(list(found.values()))
    assert sum("**not met**" in line for line in lines) == (1 if met else 2)


def test_unseen_radar_matching_most_gates_over_radars_then_crps_relative_to_lk(tmp_path):
    def radar(name, raw: dict, matched: dict, lk: float) -> dict:
        rows = good_ensemble(raw)
        for (method, score, threshold, scale), values in good_ensemble(matched).items():
            if method == "ensemble":
                rows[("ensemble_cdf", score, threshold, scale)] = values
        rows[("extrapolation", "CRPS", np.nan, np.nan)] = lk
        path = tmp_path / f"{name}.csv"
        table(rows).to_csv(path, index=False)
        bands = {"ensemble": [0.6, 1.8], "ensemble_cdf": [0.6, 1.8]}
        return {"ensemble_metrics": str(path), "rapsd_ratio_range": bands}

    over = {("ensemble", "SPREAD_SKILL", np.nan, np.nan): 2.0}
    # The raw members fail a gate on one radar: matching wins although its CRPS is higher.
    radars = {
        "a": radar("a1", over, {("ensemble", "CRPS", np.nan, np.nan): [0.25] * 6}, 1.0),
        "b": radar("b1", {}, {}, 1.0),
    }
    assert ens.select_unseen_matching(radars) == "cdf"
    # Equal gates: the lower CRPS relative to LK, averaged over radars, so a rainy radar's
    # larger numbers do not decide alone.
    lower = {("ensemble", "CRPS", np.nan, np.nan): [0.1] * 6}
    higher = {("ensemble", "CRPS", np.nan, np.nan): [0.25] * 6}
    radars = {
        "rainy": radar("a2", higher, lower, 10.0),  # matched better by 0.015 x LK
        "dry": radar("b2", lower, higher, 0.5),  # raw better by 0.3 x LK
    }
    assert ens.select_unseen_matching(radars) == "none"


def test_package_records_the_unseen_radar_matching(tmp_path, monkeypatch):
    import torch

    from nowcast.training.checkpoint import CHECKPOINT_KEYS, CheckpointError

    source = tmp_path / "best.pt"
    state = {key: None for key in CHECKPOINT_KEYS}
    state.update(model_kwargs={"noise_channels": 2}, unseen_radar_matching="mean")
    torch.save(state, source)
    written = []
    monkeypatch.setattr(ens, "save_checkpoint", lambda path, state: written.append(state))
    ens.package(str(source), 0.7, "note", "cdf")
    assert written[-1]["unseen_radar_matching"] == "cdf"
    assert written[-1]["model_kwargs"] == {"noise_channels": 2, "noise_gain": 0.7}
    ens.package(str(source), 0.7, "note", "none")
    assert "unseen_radar_matching" not in written[-1]
    # A checkpoint cut short by a crash is named, not packaged.
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(CheckpointError, match="empty.pt is empty"):
        ens.package(str(empty), 0.7, "note", "none")
    assert len(written) == 2
