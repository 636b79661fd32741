"""``make skill`` / ``make compare``: train and evaluate the committed experiments on the real
samples and write ``docs/skill.md`` with its figures.

Each experiment runs the stages in order (ingest -> patches -> train -> evaluate) from its config
under ``pipelines/configs/``; training starts fresh. ``--compare`` trains every registered model
(ConvLSTM, CNN-LSTM, FC-LSTM) on the same patch store with the same budget and evaluation.

    python -m pipelines.skill                      # the skill experiments
    python -m pipelines.skill --compare            # the model comparison
    python -m pipelines.skill --ensemble           # the learned ensemble against STEPS
    python -m pipelines.skill --unseen             # the model's matching on unseen radars
    python -m pipelines.skill --report-only        # rewrite docs/skill.md from existing runs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from nowcast.config import ExperimentConfig, load_experiment
from nowcast.evaluate.calibration import calibrate
from nowcast.evaluate.report import markdown_table
from nowcast.evaluate.stage import evaluate
from nowcast.patches.build import build_patches
from nowcast.sources.ingest import ingest
from pipelines.skill_ensemble import run_ensemble
from pipelines.skill_ensemble_report import ensemble_section
from pipelines.skill_routes import routes_section, run_routes
from pipelines.skill_runs import hardware, train_from_scratch
from pipelines.skill_unseen import run_unseen, unseen_section

REPO = Path(__file__).resolve().parent.parent
# The plain ConvLSTM reference (pipelines/configs/bom.yaml) is trained by `make compare`.
SKILL_EXPERIMENTS = [
    "pipelines/configs/bom_lagrangian.yaml",
    "pipelines/configs/bom_lagrangian_tr.yaml",
    "pipelines/configs/bom_lagrangian_tr_bias.yaml",
    "pipelines/configs/bom_lagrangian_tr_pinball.yaml",
    "pipelines/configs/bom_lagrangian_tr_bmse.yaml",
    "pipelines/configs/bom_lagrangian_tr_dbz.yaml",
    "pipelines/configs/multi_source.yaml",
]
COMPARE_BASE = "pipelines/configs/bom.yaml"
COMPARE_MODELS = {
    "convlstm": {"patch_factor": 4, "hidden_channels": [64, 64], "kernel_sizes": [3, 3]},
    "cnn_lstm": {"tile_size": 64},
    "fc_lstm": {"tile_size": 16},
}
COMPARE_MINUTES = 3.0
DOC = REPO / "docs" / "skill.md"
FIGURES = REPO / "docs" / "skill"
RESULTS = FIGURES / "results.json"


def run_experiment(
    experiment: ExperimentConfig,
    command: str,
    calibrated: bool = False,
    previous: dict | None = None,
) -> dict:
    """Ingest, patches, fresh training, calibration and evaluation of one experiment.

    With ``previous`` (an earlier result of the same experiment) training is skipped and the
    existing ``best.pt`` is re-calibrated and re-evaluated.
    """
    if previous is None:
        summary, train_seconds = train_from_scratch(experiment)
    else:
        for source in experiment.sources:
            ingest(source, experiment.cube_root, progress=False)
        build_patches(experiment, progress=False)
        summary = {"steps": previous["steps"], "stop_reason": previous["stop_reason"]}
        train_seconds = previous["train_seconds"]
    calibration = None
    if calibrated:
        # The calibrated model is its own forecast method, beside the raw one.
        start = time.perf_counter()
        calibration = calibrate(experiment)
        calibration["seconds"] = time.perf_counter() - start
        variant = {"method": "model", "postprocess": {"method": "isotonic"}}
        variant["postprocess"]["file"] = calibration["path"]
        methods = list(experiment.evaluate.get("methods") or ["persistence", "extrapolation"])
        section = {**experiment.evaluate, "methods": [*methods, "model_isotonic"]}
        update = {"forecast_methods": {**experiment.forecast_methods, "model_isotonic": variant}}
        experiment = experiment.model_copy(update={**update, "evaluate": section})
    outputs = evaluate(experiment)
    folder = FIGURES / experiment.name
    folder.mkdir(parents=True, exist_ok=True)
    figures = []
    for figure in outputs["figures"]:
        if figure.endswith(".png"):
            shutil.copy(figure, folder / Path(figure).name)
            figures.append(f"skill/{experiment.name}/{Path(figure).name}")
    metrics = pd.read_csv(outputs["metrics_csv"])
    metrics.to_csv(folder / "metrics.csv", index=False)
    return {
        "experiment": experiment.name,
        "description": experiment.description,
        "command": command,
        "train_seconds": train_seconds,
        "steps": summary["steps"],
        "stop_reason": summary["stop_reason"],
        "hardware": hardware(),
        "model": experiment.train.get("model", {}),
        "frame": experiment.patches.get("frame", "eulerian"),
        "time_reversal": bool(experiment.train.get("time_reversal", False)),
        "calibration": calibration,
        "figures": figures,
        "metrics_csv": str((folder / "metrics.csv").relative_to(REPO)),
    }


def compare_experiments() -> list[ExperimentConfig]:
    """One experiment per registered model on the BoM patch store, same budget and evaluation."""
    base = load_experiment(REPO / COMPARE_BASE)
    experiments = []
    for name, kwargs in COMPARE_MODELS.items():
        train_section = dict(base.train)
        train_section.update(
            model={"name": name, "kwargs": kwargs},
            max_minutes=COMPARE_MINUTES,
            max_steps=None,
            epochs=1000,
        )
        evaluate_section = dict(
            base.evaluate, figures=True, methods=["persistence", "extrapolation", "model"]
        )
        experiments.append(
            base.model_copy(
                update={
                    "name": f"compare_{name}",
                    "patch_store_name": base.name,
                    "run_dir": f"runs/compare_{name}",
                    "train": train_section,
                    "evaluate": evaluate_section,
                }
            )
        )
    return experiments


# --------------------------------------------------------------------------------------------
# docs/skill.md


def _value(
    metrics: pd.DataFrame, method: str, score: str, lead: int, threshold=None, source=None
) -> pd.Series:
    rows = metrics[(metrics["method"] == method) & (metrics["score"] == score)]
    rows = rows[rows["lead_time"] == lead]
    if threshold is not None:
        rows = rows[rows["threshold"] == threshold]
    if source is not None:
        rows = rows[rows["source"] == source]
    elif "source" in rows and (rows["source"] == "all").any():
        rows = rows[rows["source"] == "all"]
    return rows.iloc[0] if len(rows) else None


def _cell(row) -> str:
    if row is None:
        return "–"
    return f"{row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def score_table(metrics: pd.DataFrame, score: str, threshold=None, source=None) -> list[str]:
    leads = sorted(metrics["lead_time"].unique())
    known = ["persistence", "extrapolation", "sprog", "model", "model_isotonic"]
    methods = [m for m in known if m in set(metrics["method"])]
    rows = [
        [method]
        + [_cell(_value(metrics, method, score, lead, threshold, source)) for lead in leads]
        for method in methods
    ]
    return markdown_table(["method", *(f"{lead} min" for lead in leads)], rows).splitlines()


def target_check(metrics: pd.DataFrame) -> list[str]:
    """The issue's targets for the BoM experiments, measured."""
    leads = [lead for lead in sorted(metrics["lead_time"].unique()) if 10 <= lead <= 60]

    def mean(method, score, threshold=None):
        values = [_value(metrics, method, score, lead, threshold) for lead in leads]
        present = [v["value"] for v in values if v is not None]
        return sum(present) / len(present) if present else float("nan")

    csi_model, csi_lk = mean("model", "CSI", 1.0), mean("extrapolation", "CSI", 1.0)
    mse_model, mse_lk = mean("model", "MSE"), mean("extrapolation", "MSE")
    bias = [_value(metrics, "model", "BIAS", lead, 1.0) for lead in leads]
    bias_values = [b["value"] for b in bias if b is not None]
    lines = [
        f"- CSI at 1 mm/h, mean over 10–60 min: model {csi_model:.3f}, LK {csi_lk:.3f}, "
        f"ratio **{csi_model / csi_lk:.3f}** (target ≥ 1.10).",
        f"- MSE, mean over 10–60 min: model {mse_model:.2f}, LK {mse_lk:.2f}, "
        f"ratio **{mse_model / mse_lk:.3f}** (target ≤ 0.90).",
        f"- Frequency bias at 1 mm/h per lead: {', '.join(f'{b:.2f}' for b in bias_values)} "
        f"(target 0.8–1.25 at every lead: "
        f"{'met' if all(0.8 <= b <= 1.25 for b in bias_values) else 'not met'}).",
    ]
    if "sprog" in set(metrics["method"]):
        for lead in (30, 60):
            model, sprog = (
                _value(metrics, "model", "CSI", lead, 1.0),
                _value(metrics, "sprog", "CSI", lead, 1.0),
            )
            if model is not None and sprog is not None:
                lines.append(
                    f"- CSI at 1 mm/h, {lead} min: model {model['value']:.3f}, S-PROG "
                    f"{sprog['value']:.3f} (target: not below S-PROG): "
                    f"{'met' if model['value'] >= sprog['value'] else 'not met'}."
                )
    return lines


