"""The ``## Probabilistic nowcasts`` section of ``docs/skill.md``, from the runs of
:func:`pipelines.skill_ensemble.run_ensemble`: every number here is read from their tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nowcast.evaluate.report import markdown_table
from pipelines.skill_ensemble import (
    LEADS,
    ROUTES,
    UNSEEN_MATCHINGS,
    UNSEEN_RADARS,
    ZERO_SHOT_SOURCE,
    gates,
    gates_met,
    series,
)

REPO = Path(__file__).resolve().parent.parent
HEAVY = 10.0
MOONSHOT_CRPS_RATIO = 0.9


def _read(path: str) -> pd.DataFrame:
    return pd.read_csv(REPO / path)


def slashed(values) -> str:
    """Per-lead values as "a / b / c" (3 significant digits, – where missing)."""
    return " / ".join("–" if not np.isfinite(v) else f"{v:.3g}" for v in np.asarray(values))


def _range(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{np.nanmin(values):.2f}–{np.nanmax(values):.2f}"


def _minutes(training: dict) -> str:
    if training.get("train_seconds") is None:
        return ""
    return f" in {training['train_seconds'] / 60:.1f} min on {training['hardware']}"


def _target(name: str, values, beside, met: bool, unit: str = "per lead") -> dict:
    return {"name": name, "values": values, "beside": beside, "met": bool(met), "unit": unit}


def targets(table: pd.DataFrame, method: str = "ensemble", reference: str = "steps") -> list:
    """The issue's targets of ``method`` against STEPS on one block, measured."""
    crps, steps = series(table, method, "CRPS"), series(table, reference, "CRPS")
    found = [
        _target(
            "CRPS ≤ STEPS, averaged over 10–60 min",
            [np.nanmean(crps)],
            [np.nanmean(steps)],
            np.nanmean(crps) <= np.nanmean(steps),
            "mean mm/h",
        ),
    ]
    for threshold in (5.0, 10.0):
        ours = series(table, method, "ROC_AREA", threshold)
        theirs = series(table, reference, "ROC_AREA", threshold)
        found.append(
            _target(
                f"ROC area at {threshold:g} mm/h ≥ STEPS at every lead",
                ours,
                theirs,
                np.all(ours >= theirs),
            )
        )
    kl, steps_kl = series(table, method, "RANK_KL"), series(table, reference, "RANK_KL")
    found.append(
        _target("rank-histogram KL ≤ STEPS at every lead", kl, steps_kl, np.all(kl <= steps_kl))
    )
    ratio, steps_ratio = (
        series(table, method, "SPREAD_SKILL"),
        series(table, reference, "SPREAD_SKILL"),
    )
    found.append(
        _target(
            "spread/skill at least as close to 1 as STEPS at every lead",
            ratio,
            steps_ratio,
            np.all(np.abs(ratio - 1) <= np.abs(steps_ratio - 1)),
        )
    )
    late = np.array([lead >= 30 for lead in LEADS])
    csi = series(table, method, "MEMBER_CSI", HEAVY)
    lk = series(table, "extrapolation", "MEMBER_CSI", HEAVY)
    found.append(
        _target(
            f"median member CSI > {HEAVY:g} mm/h ≥ LK's at 30–60 min",
            csi[late],
            lk[late],
            np.all(csi[late] >= lk[late]),
            "30 / 40 / 50 / 60 min",
        )
    )
    return found


def moonshots(tables: dict, method: str = "ensemble", reference: str = "steps") -> list:
    """The moonshot targets over the blocks in ``tables`` (name to ensemble metrics)."""
    found = []
    for block, table in tables.items():
        crps, steps = series(table, method, "CRPS"), series(table, reference, "CRPS")
        found.append(
            _target(f"{block}: CRPS ≤ STEPS at every lead", crps, steps, np.all(crps <= steps))
        )
        ratio = np.nanmean(crps) / np.nanmean(steps)
        found.append(
            _target(
                f"{block}: mean CRPS ≤ {MOONSHOT_CRPS_RATIO:g} × STEPS",
                [ratio],
                None,
                ratio <= MOONSHOT_CRPS_RATIO,
                "ratio",
            )
        )
        bss = series(table, method, "BSS", HEAVY)
        steps_bss = series(table, reference, "BSS", HEAVY)
        found.append(
            _target(
                f"{block}: Brier skill score at {HEAVY:g} mm/h > STEPS'",
                bss,
                steps_bss,
                np.all(bss > steps_bss),
            )
        )
    return found


