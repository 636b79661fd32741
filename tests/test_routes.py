"""Blend-weight fitting (nowcast.evaluate.blend_fit) and the route targets of
pipelines/skill_routes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from nowcast.evaluate.blend_fit import blend_sums, weights_from_sums
from pipelines.skill_routes import LEADS, bom_targets, moonshot_targets, select_route


def test_blend_weights_are_the_least_squares_solution_per_lead():
    rng = np.random.default_rng(0)
    windows = []
    for _ in range(2):  # two windows: the sums stream, the fit sees both
        observed = rng.gamma(1.0, 2.0, size=(3, 30, 40))
        base = observed + rng.normal(0, 1.0, observed.shape)
        other = observed + rng.normal(0, 2.0, observed.shape)
        base[0, :3] = np.nan  # pixels without data in one field drop out of that lead
        windows.append((base, other, observed))
    weights = weights_from_sums(sum(blend_sums(*window) for window in windows))
    for lead in range(3):
        design, target = [], []
        for m, s, o in windows:
            valid = np.isfinite(m[lead])
            design.append((m[lead] - s[lead])[valid])
            target.append((o[lead] - s[lead])[valid])
        design, target = np.concatenate(design), np.concatenate(target)
        expected = np.linalg.lstsq(design[:, None], target, rcond=None)[0][0]
        assert abs(weights[lead] - np.clip(expected, 0, 1)) < 1e-3
    # Noise variances 1 and 4: the optimal weight of the base is 4 / 5.
    assert all(abs(w - 0.8) < 0.05 for w in weights)
    base, other, observed = windows[0]
    assert weights_from_sums(blend_sums(other, other, observed)) == [1.0, 1.0, 1.0]


def _metrics(values: dict) -> pd.DataFrame:
    """A metrics table: values[(method, score, threshold)] is a per-lead list."""
    rows = []
    for (method, score, threshold), per_lead in values.items():
        for lead, value in zip(LEADS, per_lead, strict=True):
            rows.append(
                {
                    "method": method,
                    "source": "bom",
                    "lead_time": lead,
                    "threshold": threshold,
                    "score": score,
                    "value": value,
                }
            )
    return pd.DataFrame(rows)


def _table(route_csi: float, route_bias: float, dry: list[float]) -> pd.DataFrame:
    values = {}
    for method, csi, bias in (("extrapolation", 0.5, 1.0), ("route", route_csi, route_bias)):
        for threshold in (1.0, 5.0, 10.0):
            values[(method, "CSI", threshold)] = [csi] * 6
        for threshold in (1.0, 5.0):
            values[(method, "BIAS", threshold)] = [bias] * 6
        values[(method, "MSE", np.nan)] = [10.0 if method == "route" else 12.0] * 6
    values[("route", "DRY_FA", 0.5)] = dry
    values[("sprog", "CSI", 1.0)] = [0.55] * 6
    return _metrics(values)


def test_targets_are_met_only_at_every_lead():
    good = {t["name"]: t["met"] for t in bom_targets(_table(0.6, 1.1, [0.01] * 6), "route")}
    assert all(good.values()) and len(good) == 7
    # One lead of dry-area false alarms over 2 %, a bias out of range, CSI below LK.
    bad = {
        t["name"]: t["met"] for t in bom_targets(_table(0.45, 1.3, [0.01] * 5 + [0.03]), "route")
    }
    assert not any(v for k, v in bad.items() if "MSE" not in k)
    assert bad["MSE ≤ 0.9x LK over 10–60 min"] is True  # 10 / 12 = 0.83
    moon = moonshot_targets(_table(0.6, 1.1, [0.0] * 6), "route")
    assert [t["met"] for t in moon] == [True, True]  # 0.6 / 0.5 = 1.2 >= 1.10; 0.6 >= 0.55


def test_selection_prefers_more_targets_met():
    table = pd.concat(
        [
            _table(0.6, 1.1, [0.01] * 6),
            _table(0.7, 2.0, [0.1] * 6).replace({"route": "blurry"}),
        ]
    )
    table = table.drop_duplicates(subset=["method", "score", "threshold", "lead_time"])
    assert select_route({"a": table}, [("a", "route"), ("a", "blurry")]) == ("a", "route")


def test_shipping_rule_needs_more_targets_than_the_default(tmp_path):
    from pipelines.skill_routes import shipping_lines, targets_met

    good, plain = _table(0.6, 1.1, [0.01] * 6), _table(0.45, 1.3, [0.03] * 6)
    paths = {}
    for name, table in (("good", good), ("plain", plain)):
        paths[name] = tmp_path / f"{name}.csv"
        table.to_csv(paths[name], index=False)

    def model(path):
        return {"metrics": {"test": str(path), "zero_shot": str(path)}}

    result = {
        "models": {"new": model(paths["good"]), "old": model(paths["plain"])},
        "selected": ["new", "route"],
        "default": ["old", "route"],
    }
    # The good table meets the 7 BoM targets, the 3 zero-shot ones and both moonshot targets.
    assert targets_met(result, "new", "route") == 12
    assert targets_met(result, "old", "route") == 1  # only MSE
    assert "it meets more, so it would replace the default" in shipping_lines(result)[0]
    result["selected"] = ["old", "route"]
    assert "does not meet more, so the pretrained default stays" in shipping_lines(result)[0]
