"""The Markdown report of an evaluation (and the table helpers pipelines/skill.py shares)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from nowcast.config import ExperimentConfig
from nowcast.evaluate.setup import PROBABILITY_METHODS, EvaluateConfig


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(row: pd.Series, digits: str) -> str:
    if not np.isfinite(row["value"]):
        return "n/a"
    return f"{row['value']:{digits}} [{row['ci_low']:{digits}}, {row['ci_high']:{digits}}]"


def _lead_table(table: pd.DataFrame, columns: list[str], column_key: str, digits: str) -> str:
    rows = []
    for lead_time in sorted(table["lead_time"].unique()):
        at_lead = table[table["lead_time"] == lead_time]
        row = [f"{lead_time:g}"]
        for column in columns:
            match = at_lead[at_lead[column_key] == column]
            row.append(_cell(match.iloc[0], digits) if len(match) else "n/a")
        rows.append(row)
    return markdown_table(["lead time (min)", *columns], rows)


def _select(table: pd.DataFrame, score: str, threshold=None, scale=None) -> pd.DataFrame:
    chosen = table[table["score"] == score]
    if threshold is not None:
        chosen = chosen[np.isclose(chosen["threshold"], threshold)]
    if scale is not None:
        chosen = chosen[chosen["scale"] == scale]
    return chosen


def report_text(
    experiment: ExperimentConfig,
    config: EvaluateConfig,
    metrics: pd.DataFrame,
    differences: pd.DataFrame,
    summary: dict,
    figures: dict[str, list[str]],
    ensemble_metrics: pd.DataFrame | None = None,
) -> str:
    """The Markdown report: setup, score tables with intervals, and figure links.

    With ``ensemble_metrics`` (``ensemble_metrics.csv``) each source also gets the section
    "Probabilistic scores" (:func:`probabilistic_lines`); windows a method could not forecast
    (``summary["failed_windows"]``) are named in any case.
    """
    threshold = config.report_threshold
    methods = [name for name in summary["methods"] if name not in PROBABILITY_METHODS]
    lines = [
        f"# Evaluation of experiment `{experiment.name}`",
        "",
        (
            f"Catalog source `{summary['zero_shot']['source']}` (zero-shot)"
            if summary.get("zero_shot")
            else f"Split `{config.split}`"
        )
        + f"; methods: {', '.join(methods)}"
        + (f" (checkpoint `{summary['checkpoint']}`)" if summary.get("checkpoint") else "")
        + ".",
        f"Lead times {summary['lead_times'][0]:g} to {summary['lead_times'][-1]:g} min every "
        f"{summary['timestep_minutes']} min, from {summary['n_input_frames']} input frames.",
        "Scores are pooled over all forecast starts and scored on the pixels where the "
        "observation and every forecast have data. Brackets: "
        f"{config.confidence:.0%} percentile-bootstrap intervals over start times "
        f"({config.n_bootstrap} resamples); differences use paired resamples.",
        "",
    ]
    variants = summary.get("forecast_methods") or {}
    if variants:
        lines += ["Forecast-method variants (`forecast_methods`):", ""]
        lines += [f"- `{name}`: `{json.dumps(spec)}`" for name, spec in variants.items()]
        lines.append("")
    for source, info in summary["sources"].items():
        at_source = metrics[metrics["source"] == source]
        lines += [
            f"## Source `{source}`",
            "",
            f"{info['n_windows']} windows (reference times {info['first']} to {info['last']}, "
            f"one start every {summary['window_stride'] * summary['timestep_minutes']} min); "
            f"pixel {info['pixel_size_m']:g} m.",
            "",
            f"### CSI at {threshold:g} mm/h",
            "",
            _lead_table(_select(at_source, "CSI", threshold), methods, "method", ".3f"),
            "",
            "### MSE (mm² h⁻²)",
            "",
            _lead_table(_select(at_source, "MSE"), methods, "method", ".3g"),
            "",
        ]
        pixel_km = info["pixel_size_m"] / 1000.0
        scale_rows = []
        lead_times = sorted(at_source["lead_time"].unique())
        fss_lead = 30.0 if 30.0 in lead_times else lead_times[-1]
        fss = _select(at_source, "FSS", threshold)
        fss = fss[fss["lead_time"] == fss_lead]
        for scale in config.fss_scales:
            row = [f"{scale} ({scale * pixel_km:g} km)"]
            for method in methods:
                match = fss[(fss["scale"] == scale) & (fss["method"] == method)]
                row.append(_cell(match.iloc[0], ".3f") if len(match) else "n/a")
            scale_rows.append(row)
        lines += [
            f"### FSS at {threshold:g} mm/h, lead time {fss_lead:g} min",
            "",
            markdown_table(["scale (pixels)", *methods], scale_rows),
            "",
        ]
        at_diff = differences[differences["source"] == source]
        if len(at_diff):
            compare = at_diff["method"].iloc[0]
            baselines = list(dict.fromkeys(at_diff["baseline"]))
            for score, score_threshold, digits in (("CSI", threshold, ".3f"), ("MSE", None, ".3g")):
                chosen = _select(at_diff, score, score_threshold)
                label = f"{score} at {threshold:g} mm/h" if score_threshold else score
                lines += [
                    f"### {compare} minus baseline: {label}",
                    "",
                    _lead_table(chosen, baselines, "baseline", digits),
                    "",
                ]
        if ensemble_metrics is not None:
            at_source_ensemble = ensemble_metrics[ensemble_metrics["source"] == source]
            lines += probabilistic_lines(at_source_ensemble, summary, pixel_km)
        lines += failure_lines(summary, source)
        if figures.get(source):
            lines += ["### Figures", ""]
            lines += [f"![{Path(f).stem}]({f})" for f in figures[source]]
            lines.append("")
    lines += [
        "Files: `metrics.csv` / `metrics.json` (all scores, thresholds and scales), "
        "`differences.csv`"
        + (
            "; `ensemble_metrics.csv` (probabilistic scores) and `ensemble_curves.csv` (rank "
            "histograms, reliability diagrams, ROC curves, power spectra)."
            if ensemble_metrics is not None
            else "."
        ),
        "",
    ]
    return "\n".join(lines)


def _threshold_table(table: pd.DataFrame, score: str, digits: str) -> str:
    """One row per method and threshold, one column per lead time."""
    chosen = table[table["score"] == score]
    lead_times = sorted(chosen["lead_time"].unique())
    rows = []
    for method in dict.fromkeys(chosen["method"]):
        at_method = chosen[chosen["method"] == method]
        for threshold in sorted(at_method["threshold"].unique()):
            at_threshold = at_method[np.isclose(at_method["threshold"], threshold)]
            row = [f"{method}, ≥ {threshold:g} mm/h"]
            for lead_time in lead_times:
                match = at_threshold[at_threshold["lead_time"] == lead_time]
                row.append(_cell(match.iloc[0], digits) if len(match) else "n/a")
            rows.append(row)
    return markdown_table(["method, event", *[f"{t:g} min" for t in lead_times]], rows)


def _pooled_table(table: pd.DataFrame, pixel_km: float) -> tuple[float, str]:
    """Pooled CRPS at the last lead time: one row per block size, one column per method."""
    pooled = table[table["score"] == "CRPS_POOLED"]
    lead_time = pooled["lead_time"].max()
    pooled = pooled[pooled["lead_time"] == lead_time]
    methods = list(dict.fromkeys(pooled["method"]))
    rows = []
    for scale in sorted(pooled["scale"].unique()):
        row = [f"{scale:g} ({scale * pixel_km:g} km)"]
        for method in methods:
            match = pooled[(pooled["scale"] == scale) & (pooled["method"] == method)]
            row.append(_cell(match.iloc[0], ".3g") if len(match) else "n/a")
        rows.append(row)
    return lead_time, markdown_table(["block (pixels)", *methods], rows)


def probabilistic_lines(table: pd.DataFrame, summary: dict, pixel_km: float) -> list[str]:
    """The report's "Probabilistic scores" section of one source (``ensemble_metrics.csv``)."""
    info = summary.get("probabilistic", {})
    members = info.get("members", {})
    ensembles = [name for name, size in members.items() if size > 1]
    deterministic = [name for name, size in members.items() if size == 1]
    lines = ["### Probabilistic scores", ""]
    about = [", ".join(f"`{name}` has {members[name]} members" for name in ensembles) + "."]
    if deterministic:
        about.append(
            f"{', '.join(deterministic)}: deterministic, a one-member ensemble whose CRPS is "
            "its MAE."
        )
    about.append(
        "Events are rain rate ≥ threshold; every score is on the window's common mask, with "
        "the same start-time bootstrap intervals."
    )
    lines += [" ".join(about), ""]
    rain = [name for name in summary["methods"] if name in members]
    lines += [
        "#### CRPS (mm/h)",
        "",
        _lead_table(_select(table, "CRPS"), rain, "method", ".3g"),
        "",
    ]
    if (table["score"] == "CRPS_POOLED").any():
        lead_time, pooled = _pooled_table(table, pixel_km)
        lines += [
            f"#### CRPS of k × k block means, lead time {lead_time:g} min (mm/h)",
            "",
            pooled,
            "",
        ]
    if ensembles:
        lines += [
            "#### Spread/skill ratio (1: calibrated, below 1: under-dispersive)",
            "",
            _lead_table(_select(table, "SPREAD_SKILL"), ensembles, "method", ".3f"),
            "",
            "#### Rank-histogram divergence from flat, D_KL (nats)",
            "",
            _lead_table(_select(table, "RANK_KL"), ensembles, "method", ".3g"),
            "",
            "#### ROC area",
            "",
            _threshold_table(table, "ROC_AREA", ".3f"),
            "",
        ]
    lines += ["#### Brier score", "", _threshold_table(table, "BRIER", ".3g"), ""]
    if (table["score"] == "BSS").any():
        lines += [
            f"#### Brier skill score against `{info.get('brier_skill_reference')}`",
            "",
            _threshold_table(table, "BSS", ".3f"),
            "",
        ]
    return lines


def failure_lines(summary: dict, source: str) -> list[str]:
    """Windows of ``source`` a method could not forecast (scored as its stand-in forecast)."""
    failures = [f for f in summary.get("failed_windows", []) if f["source"] == source]
    stand_in = [name for name in summary["methods"] if name in ("steps", "model_steps")]
    if not failures:
        if stand_in and "probabilistic" in summary:
            named = " and ".join(f"`{name}`" for name in stand_in)
            return [f"{named} forecast every window.", ""]
        return []
    lines = [
        "### Windows a method could not forecast",
        "",
        "Each is scored as the method's stand-in forecast (STEPS and model_steps: zero rain).",
        "",
    ]
    lines += [f"- `{f['method']}` from {f['reference_time']}: {f['reason']}" for f in failures]
    return lines + [""]
