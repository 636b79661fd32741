"""Probabilistic skill: the learned ensemble trained, calibrated on validation, shipped, scored.

``python -m pipelines.skill --ensemble`` runs, for ``pipelines/configs/bom_lagrangian_crps.yaml``:

1. ingest, patches and a fresh training of the stochastic ConvLSTM on the fair CRPS
   (``--evaluate-only`` keeps the checkpoint of an earlier run);
2. on the BoM validation windows only: the noise gain of the members
   (:data:`GAINS`), chosen by :func:`select_gain`, then the route: the learned ensemble
   against the deterministic model perturbed with STEPS noise (``model_steps``), chosen by
   :func:`select_route`, with the paired interval of their CRPS difference; and pysteps STEPS
   on the same windows, in a run of its own, so that the report can hold the field's reference
   to the same gates (:func:`run_steps_on_validation`);
3. on held-out radars the ensemble never saw (:data:`UNSEEN_RADARS`, KNMI and FMI 2017): its
   members as they are or matched to the last frame (:data:`UNSEEN_MATCHINGS`), chosen by
   :func:`select_unseen_matching` for every radar it was not trained on;
4. the chosen checkpoint, gain and matching written to the package (:data:`PACKAGED`);
5. the BoM test block against pysteps STEPS, ``lagrangian_probability``, the deterministic
   model, LK and persistence, and FMI 2016 zero-shot, which serve nothing but the numbers.

The gates and targets of ``docs/skill.md`` are computed from those runs' tables
(:mod:`pipelines.skill_ensemble_report`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from nowcast.config import ExperimentConfig, load_experiment
from nowcast.evaluate.stage import evaluate
from nowcast.evaluate.zeroshot import evaluate_source
from nowcast.sources.ingest import ingest
from nowcast.training.checkpoint import (
    PRETRAINED_ENSEMBLE_CHECKPOINT,
    load_checkpoint,
    save_checkpoint,
    with_unseen_matching,
)
from pipelines.skill_runs import hardware, train_from_scratch

REPO = Path(__file__).resolve().parent.parent
ENSEMBLE_CONFIG = "pipelines/configs/bom_lagrangian_crps.yaml"
ENSEMBLE_DIR = REPO / "docs" / "skill" / "ensemble"
PACKAGED = PRETRAINED_ENSEMBLE_CHECKPOINT
ZERO_SHOT_SOURCE = "fmi_2016"
#: Every second 5-minute FMI start: one per 10-minute model step.
ZERO_SHOT_STRIDE = 2
#: Radars outside the training data on which the members' matching there is chosen, each with
#: its start stride (5-minute starts): not the reported zero-shot radar.
UNSEEN_RADARS = {"knmi": 4, "fmi_2017": 2}
#: The candidate matchings on unseen radars and the method each is scored as.
UNSEEN_MATCHINGS = {"none": "ensemble", "cdf": "ensemble_cdf"}
#: Factors on the members' noise tried on the validation windows.
GAINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: The methods every gate is measured beside: they set the common mask of the scores.
GATE_METHODS = ["extrapolation", "model", "ensemble"]
ROUTES = ("ensemble", "model_steps")
TEST_METHODS = [
    "persistence",
    "extrapolation",
    "model",
    "ensemble",
    "model_steps",
    "steps",
    "lagrangian_probability",
]
ZERO_SHOT_METHODS = ["extrapolation", "model", "ensemble", "steps", "lagrangian_probability"]
LEADS = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
SPREAD_SKILL_RANGE = (0.5, 1.5)
RAPSD_BAND_KM = (4.0, 32.0)
RAPSD_FACTOR = 2.0
RAPSD_LEAD = 60.0
POOLING = 16.0


# --------------------------------------------------------------------------------------------
# tables


def series(table: pd.DataFrame, method: str, score: str, threshold=None, scale=None) -> np.ndarray:
    """A score's point estimates at :data:`LEADS` (NaN where missing)."""
    rows = table[(table["method"] == method) & (table["score"] == score)]
    if threshold is not None:
        rows = rows[np.isclose(rows["threshold"], threshold)]
    if scale is not None:
        rows = rows[np.isclose(rows["scale"], scale)]
    values = rows.groupby("lead_time")["value"].mean()
    return np.array([values.get(lead, np.nan) for lead in LEADS], dtype=float)


