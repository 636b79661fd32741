"""Verification score plots from the tidy metrics table.

The table has one row per (method, lead_time, threshold, scale, score) with columns ``method``,
``lead_time`` (minutes), ``threshold`` (mm/h, NaN for continuous scores), ``scale`` (NaN unless
the score is spatial), ``score``, ``value``, ``ci_low`` and ``ci_high`` (bootstrap interval, NaN
when not computed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

# Baselines keep the same colour and line style in every figure of every experiment.
BASELINE_STYLES = {
    "observed": {"color": "black", "linestyle": "-"},
    "persistence": {"color": "0.45", "linestyle": ":"},
    "extrapolation": {"color": "tab:blue", "linestyle": "--"},
    "sprog": {"color": "tab:green", "linestyle": "--"},
    "steps": {"color": "tab:olive", "linestyle": "--"},
    "anvil": {"color": "tab:cyan", "linestyle": "--"},
}
# Other methods (the learned models) take these colours in sorted-name order.
MODEL_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "gold")
METRICS_COLUMNS = ("method", "lead_time", "threshold", "scale", "score", "value")


def method_styles(methods: Iterable[str]) -> dict[str, dict]:
    """Line colour and style per method.

    Baselines (:data:`BASELINE_STYLES`) have fixed styles; the other methods get
    :data:`MODEL_COLORS` in sorted order, so a set of methods is drawn the same way in every
    figure.
    """
    styles = {}
    models = sorted(m for m in set(methods) if m not in BASELINE_STYLES)
    for i, name in enumerate(models):
        styles[name] = {
            "color": MODEL_COLORS[i % len(MODEL_COLORS)],
            "linestyle": "-" if i < len(MODEL_COLORS) else "-.",
        }
    for name in set(methods) & set(BASELINE_STYLES):
        styles[name] = dict(BASELINE_STYLES[name])
    return styles


def _check_columns(metrics: pd.DataFrame) -> None:
    missing = [c for c in METRICS_COLUMNS if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns {missing}; has {list(metrics.columns)}")


def _method_order(methods: Iterable[str]) -> list[str]:
    """Baselines first (in their fixed order), then models by name."""
    methods = set(methods)
    baselines = [m for m in BASELINE_STYLES if m in methods]
    return baselines + sorted(methods - set(baselines))


def _draw_lines(ax, table: pd.DataFrame, styles: dict[str, dict]) -> None:
    for method in _method_order(table["method"].unique()):
        rows = table[table["method"] == method].sort_values("lead_time")
        lead = rows["lead_time"].to_numpy(dtype=float)
        style = styles[method]
        ax.plot(lead, rows["value"], marker="o", markersize=3, label=method, **style)
        if {"ci_low", "ci_high"} <= set(rows.columns):
            low = rows["ci_low"].to_numpy(dtype=float)
            high = rows["ci_high"].to_numpy(dtype=float)
            finite = np.isfinite(low) & np.isfinite(high)
            if finite.any():
                ax.fill_between(
                    lead[finite],
                    low[finite],
                    high[finite],
                    color=style["color"],
                    alpha=0.18,
                    linewidth=0,
                )
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("lead time (min)")


def _panel_title(threshold, scale) -> str:
    parts = []
    if pd.notna(threshold):
        parts.append(f"≥ {threshold:g} mm/h")
    if pd.notna(scale):
        parts.append(f"scale {scale:g}")
    return ", ".join(parts)


def _save(fig, path: str | Path | None):
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_score_vs_lead_time(
    metrics: pd.DataFrame, score: str = "CSI", path: str | Path | None = None
):
    """A categorical or spatial score against lead time, one panel per threshold (and scale).

    Parameters
    ----------
    metrics : pandas.DataFrame
        The tidy metrics table (see the module docstring).
    score : str
        Score name as in the ``score`` column (``CSI``, ``POD``, ``FAR``, ``FSS``, ...).
    path : str or Path, optional
        Save the figure here.

    Returns
    -------
    matplotlib.figure.Figure
        One line per method with its bootstrap confidence band.

    Raises
    ------
    ValueError
        If the table has no rows for ``score``.
    """
    _check_columns(metrics)
    table = metrics[metrics["score"] == score]
    if table.empty:
        known = ", ".join(sorted(metrics["score"].unique()))
        raise ValueError(f"no '{score}' rows in the metrics table; scores: {known}")
    styles = method_styles(metrics["method"].unique())
    panels = (
        table[["threshold", "scale"]].drop_duplicates().sort_values(["threshold", "scale"])
    ).itertuples(index=False)
    panels = list(panels)
    n_cols = min(len(panels), 3)
    n_rows = int(np.ceil(len(panels) / n_cols))
    fig = Figure(figsize=(4.2 * n_cols, 3.4 * n_rows + 0.5), layout="constrained")
    axes = fig.subplots(
        n_rows,
        n_cols,
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    # zip stops at the last panel; the spare axes of the grid are hidden below.
    for ax, (threshold, scale) in zip(axes.flat, panels, strict=False):
        rows = table[_matches(table["threshold"], threshold) & _matches(table["scale"], scale)]
        _draw_lines(ax, rows, styles)
        ax.set_title(_panel_title(threshold, scale), fontsize=11)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(score)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=9, title="method")
    fig.suptitle(f"{score} against lead time (shaded: bootstrap confidence interval)", fontsize=12)
    return _save(fig, path)


def _matches(column: pd.Series, value) -> pd.Series:
    return column.isna() if pd.isna(value) else np.isclose(column.astype(float), value)


def plot_continuous_scores(
    metrics: pd.DataFrame,
    scores: Sequence[str] = ("MSE", "MAE"),
    path: str | Path | None = None,
):
    """Continuous scores against lead time, one panel per score.

    Parameters
    ----------
    metrics : pandas.DataFrame
        The tidy metrics table (see the module docstring).
    scores : sequence of str
        Scores to plot; those missing from the table are left out.
    path : str or Path, optional
        Save the figure here.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        If none of ``scores`` is in the table.
    """
    _check_columns(metrics)
    present = [s for s in scores if (metrics["score"] == s).any()]
    if not present:
        known = ", ".join(sorted(metrics["score"].unique()))
        raise ValueError(f"none of {list(scores)} in the metrics table; scores: {known}")
    styles = method_styles(metrics["method"].unique())
    fig = Figure(figsize=(4.4 * len(present) + 1.4, 3.8), layout="constrained")
    axes = fig.subplots(1, len(present), squeeze=False)
    for ax, score in zip(axes.flat, present, strict=True):
        _draw_lines(ax, metrics[metrics["score"] == score], styles)
        ax.set_title(score, fontsize=11)
        ax.set_ylabel(score)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=9, title="method")
    return _save(fig, path)
