"""The Markdown report of an evaluation (and the table helpers pipelines/skill.py shares)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from nowcast.config import ExperimentConfig
from nowcast.evaluate.setup import EvaluateConfig


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
) -> str:
    """The Markdown report: setup, score tables with intervals, and figure links."""
    threshold = config.report_threshold
    methods = summary["methods"]
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
        if figures.get(source):
            lines += ["### Figures", ""]
            lines += [f"![{Path(f).stem}]({f})" for f in figures[source]]
            lines.append("")
    lines += [
        "Files: `metrics.csv` / `metrics.json` (all scores, thresholds and scales), "
        "`differences.csv`.",
        "",
    ]
    return "\n".join(lines)