def sources_of(metrics: pd.DataFrame) -> list[str]:
    """The sources scored separately (all but the pooled ``all`` rows)."""
    return [s for s in dict.fromkeys(metrics["source"].astype(str)) if s != "all"]


def multi_source_check(metrics: pd.DataFrame) -> list[str]:
    """The multi-source target, measured: at least LK's CSI at 1 mm/h at 30-60 min per source."""
    lines = []
    leads = [lead for lead in sorted(metrics["lead_time"].unique()) if 30 <= lead <= 60]
    for source in sources_of(metrics):
        cells, met = [], True
        for lead in leads:
            model = _value(metrics, "model", "CSI", lead, 1.0, source)
            lk = _value(metrics, "extrapolation", "CSI", lead, 1.0, source)
            if model is None or lk is None:
                continue
            met &= model["value"] >= lk["value"]
            cells.append(f"{lead} min {model['value']:.3f} vs {lk['value']:.3f}")
        lines.append(
            f"- `{source}`: CSI at 1 mm/h, model vs LK: {'; '.join(cells)} "
            f"(target: at least LK at 30–60 min): {'met' if met else 'not met'}."
        )
    return lines


def score_tables(metrics: pd.DataFrame, source=None) -> list[str]:
    """CSI at 0.5/1/5 mm/h, frequency bias at 1 mm/h and MSE per lead, of one source or pooled."""
    lines = []
    for title, score, threshold in [
        *((f"CSI at {t:g} mm/h", "CSI", t) for t in (0.5, 1.0, 5.0)),
        ("Frequency bias at 1 mm/h", "BIAS", 1.0),
        ("MSE (mm²/h²)", "MSE", None),
    ]:
        lines += [f"{title}:", "", *score_table(metrics, score, threshold, source), ""]
    return lines