def target_lines(found: list) -> list[str]:
    lines = []
    for target in found:
        beside = "" if target["beside"] is None else f"; STEPS/LK: {slashed(target['beside'])}"
        verdict = "met" if target["met"] else "**not met**"
        lines.append(
            f"- {target['name']}: {verdict} ({target['unit']}: {slashed(target['values'])}{beside})"
        )
    return lines + [""]


def gate_lines(table: pd.DataFrame, rapsd, method: str = "ensemble") -> list[str]:
    lines = []
    for gate in gates(table, rapsd, method):
        beside = f"; beside: {slashed(gate['beside'])}" if "beside" in gate else ""
        verdict = "met" if gate["met"] else "**not met**"
        lines.append(f"- {gate['name']}: {verdict} ({slashed(gate['values'])}{beside})")
    return lines + [""]


def gates_summary(blocks: dict) -> list[str]:
    """Gates met by the learned ensemble and, on the same windows, by STEPS, per block.

    ``blocks`` maps a block's name to its (ensemble metrics, RAPSD ratio ranges by method).
    STEPS is the field's reference: its row says whether a gate is within reach of the
    operational ensemble on that block. A block where STEPS was not run shows a dash.
    """
    rows = []
    for name, (table, bands) in blocks.items():
        row = [name]
        for method in ("ensemble", "steps"):
            if method not in set(table["method"]):
                row.append("–")
                continue
            met = gates_met(table, bands.get(method), method)
            row.append(f"{met} of 4")
        rows.append(row)
    header = ["block", "learned ensemble: gates met", "STEPS (reference): gates met"]
    return markdown_table(header, rows).splitlines() + [""]


def block_gate_lines(name: str, table: pd.DataFrame, bands: dict) -> list[str]:
    """One block's gates: the learned ensemble's, then STEPS' on the same windows if run."""
    lines = [f"{name}:", "", *gate_lines(table, bands.get("ensemble"))]
    if "steps" in set(table["method"]):
        lines += [
            f"{name}, STEPS (the reference) in the same run:",
            "",
            *gate_lines(table, bands.get("steps"), "steps"),
        ]
    return lines


def sweep_table(result: dict) -> list[str]:
    rows = []
    for gain, summary in result["sweep"].items():
        table = _read(summary["ensemble_metrics"])
        band = summary["rapsd_ratio_range"].get("ensemble", [np.nan, np.nan])
        met = gates_met(table, band)
        chosen = " **(chosen)**" if float(gain) == result["selected_gain"] else ""
        rows.append(
            [
                f"{gain}{chosen}",
                f"{met} of 4",
                f"{np.nanmean(series(table, 'ensemble', 'CRPS')):.3f}",
                _range(series(table, "ensemble", "SPREAD_SKILL")),
                _range(band),
            ]
        )
    header = ["noise gain", "gates met (val)", "mean CRPS (mm/h)", "spread/skill", "RAPSD ratio"]
    return markdown_table(header, rows).splitlines() + [""]


def route_lines(result: dict) -> list[str]:
    summary = result["routes_val"]
    table = _read(summary["ensemble_metrics"])
    rows = []
    for route in ROUTES:
        band = summary["rapsd_ratio_range"].get(route, [np.nan, np.nan])
        met = gates_met(table, band, route)
        chosen = " **(chosen)**" if route == result["selected_route"] else ""
        rows.append(
            [
                f"`{route}`{chosen}",
                f"{met} of 4",
                slashed(series(table, route, "CRPS")),
                _range(series(table, route, "SPREAD_SKILL")),
                _range(band),
            ]
        )
    header = ["route", "gates met (val)", "CRPS per lead (mm/h)", "spread/skill", "RAPSD ratio"]
    diff = table[(table["method"] == "model_steps") & (table["score"] == "CRPS_DIFF")]
    intervals = "; ".join(
        f"{row.lead_time:g} min {row.value:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]"
        for row in diff.sort_values("lead_time").itertuples()
    )
    return [
        *markdown_table(header, rows).splitlines(),
        "",
        "Paired 95 % bootstrap over validation starts, CRPS(`model_steps`) − CRPS(`ensemble`):"
        f" {intervals or 'not scored'}.",
        "",
    ]


