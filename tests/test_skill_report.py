"""The target checks that docs/skill.md reports (pipelines/skill.py)."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines import skill


def _metrics(values: dict) -> pd.DataFrame:
    """Tidy rows from {(source, method, score, threshold, lead_time): value}."""
    rows = [
        {
            "source": source,
            "method": method,
            "score": score,
            "threshold": threshold,
            "lead_time": lead,
            "value": value,
            "ci_low": value - 0.01,
            "ci_high": value + 0.01,
        }
        for (source, method, score, threshold, lead), value in values.items()
    ]
    return pd.DataFrame(rows)


def test_multi_source_target_is_judged_per_source():
    values = {}
    for source, model_csi in [("bom", (0.72, 0.56)), ("opera", (0.40, 0.25))]:
        for lead, model, lk in zip((30, 60), model_csi, (0.70, 0.26), strict=True):
            values[source, "model", "CSI", 1.0, lead] = model
            values[source, "extrapolation", "CSI", 1.0, lead] = lk
            values["all", "model", "CSI", 1.0, lead] = 0.5
    lines = skill.multi_source_check(_metrics(values))
    assert skill.sources_of(_metrics(values)) == ["bom", "opera"]
    bom, opera = lines
    assert "`bom`" in bom and bom.endswith(": met.")  # 0.72 >= 0.70 and 0.56 >= 0.26
    assert "`opera`" in opera and opera.endswith("not met.")  # 0.40 < 0.70
    assert "30 min 0.400 vs 0.700" in opera


@pytest.mark.parametrize(("bias_at_60", "verdict"), [(1.2, "met"), (1.3, "not met")])
def test_bom_targets_report_ratios_and_the_bias_band(bias_at_60, verdict):
    values = {}
    for lead in (10, 20, 30, 40, 50, 60):
        values["bom", "model", "CSI", 1.0, lead] = 0.66
        values["bom", "extrapolation", "CSI", 1.0, lead] = 0.60
        values["bom", "model", "MSE", float("nan"), lead] = 9.0
        values["bom", "extrapolation", "MSE", float("nan"), lead] = 10.0
        values["bom", "model", "BIAS", 1.0, lead] = bias_at_60 if lead == 60 else 1.0
    metrics = _metrics(values)
    metrics.loc[metrics["score"] == "MSE", "threshold"] = None
    lines = skill.target_check(metrics)
    assert "ratio **1.100**" in lines[0]
    assert "ratio **0.900**" in lines[1]
    assert lines[2].endswith(f"every lead: {verdict}).")
