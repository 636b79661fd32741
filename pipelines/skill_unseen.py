"""The deterministic model on radars it was not trained on: its matching there, chosen on held-out
radars (``python -m pipelines.skill --unseen``, ``make skill ARGS=--unseen``).

Off its training radar the pretrained model's growth runs away at 50–60 min (frequency bias far
above 1), while pysteps' extrapolation stays near 1. Matching each lead to the last observed
frame's distribution (pysteps' ``nonparam_match_empirical_cdf``, or S-PROG's mean matching) is the
same remedy STEPS applies to its members. This stage:

1. scores the packaged model as it is (``none``) and matched (``cdf``, ``mean``) beside LK,
   zero-shot on the same held-out radars the ensemble's matching is chosen on
   (:data:`pipelines.skill_ensemble.UNSEEN_RADARS`; never FMI 2016, the reported zero-shot radar);
2. keeps the candidate with the highest CSI at 1 mm/h relative to LK's (the mean over the radars
   of its mean over lead times ÷ LK's), then the lower MAE relative to LK's;
3. writes the choice into the packaged checkpoint as ``unseen_radar_matching``, which
   :class:`nowcast.nowcasts.model.ModelNowcast` applies with ``probability_matching="auto"`` on
   every radar outside the checkpoint's training sources (the weights are unchanged);
4. copies the runs' tables under ``docs/skill/unseen/`` for the generated section of
   ``docs/skill.md``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from nowcast.evaluate.zeroshot import evaluate_source
from nowcast.training.checkpoint import (
    PRETRAINED_CHECKPOINT,
    load_checkpoint,
    save_checkpoint,
    with_unseen_matching,
)
from pipelines.skill_ensemble import UNSEEN_RADARS, series
from pipelines.skill_ensemble_report import slashed

REPO = Path(__file__).resolve().parents[1]
UNSEEN_DIR = REPO / "docs" / "skill" / "unseen"
#: The candidate matchings and the method each is scored as.
CANDIDATES = {"none": "model", "cdf": "model_cdf", "mean": "model_mean"}
VARIANTS = {
    CANDIDATES[method]: {
        "method": "model",
        "postprocess": {"method": method, "target": "last_input"},
    }
    for method in ("cdf", "mean")
}
#: The rain-rate threshold (mm/h) of the CSI the choice is made on.
CSI_THRESHOLD = 1.0


def summarise_radar(metrics: pd.DataFrame) -> dict:
    """Per candidate: CSI and MAE per lead, their means ÷ LK's, and the frequency bias."""
    csi_lk = series(metrics, "extrapolation", "CSI", CSI_THRESHOLD)
    mae_lk = series(metrics, "extrapolation", "MAE")
    summary = {}
    for matching, method in CANDIDATES.items():
        csi = series(metrics, method, "CSI", CSI_THRESHOLD)
        mae = series(metrics, method, "MAE")
        bias = series(metrics, method, "BIAS", CSI_THRESHOLD)
        summary[matching] = {
            "csi": csi.round(4).tolist(),
            "mae": mae.round(4).tolist(),
            "bias": bias.round(3).tolist(),
            "csi_over_lk": float(csi.mean() / csi_lk.mean()),
            "mae_over_lk": float(mae.mean() / mae_lk.mean()),
        }
    summary["lk"] = {"csi": csi_lk.round(4).tolist(), "mae": mae_lk.round(4).tolist()}
    return summary


def select_matching(radars: dict) -> str:
    """The highest mean CSI ratio over the radars, then the lower mean MAE ratio."""

    def key(matching: str) -> tuple[float, float]:
        csi = sum(radars[r][matching]["csi_over_lk"] for r in radars) / len(radars)
        mae = sum(radars[r][matching]["mae_over_lk"] for r in radars) / len(radars)
        return (-round(csi, 6), mae)

    return min(CANDIDATES, key=key)


def package(checkpoint: Path, matching: str) -> None:
    """Record ``matching`` as the checkpoint's ``unseen_radar_matching`` (atomically; weights,
    other keys and the provenance's first sentence unchanged)."""
    state = with_unseen_matching(load_checkpoint(checkpoint), matching)
    provenance = state.get("provenance", "").split(" Off its training radar")[0]
    chosen = " and ".join(UNSEEN_RADARS)
    state["provenance"] = (
        f"{provenance} Off its training radar it is matched with '{matching}', chosen by "
        f"`make skill ARGS=--unseen` on {chosen}."
    )
    save_checkpoint(checkpoint, state)


def run_unseen(checkpoint: Path = PRETRAINED_CHECKPOINT) -> dict:
    """Score the candidates on :data:`UNSEEN_RADARS`, choose, package; the record for the doc."""
    radars = {}
    for source, stride in UNSEEN_RADARS.items():
        outputs = evaluate_source(
            source,
            checkpoint=checkpoint,
            out_dir=f"runs/unseen_model_{source}",
            methods=["extrapolation", *CANDIDATES.values()],
            forecast_methods=VARIANTS,
            # The model as it is: "auto" would apply the checkpoint's earlier choice.
            method_kwargs={"model": {"probability_matching": "none"}},
            compare="model",
            progress=False,
            figures=False,
            window_stride=stride,
        )
        UNSEEN_DIR.mkdir(parents=True, exist_ok=True)
        table = UNSEEN_DIR / f"model_{source}_metrics.csv"
        shutil.copy(outputs["metrics_csv"], table)
        radars[source] = {
            **summarise_radar(pd.read_csv(outputs["metrics_csv"])),
            "metrics": str(table.relative_to(REPO)),
        }
    matching = select_matching(radars)
    package(Path(checkpoint), matching)
    return {"radars": radars, "selected": matching, "checkpoint": str(checkpoint)}


def unseen_section(result: dict) -> list[str]:
    """The generated docs/skill.md section of :func:`run_unseen`'s record."""

    lines = [
        "## The deterministic model on radars it was not trained on",
        "",
        "`make skill ARGS=--unseen` (`pipelines/skill_unseen.py`): the pretrained model zero-shot "
        f"on {' and '.join(result['radars'])}, as it is (`none`) and with each lead matched to "
        "the last observed frame's distribution (`cdf`: pysteps' `nonparam_match_empirical_cdf`; "
        "`mean`: S-PROG's mean matching). The highest CSI at 1 mm/h ÷ LK's (means over lead "
        "times, then over the radars) is chosen, then the lower MAE ÷ LK's; the packaged "
        'checkpoint records it (`unseen_radar_matching`) and `probability_matching="auto"` '
        "applies it on every radar outside its training sources. Per lead, 10 to 60 min:",
        "",
        "| matching | radar | CSI ≥ 1 mm/h (LK) | CSI ÷ LK | MAE (mm/h) | MAE ÷ LK | "
        "frequency bias at 1 mm/h |",
        "|---|---|---|---|---|---|---|",
    ]
    for matching in CANDIDATES:
        chosen = " **(chosen)**" if matching == result["selected"] else ""
        for radar, scores in result["radars"].items():
            row = scores[matching]
            lines.append(
                f"| `{matching}`{chosen} | {radar} | {slashed(row['csi'])} "
                f"({slashed(scores['lk']['csi'])}) | {row['csi_over_lk']:.2f} | "
                f"{slashed(row['mae'])} | {row['mae_over_lk']:.2f} | {slashed(row['bias'])} |"
            )
    return [*lines, ""]