def source_sections(metrics: pd.DataFrame, figures: list[str]) -> list[str]:
    """Per-source score tables, CSI curve and maps of a multi-source run."""
    lines = []
    for source in sources_of(metrics):
        own = [
            f
            for f in figures
            if Path(f).stem == f"csi_vs_lead_time_{source}"
            or Path(f).stem.startswith(f"maps_{source}_2")
        ]
        lines += [f"### Source `{source}`", "", *score_tables(metrics, source)]
        lines += [f"![{Path(f).stem}]({f})" for f in own] + [""]
    return lines


def write_doc(results: dict) -> None:
    lines = [
        "# Skill on real radar",
        "",
        "Generated by `make skill` (and `make compare`) from `pipelines/skill.py`; do not edit by"
        " hand. Scores are pooled over the full-domain test windows (for BoM: radar 66,"
        " 2020-10-31, test block 08:00–11:50 UTC, one forecast every 10 minutes; the"
        " multi-source experiment lists its blocks) with 95 % bootstrap intervals over forecast"
        " start times in brackets. All methods are scored on the same pixels: where the"
        " observation and every forecast are finite.",
        "",
    ]
    for name, result in results.get("experiments", {}).items():
        metrics = pd.read_csv(REPO / result["metrics_csv"])
        several = len(sources_of(metrics)) > 1
        lines += [
            f"## {name}",
            "",
            result["description"],
            "",
            f"- Model: `{json.dumps(result['model'])}`, frame: {result['frame']}, "
            f"time-reversed windows: {'yes' if result.get('time_reversal') else 'no'}, "
            f"isotonic calibration on the validation windows: "
            f"{'yes (method `model_isotonic`)' if result.get('calibration') else 'no'}",
            f"- Training: {result['steps']} steps in {result['train_seconds'] / 60:.1f} min on "
            f"{result['hardware']} (stopped by: {result['stop_reason']})",
            f"- Reproduce: `{result['command']}`",
            "",
            "### Targets",
            "",
            *(multi_source_check(metrics) if several else target_check(metrics)),
            "",
        ]
        if several:
            lines += source_sections(metrics, result["figures"])
            continue
        lines += ["### Scores", "", *score_tables(metrics)]
        lines += [f"![{Path(f).stem}]({f})" for f in result["figures"]] + [""]
    lines += [
        "## Notes",
        "",
        "Analysis of earlier runs, with the numbers they measured, is hand-written in"
        " [`skill_notes.md`](skill_notes.md); this generated page holds only numbers that the"
        " runs above wrote.",
        "",
    ]
    if results.get("unseen"):
        lines += unseen_section(results["unseen"])
    if results.get("ensemble"):
        lines += ensemble_section(results["ensemble"])
    if results.get("routes"):
        lines += routes_section(results["routes"])
    comparison = results.get("compare")
    if comparison:
        lines += [
            "## Model comparison (ConvLSTM vs CNN-LSTM vs FC-LSTM)",
            "",
            f"Same patch store (BoM, Eulerian frame), same loss, {COMPARE_MINUTES:g} minutes of "
            "training each, same evaluation. Reproduce: `make compare`.",
            "",
            "| model | steps | CSI 1 mm/h @10 | @30 | @60 | MSE @30 | MSE @60 |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = [(name, result, "model") for name, result in comparison.items()]
        first = next(iter(comparison.values()))
        rows += [(baseline, first, baseline) for baseline in ("extrapolation", "persistence")]
        for name, result, method in rows:
            metrics = pd.read_csv(REPO / result["metrics_csv"])
            csi = [_value(metrics, method, "CSI", lead, 1.0) for lead in (10, 30, 60)]
            mse = [_value(metrics, method, "MSE", lead) for lead in (30, 60)]
            steps = result["steps"] if method == "model" else "–"
            lines.append(
                f"| {name} | {steps} | "
                + " | ".join(f"{c['value']:.3f}" if c is not None else "–" for c in csi)
                + " | "
                + " | ".join(f"{m['value']:.1f}" if m is not None else "–" for m in mse)
                + " |"
            )
        lines.append("")
        for name, result in comparison.items():
            csi_figures = [f for f in result["figures"] if "csi" in f]
            lines += [f"![{name}]({f})" for f in csi_figures[:1]]
        lines.append("")
    DOC.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.skill")
    parser.add_argument("--compare", action="store_true", help="train and compare all models")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/skill.md only")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="isotonic calibration on the validation windows before evaluating",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="keep the trained checkpoints; re-evaluate (and re-calibrate with --calibrate)",
    )
    parser.add_argument(
        "--routes",
        action="store_true",
        help="heavy-rain routes: postprocessing and blending of the pretrained model",
    )
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="the learned ensemble: train, choose its noise gain and route on validation, "
        "ship it, and score it against STEPS (with --evaluate-only: keep its checkpoint)",
    )
    parser.add_argument(
        "--unseen",
        action="store_true",
        help="the pretrained model's matching on radars it was not trained on: choose it on "
        "held-out radars and record it in the packaged checkpoint",
    )
    parser.add_argument("configs", nargs="*", help="experiment configs (default: the skill set)")
    args = parser.parse_args(argv)
    FIGURES.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.report_only:
        if args.ensemble:
            results["ensemble"] = run_ensemble(
                previous=results.get("ensemble"), keep=args.evaluate_only
            )
        elif args.unseen:
            results["unseen"] = run_unseen()
        elif args.routes:
            results["routes"] = run_routes()
        elif args.compare:
            section = results.setdefault("compare", {})
            for experiment in compare_experiments():
                section[experiment.name] = run_experiment(
                    experiment, "make compare", calibrated=False
                )
        else:
            section = results.setdefault("experiments", {})
            for config in args.configs or SKILL_EXPERIMENTS:
                experiment = load_experiment(REPO / config)
                previous = section.get(experiment.name) if args.evaluate_only else None
                if args.evaluate_only and previous is None:
                    parser.error(f"--evaluate-only: no earlier run of {experiment.name}")
                section[experiment.name] = run_experiment(
                    experiment,
                    f"python -m pipelines.skill {config}",
                    calibrated=args.calibrate,
                    previous=previous,
                )
        RESULTS.write_text(json.dumps(results, indent=2, default=str))
    write_doc(results)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