def unseen_lines(result: dict) -> list[str]:
    """The matching on unseen radars: each candidate's gates, CRPS and calibration per radar."""
    radars = result.get("unseen_radars")
    if not radars:
        return []
    rows = []
    for matching, method in UNSEEN_MATCHINGS.items():
        chosen = " **(chosen)**" if matching == result["selected_unseen_matching"] else ""
        for source, summary in radars.items():
            table = _read(summary["ensemble_metrics"])
            band = summary["rapsd_ratio_range"].get(method, [np.nan, np.nan])
            met = gates_met(table, band, method)
            crps = series(table, method, "CRPS")
            lk = series(table, "extrapolation", "CRPS")
            rows.append(
                [
                    f"`{matching}`{chosen}",
                    source,
                    f"{met} of 4",
                    slashed(crps),
                    f"{np.nanmean(crps) / np.nanmean(lk):.2f}",
                    _range(series(table, method, "SPREAD_SKILL")),
                    _range(band),
                ]
            )
    header = [
        "matching",
        "radar",
        "gates met",
        "CRPS per lead (mm/h)",
        "CRPS ÷ LK MAE",
        "spread/skill",
        "RAPSD ratio",
    ]
    return [
        "### Matching on radars it was not trained on",
        "",
        f"Zero-shot on {' and '.join(UNSEEN_RADARS)} (the starts every "
        f"{' and '.join(f'{k * 5} min' for k in UNSEEN_RADARS.values())}): the members as they "
        "are (`none`) or, at each lead, pooled and matched to the last observed frame's "
        "distribution (`cdf`, pysteps' `nonparam_match_empirical_cdf` as STEPS matches its "
        "members). The most gates met over both radars, then the lower mean CRPS ÷ LK's MAE. "
        "The packaged checkpoint records the choice (`unseen_radar_matching`); the `ensemble` "
        "method applies it on every radar that is not among its training sources "
        '(`probability_matching="auto"`), so the BoM numbers below are unmatched and the '
        f"{ZERO_SHOT_SOURCE} numbers are the chosen matching's.",
        "",
        *markdown_table(header, rows).splitlines(),
        "",
    ]


def score_table(table: pd.DataFrame, methods: list[str]) -> list[str]:
    """CRPS (deterministic methods: MAE) per lead with intervals, one column per method."""
    present = [m for m in methods if m in set(table["method"])]
    rows = []
    for lead in LEADS:
        row = [f"{lead:g}"]
        for method in present:
            hit = table[(table["method"] == method) & (table["score"] == "CRPS")]
            hit = hit[np.isclose(hit["lead_time"], lead)]
            row.append(
                "–"
                if hit.empty
                else f"{hit.value.iloc[0]:.3f} [{hit.ci_low.iloc[0]:.3f}, "
                f"{hit.ci_high.iloc[0]:.3f}]"
            )
        rows.append(row)
    return markdown_table(["lead (min)", *present], rows).splitlines() + [""]


def block_lines(result: dict, block: str, title: str) -> list[str]:
    summary = result[block]
    table = _read(summary["ensemble_metrics"])
    rain = ["ensemble", "model_steps", "steps", "model", "extrapolation", "persistence"]
    lines = [f"### {title}", "", "CRPS (mm/h; deterministic methods: MAE):", ""]
    lines += score_table(table, rain)
    ensembles = [m for m in ("ensemble", "model_steps", "steps") if m in set(table["method"])]
    rows = []
    for method in ensembles:
        band = summary["rapsd_ratio_range"].get(method, [np.nan, np.nan])
        rows.append(
            [
                f"`{method}`",
                slashed(series(table, method, "SPREAD_SKILL")),
                slashed(series(table, method, "RANK_KL")),
                slashed(series(table, method, "ROC_AREA", 10.0)),
                slashed(series(table, method, "BSS", 10.0)),
                slashed(series(table, method, "MEMBER_CSI", HEAVY)),
                _range(band),
            ]
        )
    rows.append(
        [
            "`extrapolation`",
            "",
            "",
            "",
            "",
            slashed(series(table, "extrapolation", "MEMBER_CSI", HEAVY)),
            "",
        ]
    )
    header = [
        "method",
        "spread/skill",
        "rank KL",
        "ROC area ≥10 mm/h",
        "BSS ≥10 mm/h vs LP",
        "median member CSI >10 mm/h",
        "RAPSD ratio 60 min, 4–32 km",
    ]
    lines += ["Per lead, 10 to 60 min:", "", *markdown_table(header, rows).splitlines(), ""]
    return lines


