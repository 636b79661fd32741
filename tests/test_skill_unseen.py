"""The deterministic model's matching on radars it was not trained on (pipelines/skill_unseen.py):
the selection rule, the packaged key and the generated section."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from nowcast.training.checkpoint import CHECKPOINT_KEYS
from pipelines import skill_unseen as unseen

LEADS = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]


def metrics(csi: dict, mae: dict) -> pd.DataFrame:
    """Tidy deterministic metrics: CSI at 1 mm/h, MAE and a bias of 1 per method and lead."""
    rows = []
    for method in csi:
        for lead in LEADS:
            for score, threshold, value in (
                ("CSI", 1.0, csi[method]),
                ("CSI", 10.0, 0.99),  # another threshold must not be read
                ("BIAS", 1.0, 1.0),
                ("MAE", np.nan, mae[method]),
            ):
                rows.append(
                    {"method": method, "lead_time": lead, "threshold": threshold,
                     "score": score, "value": value}
                )  # fmt: skip
    return pd.DataFrame(rows)


def radar(csi_none, csi_cdf, csi_mean, mae=(1.0, 1.0, 1.0)) -> dict:
    names = ["extrapolation", "model", "model_cdf", "model_mean"]
    return unseen.summarise_radar(
        metrics(
            dict(zip(names, (0.5, csi_none, csi_cdf, csi_mean), strict=True)),
            dict(zip(names, (0.5, *mae), strict=True)),
        )
    )


def test_summaries_divide_by_lk_at_one_mm_per_hour():
    summary = radar(0.4, 0.45, 0.5, mae=(2.0, 0.6, 0.55))
    assert np.isclose(summary["none"]["csi_over_lk"], 0.8)
    assert np.isclose(summary["mean"]["mae_over_lk"], 1.1)
    assert summary["cdf"]["csi"] == [0.45] * 6 and summary["lk"]["mae"] == [0.5] * 6


def test_the_highest_csi_ratio_over_radars_wins_then_the_lower_mae():
    # mean wins on one radar and loses more on the other: cdf has the higher mean ratio.
    radars = {"a": radar(0.40, 0.48, 0.50), "b": radar(0.40, 0.45, 0.30)}
    assert unseen.select_matching(radars) == "cdf"
    # The model as it is wins when matching lowers the CSI everywhere.
    radars = {"a": radar(0.50, 0.45, 0.40), "b": radar(0.50, 0.45, 0.40)}
    assert unseen.select_matching(radars) == "none"
    # Equal CSI: the lower MAE decides.
    tie = {"a": radar(0.45, 0.45, 0.45, mae=(0.9, 0.7, 0.6))}
    assert unseen.select_matching(tie) == "mean"


def test_package_records_the_choice_and_keeps_the_weights(tmp_path):
    checkpoint = tmp_path / "model.pt"
    weights = {"w": torch.arange(4.0)}
    # Every key a checkpoint must have: package reads it as the project loads checkpoints.
    state = {key: None for key in CHECKPOINT_KEYS}
    state.update(model_state=weights, provenance="Trained by make skill.")
    torch.save(state, checkpoint)
    unseen.package(checkpoint, "cdf")
    state = torch.load(checkpoint, weights_only=True)
    assert state["unseen_radar_matching"] == "cdf"
    assert torch.equal(state["model_state"]["w"], weights["w"])
    assert state["provenance"].startswith("Trained by make skill. Off its training radar")
    # A second choice replaces the first, in the key and in the provenance.
    unseen.package(checkpoint, "none")
    state = torch.load(checkpoint, weights_only=True)
    assert "unseen_radar_matching" not in state
    assert state["provenance"].count("Off its training radar") == 1
    assert "matched with 'none'" in state["provenance"]


def test_the_section_marks_the_choice_and_lists_every_radar():
    result = {
        "radars": {"a": radar(0.4, 0.48, 0.5), "b": radar(0.4, 0.45, 0.3)},
        "selected": "cdf",
    }
    lines = unseen.unseen_section(result)
    rows = [line for line in lines if line.startswith("| `")]
    assert len(rows) == 6 and sum("**(chosen)**" in row for row in rows) == 2
    assert all("(chosen)" in row for row in rows if row.startswith("| `cdf`"))