def rapsd_ratio(curves: pd.DataFrame, method: str, lead: float = RAPSD_LEAD) -> pd.Series:
    """Mean member RAPSD ÷ the observation's, by wavelength (km) in :data:`RAPSD_BAND_KM`."""
    rows = curves[(curves["method"] == method) & np.isclose(curves["lead_time"], lead)]
    rows = rows[rows["curve"].str.startswith("RAPSD")]
    power = rows.pivot_table(index="x", columns="curve", values="y")
    low, high = RAPSD_BAND_KM
    power = power[(power.index >= low) & (power.index <= high)]
    return power["RAPSD_FORECAST"] / power["RAPSD_OBSERVED"]


def summarise(outputs: dict, methods: list[str]) -> dict:
    """What the report needs of one evaluation: its tables' paths and the RAPSD ratio bands."""
    curves = pd.read_csv(outputs["ensemble_curves_csv"])
    bands = {}
    for method in methods:
        ratio = rapsd_ratio(curves, method)
        if not ratio.empty:
            bands[method] = [float(ratio.min()), float(ratio.max())]
    return {
        "metrics": outputs["metrics_csv"],
        "ensemble_metrics": outputs["ensemble_metrics_csv"],
        "rapsd_ratio_range": bands,
    }


def gates(ensemble_metrics: pd.DataFrame, rapsd_range, method: str = "ensemble") -> list[dict]:
    """The issue's four gates for ``method``: name, values, met."""
    crps = series(ensemble_metrics, method, "CRPS")
    mae = series(ensemble_metrics, "model", "CRPS")  # a deterministic method's CRPS is its MAE
    ratio = series(ensemble_metrics, method, "SPREAD_SKILL")
    pooled = series(ensemble_metrics, method, "CRPS_POOLED", scale=POOLING)
    lk_pooled = series(ensemble_metrics, "extrapolation", "CRPS_POOLED", scale=POOLING)
    low, high = SPREAD_SKILL_RANGE
    band = np.array(rapsd_range if rapsd_range else [np.nan, np.nan], dtype=float)
    return [
        {
            "name": "CRPS < the model's MAE at every lead",
            "values": crps,
            "beside": mae,
            "met": bool(np.all(crps < mae)),
        },
        {
            "name": f"spread/skill in {low:g}–{high:g} at every lead",
            "values": ratio,
            "met": bool(np.all((ratio >= low) & (ratio <= high))),
        },
        {
            "name": f"CRPS after {POOLING:g}×{POOLING:g} pooling < LK's pooled MAE",
            "values": pooled,
            "beside": lk_pooled,
            "met": bool(np.all(pooled < lk_pooled)),
        },
        {
            "name": f"mean member RAPSD within {RAPSD_FACTOR:g}× of the observation's at "
            f"{RAPSD_BAND_KM[0]:g}–{RAPSD_BAND_KM[1]:g} km, {RAPSD_LEAD:g} min (ratio range)",
            "values": band,
            "met": bool(band[0] >= 1 / RAPSD_FACTOR and band[1] <= RAPSD_FACTOR),
        },
    ]


def gates_met(ensemble_metrics: pd.DataFrame, rapsd_range, method: str = "ensemble") -> int:
    """How many of :func:`gates` ``method`` meets."""
    return sum(gate["met"] for gate in gates(ensemble_metrics, rapsd_range, method))


def select_gain(sweep: dict) -> float:
    """The gain meeting the most gates on validation; ties by the lower mean CRPS."""

    def key(gain: str) -> tuple[int, float]:
        table = pd.read_csv(sweep[gain]["ensemble_metrics"])
        met = gates_met(table, sweep[gain]["rapsd_ratio_range"].get("ensemble"))
        return met, -float(np.nanmean(series(table, "ensemble", "CRPS")))

    return float(max(sweep, key=key))


def select_unseen_matching(radars: dict) -> str:
    """The matching meeting the most gates over the unseen radars; ties by the lower CRPS.

    The CRPS of a candidate is its mean over leads divided by LK's mean MAE, averaged over the
    radars, so that no radar weighs more for raining more.
    """

    def key(matching: str) -> tuple[int, float]:
        method = UNSEEN_MATCHINGS[matching]
        met, relative = 0, []
        for summary in radars.values():
            table = pd.read_csv(summary["ensemble_metrics"])
            band = summary["rapsd_ratio_range"].get(method)
            met += gates_met(table, band, method)
            lk = np.nanmean(series(table, "extrapolation", "CRPS"))
            relative.append(np.nanmean(series(table, method, "CRPS")) / lk)
        return met, -float(np.mean(relative))

    return max(UNSEEN_MATCHINGS, key=key)