def ensemble_section(result: dict) -> list[str]:
    """The whole section."""
    training = result["training"]
    test = _read(result["test"]["ensemble_metrics"])
    zero_shot = _read(result["zero_shot"]["ensemble_metrics"])
    val = _read(result["routes_val"]["ensemble_metrics"])
    steps, lk = series(test, "steps", "CRPS"), series(test, "extrapolation", "CRPS")
    blocks = {"BoM validation windows": (val, result["routes_val"]["rapsd_ratio_range"])}
    if result.get("steps_val"):
        blocks["BoM validation windows, on the mask shared with STEPS"] = (
            _read(result["steps_val"]["ensemble_metrics"]),
            result["steps_val"]["rapsd_ratio_range"],
        )
    blocks["BoM test block"] = (test, result["test"]["rapsd_ratio_range"])
    lines = [
        "## Probabilistic nowcasts: the learned ensemble against STEPS",
        "",
        f"`{result['config']}`: the stochastic ConvLSTM trained on the fair CRPS, "
        f"{training['steps']} steps{_minutes(training)} (stopped by: "
        f"{training['stop_reason']}). Reproduce: "
        f"`{result['command']}`; the chosen checkpoint is shipped as `{result['packaged']}`. "
        "20 members everywhere; CRPS is pysteps' CRPS in mm/h on the pixels where the "
        "observation and every forecast have data; deterministic methods enter as their MAE. "
        "The noise gain and the route are chosen on the BoM validation windows only, the "
        f"matching on other radars on {' and '.join(UNSEEN_RADARS)}; the test "
        f"block and {ZERO_SHOT_SOURCE} (zero-shot, a start every 10 minutes) serve nothing but "
        "the numbers below.",
        "",
        "### Noise gain, chosen on validation",
        "",
        "The most gates met on the validation windows, then the lower mean CRPS.",
        "",
        *sweep_table(result),
        "### Route, chosen on validation",
        "",
        "The learned ensemble against the deterministic model perturbed with STEPS noise "
        "(pysteps `blending.steps` with the model as an external nowcast).",
        "",
        *route_lines(result),
        *unseen_lines(result),
        "### Gates",
        "",
        "The issue's four gates, for the learned ensemble and, on the same windows and mask, "
        "for pysteps STEPS (20 members), the field's reference: a gate that STEPS misses on a "
        "block is one the operational ensemble does not meet there either. Each row is one "
        "run, scored on the pixels where every method of that run has data: the validation "
        "gates on the route run's mask (LK, the model, the ensemble and `model_steps`), "
        "then again in a run beside STEPS, whose members, each advected along its own "
        "perturbed motion, leave more pixels near the grid's edges without data; the test "
        "block's run holds every method.",
        "",
        *gates_summary(blocks),
        *[line for name, block in blocks.items() for line in block_gate_lines(name, *block)],
        "Sanity check: STEPS' CRPS is below LK's MAE at every lead of the BoM test block: "
        f"{'yes' if np.all(steps < lk) else '**no**'} ({slashed(steps)} against {slashed(lk)}).",
        "",
        "### Targets",
        "",
        "BoM test block:",
        "",
        *target_lines(targets(test)),
        f"{ZERO_SHOT_SOURCE}, zero-shot:",
        "",
        *target_lines(targets(zero_shot)),
        "Moonshot:",
        "",
        *target_lines(moonshots({"BoM test": test, ZERO_SHOT_SOURCE: zero_shot})),
        "Speed: see `make bench ARGS=ensemble` in [performance.md](performance.md).",
        "",
        *block_lines(result, "test", "Scores, BoM test block"),
        *block_lines(result, "zero_shot", f"Scores, {ZERO_SHOT_SOURCE} zero-shot"),
        *[f"![{Path(f).stem}]({f})" for f in result["figures"]],
        "",
    ]
    return lines