def select_route(summary: dict) -> str:
    """The route meeting the most gates on validation; ties by the lower mean CRPS."""
    table = pd.read_csv(summary["ensemble_metrics"])

    def key(route: str) -> tuple[int, float]:
        met = gates_met(table, summary["rapsd_ratio_range"].get(route), route)
        return met, -float(np.nanmean(series(table, route, "CRPS")))

    return max(ROUTES, key=key)


# --------------------------------------------------------------------------------------------
# runs


def _evaluate(experiment: ExperimentConfig, run_dir: str, **section) -> dict:
    experiment = experiment.model_copy(
        update={"run_dir": run_dir, "evaluate": {**experiment.evaluate, **section}}
    )
    return evaluate(experiment, progress=False)


def _ensemble_kwargs(checkpoint: str, gain: float | None) -> dict:
    kwargs = {"checkpoint": checkpoint}
    return kwargs if gain is None else {**kwargs, "noise_gain": gain}


def package(checkpoint: str, gain: float, note: str, unseen_matching: str = "none") -> Path:
    """Write the chosen checkpoint, with its noise gain and its matching on unseen radars
    (``unseen_radar_matching``, left out for ``"none"``), to the package (atomically)."""
    state = with_unseen_matching(load_checkpoint(checkpoint), unseen_matching)
    state["model_kwargs"] = {**state["model_kwargs"], "noise_gain": float(gain)}
    state["provenance"] = note
    save_checkpoint(PACKAGED, state)
    return PACKAGED


def _copy(path: str, name: str) -> str:
    ENSEMBLE_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ENSEMBLE_DIR / name)
    return str((ENSEMBLE_DIR / name).relative_to(REPO))


def _kept(summary: dict, stem: str) -> dict:
    """The summary with its tables copied under docs/skill/ensemble/."""
    return {
        **summary,
        "metrics": _copy(summary["metrics"], f"{stem}_metrics.csv"),
        "ensemble_metrics": _copy(summary["ensemble_metrics"], f"{stem}_ensemble_metrics.csv"),
    }


def earlier_training(experiment: ExperimentConfig) -> dict:
    """The record of the checkpoint already in the run folder (``--evaluate-only``)."""
    checkpoint = Path(experiment.run_path) / "checkpoints" / "best.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--evaluate-only: no checkpoint {checkpoint}; train it first")
    state = load_checkpoint(checkpoint)
    return {
        "steps": int(state["step"]),
        "stop_reason": "an earlier run, kept by --evaluate-only",
        "train_seconds": None,
        "hardware": "an earlier run",
        "model": experiment.train.get("model", {}),
    }


def run_training(experiment: ExperimentConfig, previous: dict | None) -> dict:
    """Ingest, patches and a fresh training, or the earlier run's record (``previous``)."""
    if previous is not None:
        return previous
    summary, seconds = train_from_scratch(experiment)
    return {
        "steps": summary["steps"],
        "stop_reason": summary["stop_reason"],
        "train_seconds": seconds,
        "hardware": hardware(),
        "model": experiment.train.get("model", {}),
    }


def run_unseen_radars(experiment: ExperimentConfig, checkpoint: str, gain: float) -> dict:
    """The ensemble as it is and matched, on each of :data:`UNSEEN_RADARS` (zero-shot)."""
    kwargs = {**_ensemble_kwargs(checkpoint, gain), "probability_matching": "none"}
    matched = {"method": "ensemble", "postprocess": {"method": "cdf", "target": "last_input"}}
    radars = {}
    for source, stride in UNSEEN_RADARS.items():
        outputs = evaluate_source(
            source,
            checkpoint=experiment.evaluate.get("checkpoint"),
            out_dir=f"runs/{experiment.name}/unseen_{source}",
            methods=[*GATE_METHODS, UNSEEN_MATCHINGS["cdf"]],
            forecast_methods={UNSEEN_MATCHINGS["cdf"]: matched},
            method_kwargs={"ensemble": kwargs},
            compare="ensemble",
            progress=False,
            figures=False,
            window_stride=stride,
        )
        summary = summarise(outputs, list(UNSEEN_MATCHINGS.values()))
        radars[source] = _kept(summary, f"unseen_{source}")
    return radars


def run_steps_on_validation(experiment: ExperimentConfig, run_dir: str, kwargs: dict) -> dict:
    """STEPS and the chosen ensemble on the validation windows, on the mask they share.

    A run of its own: STEPS' members, each advected along its own perturbed motion, leave more
    pixels without data near the grid's edges, and the gain and route are chosen on the masks
    of their own runs, which STEPS must not change.
    """
    outputs = _evaluate(
        experiment,
        run_dir,
        split="val",
        methods=[*GATE_METHODS, "steps"],
        method_kwargs=kwargs,
        figures=False,
        map_times=[],
    )
    return _kept(summarise(outputs, ["ensemble", "steps"]), "val_steps")


def run_ensemble(
    config: str = ENSEMBLE_CONFIG, previous: dict | None = None, keep: bool = False
) -> dict:
    """Train, choose the gain and route on validation, ship, and score on test and FMI.

    ``keep`` (``--evaluate-only``) keeps the checkpoint of the run folder: the training record
    of ``previous`` if there is one, else what the checkpoint says of itself.
    """
    experiment = load_experiment(REPO / config)
    for source in experiment.sources:
        ingest(source, experiment.cube_root, progress=False)
    if keep:
        training = (previous or {}).get("training") or earlier_training(experiment)
    else:
        training = run_training(experiment, None)
    checkpoint = str(Path(experiment.run_path) / "checkpoints" / "best.pt")
    root = f"runs/{experiment.name}"
    start = time.perf_counter()
    sweep = {}
    for gain in GAINS:
        section = {"split": "val", "methods": GATE_METHODS, "figures": False, "map_times": []}
        section["method_kwargs"] = {"ensemble": _ensemble_kwargs(checkpoint, gain)}
        outputs = _evaluate(experiment, f"{root}/val_gain_{gain:g}", **section)
        sweep[f"{gain:g}"] = _kept(summarise(outputs, ["ensemble"]), f"val_gain_{gain:g}")
    gain = select_gain(sweep)
    kwargs = {"ensemble": _ensemble_kwargs(checkpoint, gain)}
    methods = [*GATE_METHODS, "model_steps"]
    outputs = _evaluate(
        experiment,
        f"{root}/val_routes",
        split="val",
        methods=methods,
        method_kwargs=kwargs,
        compare="ensemble",
        figures=False,
        map_times=[],
    )
    routes_val = _kept(summarise(outputs, list(ROUTES)), "val_routes")
    route = select_route(routes_val)
    steps_val = run_steps_on_validation(experiment, f"{root}/val_steps", kwargs)
    unseen = run_unseen_radars(experiment, checkpoint, gain)
    matching = select_unseen_matching(unseen)
    note = (
        f"make skill ({config}): best.pt of {training['steps']} steps; noise_gain {gain:g} "
        f"chosen on the BoM validation windows from {', '.join(sweep)}; route '{route}'; "
        f"matching '{matching}' on radars it was not trained on, chosen on "
        f"{' and '.join(UNSEEN_RADARS)}"
    )
    package(checkpoint, gain, note, matching)
    shipped = {"ensemble": {"checkpoint": str(PACKAGED.relative_to(REPO))}}
    test = _evaluate(
        experiment,
        f"{root}/test",
        methods=TEST_METHODS,
        method_kwargs=shipped,
        compare="ensemble",
    )
    figures = [
        _copy(figure, Path(figure).name)
        for figure in test["figures"]
        if figure.endswith(".png")
        and any(
            key in Path(figure).stem
            for key in ("crps", "rank", "reliab", "roc", "rapsd", "probab", "spectr")
        )
    ]
    zero_shot = evaluate_source(
        ZERO_SHOT_SOURCE,
        checkpoint=experiment.evaluate.get("checkpoint"),
        out_dir=f"{root}/{ZERO_SHOT_SOURCE}",
        methods=ZERO_SHOT_METHODS,
        method_kwargs=shipped,
        compare="ensemble",
        progress=False,
        figures=False,
        window_stride=ZERO_SHOT_STRIDE,
    )
    return {
        "config": config,
        "command": "python -m pipelines.skill --ensemble",
        "training": training,
        "gains": list(GAINS),
        "sweep": sweep,
        "selected_gain": gain,
        "routes_val": routes_val,
        "selected_route": route,
        "steps_val": steps_val,
        "unseen_radars": unseen,
        "selected_unseen_matching": matching,
        "packaged": str(PACKAGED.relative_to(REPO)),
        "test": _kept(summarise(test, ["ensemble", "model_steps", "steps"]), "bom_test"),
        "zero_shot": _kept(summarise(zero_shot, ["ensemble", "steps"]), ZERO_SHOT_SOURCE),
        "figures": [str(Path(f).relative_to("docs")) for f in figures],
        "evaluation_minutes": (time.perf_counter() - start) / 60,
        "hardware": hardware(),
    }
