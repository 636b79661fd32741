"""Heavy-rain routes: the pretrained model with postprocessing and blending, side by side.

``python -m pipelines.skill --routes`` runs, for ``pipelines/configs/bom_routes.yaml``:

1. the blend weights of every blending variant, fitted on the BoM validation windows
   (:func:`nowcast.evaluate.blend_fit.fit_blend_weights`);
2. evaluate on the validation windows: the route that meets the most targets there (ties: the
   higher mean CSI ratio to LK at 1, 5 and 10 mm/h) is *selected*, so no choice sees the test
   block;
3. evaluate on the BoM test block, and zero-shot on FMI 2016 (``nowcast evaluate --source``),
   which stays out of every fit and selection.

The targets and the route table of ``docs/skill.md`` are computed here from those runs' metrics.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from nowcast.config import ExperimentConfig, load_experiment
from nowcast.evaluate.blend_fit import fit_blend_weights
from nowcast.evaluate.report import markdown_table
from nowcast.evaluate.stage import evaluate

REPO = Path(__file__).resolve().parent.parent
ROUTES_CONFIG = "pipelines/configs/bom_routes.yaml"
ROUTES_DIR = REPO / "docs" / "skill" / "routes"
ZERO_SHOT_SOURCE = "fmi_2016"
#: Every second 5-minute FMI start (one per 10-minute model step) over the whole event.
ZERO_SHOT_STRIDE = 2
LEADS = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)
CSI_THRESHOLDS = (1.0, 5.0, 10.0)
BIAS_RANGE = (0.8, 1.25)
MSE_RATIO = 0.9
DRY_FA_MAX = 0.02
MOONSHOT_CSI_RATIO = 1.10
#: The shipped pretrained model (the ``bom_lagrangian_tr`` experiment's best checkpoint).
DEFAULT_MODEL = "bom_lagrangian_tr"
#: Candidate checkpoints: the pretrained model and the loss routes of ``make skill``.
ROUTE_MODELS = {
    DEFAULT_MODEL: "nowcast/pretrained/bom_lagrangian_convlstm.pt",
    "bom_lagrangian_tr_pinball": "runs/bom_lagrangian_tr_pinball/checkpoints/best.pt",
    "bom_lagrangian_tr_bmse": "runs/bom_lagrangian_tr_bmse/checkpoints/best.pt",
    "bom_lagrangian_tr_dbz": "runs/bom_lagrangian_tr_dbz/checkpoints/best.pt",
}


# --------------------------------------------------------------------------------------------
# runs


def with_fitted_weights(experiment: ExperimentConfig) -> tuple[ExperimentConfig, dict]:
    """The experiment with every blend's weights fitted on its validation windows."""
    variants = {name: dict(spec) for name, spec in experiment.forecast_methods.items()}
    fitted, by_pair = {}, {}
    for name, spec in variants.items():
        if spec.get("blend"):
            pair = (spec["method"], spec["blend"]["method"])  # the fit depends on these only
            if pair not in by_pair:
                by_pair[pair] = fit_blend_weights(experiment, name, split="val")
            fitted[name] = by_pair[pair]
            spec["blend"] = {**spec["blend"], "weights": fitted[name]}
    return experiment.model_copy(update={"forecast_methods": variants}), fitted


def _evaluate(experiment: ExperimentConfig, run_dir: str, **section) -> dict:
    experiment = experiment.model_copy(
        update={"run_dir": run_dir, "evaluate": {**experiment.evaluate, **section}}
    )
    return evaluate(experiment, progress=False)


def routes(experiment: ExperimentConfig) -> list[str]:
    """The model and its variants, in the config's method order."""
    methods = experiment.evaluate["methods"]
    return [m for m in methods if m == "model" or m in experiment.forecast_methods]


def run_model_routes(experiment: ExperimentConfig, model: str, checkpoint: str) -> dict:
    """Fit the blends, then evaluate every route of one checkpoint on val, test and zero-shot."""
    from nowcast.evaluate.zeroshot import evaluate_source

    evaluate_section = {**experiment.evaluate, "checkpoint": checkpoint}
    experiment = experiment.model_copy(update={"evaluate": evaluate_section})
    experiment, fitted = with_fitted_weights(experiment)
    folder = ROUTES_DIR / model
    folder.mkdir(parents=True, exist_ok=True)
    run_root = f"runs/{experiment.name}/{model}"
    val = _evaluate(experiment, f"{run_root}/val", split="val", figures=False)
    val_metrics = pd.read_csv(val["metrics_csv"])
    best = max(routes(experiment), key=lambda route: validation_key(val_metrics, route))
    # compare=best: differences.csv then holds its paired intervals against every baseline.
    test = _evaluate(experiment, f"{run_root}/test", compare=best)
    zero_shot = evaluate_source(
        ZERO_SHOT_SOURCE,
        checkpoint=checkpoint,
        out_dir=f"{run_root}/{ZERO_SHOT_SOURCE}",
        methods=experiment.evaluate["methods"],
        forecast_methods=experiment.forecast_methods,
        # The routes post-process the model as it is, not its default matching off BoM.
        method_kwargs={"model": {"probability_matching": "none"}},
        compare=best,
        progress=False,
        figures=False,
        window_stride=ZERO_SHOT_STRIDE,
    )
    copies = {
        "val": (val["metrics_csv"], "bom_val.csv"),
        "test": (test["metrics_csv"], "bom_test.csv"),
        "test_differences": (test["differences_csv"], "bom_test_differences.csv"),
        "zero_shot": (zero_shot["metrics_csv"], f"{ZERO_SHOT_SOURCE}.csv"),
    }
    metrics = {}
    for key, (path, name) in copies.items():
        shutil.copy(path, folder / name)
        metrics[key] = str((folder / name).relative_to(REPO))
    figures = []
    for figure in test["figures"]:
        if figure.endswith(".png"):
            shutil.copy(figure, folder / Path(figure).name)
            figures.append(str((folder / Path(figure).name).relative_to(REPO / "docs")))
    return {
        "checkpoint": checkpoint,
        "forecast_methods": experiment.forecast_methods,
        "fitted_weights": fitted,
        "routes": routes(experiment),
        "best_route": best,
        "metrics": metrics,
        "figures": figures,
    }


def run_routes(config: str = ROUTES_CONFIG, models: dict | None = None) -> dict:
    """Every route of every candidate checkpoint; the selection uses validation scores only.

    Parameters
    ----------
    config : str
        The routes experiment (forecast_methods and evaluate settings).
    models : dict, optional
        Model name to checkpoint path; default :data:`ROUTE_MODELS`.
    """
    experiment = load_experiment(REPO / config)
    ROUTES_DIR.mkdir(parents=True, exist_ok=True)
    models = models or ROUTE_MODELS
    results = {
        name: run_model_routes(experiment, name, str(checkpoint))
        for name, checkpoint in models.items()
        if Path(checkpoint).is_file()
    }
    # Each model's best route on validation; then the best of those, on validation too.
    candidates = [(model, r["best_route"]) for model, r in results.items()]
    val = {model: pd.read_csv(REPO / r["metrics"]["val"]) for model, r in results.items()}
    selected = select_route(val, candidates)
    for model, model_result in results.items():
        if model != selected[0]:  # only the selected checkpoint's figures are shown
            for figure in model_result["figures"]:
                (REPO / "docs" / figure).unlink(missing_ok=True)
            model_result["figures"] = []
    return {
        "config": config,
        "command": "python -m pipelines.skill --routes",
        "models": results,
        "selected": list(selected),
        "default": [DEFAULT_MODEL, "model"],
    }


# --------------------------------------------------------------------------------------------
# targets


def _series(metrics: pd.DataFrame, method: str, score: str, threshold=None) -> np.ndarray:
    """Point estimates at :data:`LEADS` (NaN where missing)."""
    rows = metrics[(metrics["method"] == method) & (metrics["score"] == score)]
    if threshold is not None:
        rows = rows[np.isclose(rows["threshold"], threshold)]
    rows = rows[rows["source"] != "all"].set_index("lead_time")["value"]
    return np.array([rows.get(lead, np.nan) for lead in LEADS], dtype=float)


def _ratio_of_means(metrics, method, score, threshold=None) -> float:
    model = _series(metrics, method, score, threshold)
    lk = _series(metrics, "extrapolation", score, threshold)
    return float(np.mean(model) / np.mean(lk))


def _every(values: np.ndarray, low=-np.inf, high=np.inf) -> bool:
    return bool(np.all(np.isfinite(values)) and np.all((values >= low) & (values <= high)))


def bom_targets(metrics: pd.DataFrame, method: str) -> list[dict]:
    """The BoM targets (issue 13) of ``method``, measured: name, per-lead values, met."""
    targets = []
    lk = {t: _series(metrics, "extrapolation", "CSI", t) for t in CSI_THRESHOLDS}
    for threshold in CSI_THRESHOLDS:
        csi = _series(metrics, method, "CSI", threshold)
        all_pixels = _series(metrics, method, "CSI_ALLOBS", threshold)
        targets.append(
            {
                "name": f"CSI ≥ LK at {threshold:g} mm/h, every lead",
                "values": csi / lk[threshold],
                "unit": "ratio to LK",
                "met": _every(csi - lk[threshold], low=0.0),
                "beside": all_pixels / _series(metrics, "extrapolation", "CSI_ALLOBS", threshold),
            }
        )
    for threshold in (1.0, 5.0):
        bias = _series(metrics, method, "BIAS", threshold)
        targets.append(
            {
                "name": f"frequency bias {BIAS_RANGE[0]}–{BIAS_RANGE[1]} at {threshold:g} mm/h",
                "values": bias,
                "unit": "bias",
                "met": _every(bias, *BIAS_RANGE),
                "beside": _series(metrics, method, "BIAS_ALLOBS", threshold),
            }
        )
    mse_ratio = _ratio_of_means(metrics, method, "MSE")
    targets.append(
        {
            "name": f"MSE ≤ {MSE_RATIO}x LK over 10–60 min",
            "values": np.array([mse_ratio]),
            "unit": "ratio of means",
            "met": bool(mse_ratio <= MSE_RATIO),
            "beside": np.array([_ratio_of_means(metrics, method, "MSE_ALLOBS")]),
        }
    )
    dry = _series(metrics, method, "DRY_FA", 0.5)
    targets.append(
        {
            "name": f"dry-area false alarms ≤ {DRY_FA_MAX:.0%}, every lead",
            "values": dry,
            "unit": "share",
            "met": _every(dry, high=DRY_FA_MAX),
        }
    )
    return targets


def zero_shot_targets(metrics: pd.DataFrame, method: str) -> list[dict]:
    """The unseen-radar targets: CSI ≥ LK at 1, 5 and 10 mm/h at every lead."""
    targets = []
    for threshold in CSI_THRESHOLDS:
        csi = _series(metrics, method, "CSI", threshold)
        lk = _series(metrics, "extrapolation", "CSI", threshold)
        targets.append(
            {
                "name": f"{ZERO_SHOT_SOURCE} zero-shot: CSI ≥ LK at {threshold:g} mm/h, every lead",
                "values": csi / lk,
                "unit": "ratio to LK",
                "met": _every(csi - lk, low=0.0),
                "beside": _series(metrics, method, "CSI_ALLOBS", threshold)
                / _series(metrics, "extrapolation", "CSI_ALLOBS", threshold),
            }
        )
    return targets


def moonshot_targets(metrics: pd.DataFrame, method: str) -> list[dict]:
    """Mean CSI at 1 mm/h ≥ 1.10x LK, and not below S-PROG at 30 and 60 min."""
    ratio = _ratio_of_means(metrics, method, "CSI", 1.0)
    csi = _series(metrics, method, "CSI", 1.0)
    sprog = _series(metrics, "sprog", "CSI", 1.0)
    at = [LEADS.index(30.0), LEADS.index(60.0)]
    return [
        {
            "name": f"moonshot: mean CSI at 1 mm/h ≥ {MOONSHOT_CSI_RATIO}x LK",
            "values": np.array([ratio]),
            "unit": "ratio of means",
            "met": bool(ratio >= MOONSHOT_CSI_RATIO),
        },
        {
            "name": "moonshot: CSI at 1 mm/h ≥ S-PROG at 30 and 60 min",
            "values": csi[at] / sprog[at],
            "unit": "ratio to S-PROG",
            "met": _every(csi[at] - sprog[at], low=0.0),
        },
    ]


def all_targets(bom: pd.DataFrame, zero_shot: pd.DataFrame | None, method: str) -> list[dict]:
    """Every target of ``method`` as a list (the shipping rule counts them)."""
    targets = bom_targets(bom, method)
    if zero_shot is not None:
        targets += zero_shot_targets(zero_shot, method)
    return targets + moonshot_targets(bom, method)


def validation_key(metrics: pd.DataFrame, method: str) -> tuple[int, float]:
    """Targets met on validation windows, then the mean CSI ratio to LK at 1, 5 and 10 mm/h."""
    met = sum(t["met"] for t in bom_targets(metrics, method) + moonshot_targets(metrics, method))
    ratios = [_ratio_of_means(metrics, method, "CSI", t) for t in CSI_THRESHOLDS]
    return met, float(np.nanmean(ratios))


def select_route(val_metrics: dict, candidates: list[tuple[str, str]]) -> tuple[str, str]:
    """The (model, route) meeting the most targets on validation; ties by mean CSI ratio."""
    return max(candidates, key=lambda pair: validation_key(val_metrics[pair[0]], pair[1]))


# --------------------------------------------------------------------------------------------
# docs/skill.md


def _format(values: np.ndarray) -> str:
    return ", ".join("n/a" if not np.isfinite(v) else f"{v:.3g}" for v in values)


def _difference_interval(differences: pd.DataFrame, method: str, threshold: float) -> str:
    rows = differences[
        (differences["method"] == method)
        & (differences["baseline"] == "extrapolation")
        & (differences["score"] == "CSI")
        & np.isclose(differences["threshold"], threshold)
    ].set_index("lead_time")
    cells = [
        f"{rows.loc[lead, 'value']:+.3f} [{rows.loc[lead, 'ci_low']:+.3f}, "
        f"{rows.loc[lead, 'ci_high']:+.3f}]"
        for lead in LEADS
        if lead in rows.index
    ]
    return "; ".join(cells)


@functools.lru_cache(maxsize=64)
def _read_metrics(path: str) -> pd.DataFrame:
    # Every row and target of the document reads the same few files: read each once.
    return pd.read_csv(path)


def _tables(model_result: dict) -> dict[str, pd.DataFrame]:
    return {key: _read_metrics(str(REPO / path)) for key, path in model_result["metrics"].items()}


def target_lines(result: dict) -> list[str]:
    """The selected route's targets and the shipped default's, met or not, with the numbers."""
    lines = []
    for model, method in dict.fromkeys([tuple(result["selected"]), tuple(result["default"])]):
        tables = _tables(result["models"][model])
        targets = all_targets(tables["test"], tables["zero_shot"], method)
        role = "selected on validation" if [model, method] == result["selected"] else "default"
        lines += [
            f"**`{model}` / `{method}`** ({role}): {sum(t['met'] for t in targets)} of "
            f"{len(targets)} targets met.",
            "",
        ]
        for target in targets:
            verdict = "met" if target["met"] else "not met"
            beside = target.get("beside")
            extra = "" if beside is None else f"; all observed pixels: {_format(beside)}"
            lines.append(
                f"- {target['name']}: {verdict} ({target['unit']}: "
                f"{_format(target['values'])}{extra})"
            )
        if method == result["models"][model]["best_route"]:
            for threshold in CSI_THRESHOLDS:
                lines.append(
                    f"  - paired 95 % bootstrap, CSI {method} − LK at {threshold:g} mm/h per "
                    "lead: " + _difference_interval(tables["test_differences"], method, threshold)
                )
        lines.append("")
    return lines


def targets_met(result: dict, model: str, method: str) -> int:
    """How many targets (of :func:`all_targets`) a checkpoint's route meets on the test data."""
    tables = _tables(result["models"][model])
    return sum(t["met"] for t in all_targets(tables["test"], tables["zero_shot"], method))


def shipping_lines(result: dict) -> list[str]:
    """The shipping rule, applied: a new default only if it meets more targets."""
    selected, default = tuple(result["selected"]), tuple(result["default"])
    new, old = targets_met(result, *selected), targets_met(result, *default)
    verdict = (
        "it meets more, so it would replace the default"
        if new > old
        else "it does not meet more, so the pretrained default stays"
    )
    return [
        f"Shipping rule: the route selected on validation, `{selected[0]}` / `{selected[1]}`, "
        f"meets {new} targets on the test data; the default `{default[0]}` / `{default[1]}` "
        f"meets {old}; {verdict}.",
        "",
    ]


def route_row(model: str, method: str, model_result: dict, selected: bool) -> list[str]:
    """One row of the route table."""
    tables = _tables(model_result)
    bom, val, zero_shot = tables["test"], tables["val"], tables["zero_shot"]
    spec = model_result["forecast_methods"].get(method)
    ratios = "/".join(f"{_ratio_of_means(bom, method, 'CSI', t):.2f}" for t in CSI_THRESHOLDS)
    all_pixels = "/".join(
        f"{_ratio_of_means(bom, method, 'CSI_ALLOBS', t):.2f}" for t in (1.0, 10.0)
    )
    fmi = "/".join(f"{_ratio_of_means(zero_shot, method, 'CSI', t):.2f}" for t in CSI_THRESHOLDS)
    bias = [_series(bom, method, "BIAS", t) for t in (1.0, 5.0)]
    val_targets = bom_targets(val, method) + moonshot_targets(val, method)
    test_targets = all_targets(bom, zero_shot, method)
    return [
        f"`{model}`",
        f"`{method}`" + (" **(selected)**" if selected else ""),
        _describe(spec),
        ratios,
        f"{_ratio_of_means(bom, method, 'MSE'):.2f}",
        f"{np.nanmin(bias[0]):.2f}–{np.nanmax(bias[0]):.2f}",
        f"{np.nanmin(bias[1]):.2f}–{np.nanmax(bias[1]):.2f}",
        f"{np.nanmax(_series(bom, method, 'DRY_FA', 0.5)):.1%}",
        all_pixels,
        fmi,
        f"{sum(t['met'] for t in val_targets)} of {len(val_targets)}",
        f"{sum(t['met'] for t in test_targets)} of {len(test_targets)}",
    ]


def route_table(result: dict) -> list[str]:
    """One row per checkpoint and route: test-block ratios, zero-shot, and targets met."""
    header = [
        "checkpoint",
        "route",
        "configuration",
        "CSI 1 / 5 / 10 mm/h ÷ LK",
        "MSE ÷ LK",
        "bias 1 mm/h",
        "bias 5 mm/h",
        "max dry FA",
        "all-pixels CSI 1 / 10 ÷ LK",
        f"{ZERO_SHOT_SOURCE} CSI 1 / 5 / 10 ÷ LK",
        "targets met (val)",
        "targets met (test)",
    ]
    rows = [
        route_row(model, method, model_result, [model, method] == list(result["selected"]))
        for model, model_result in result["models"].items()
        for method in model_result["routes"]
    ]
    return markdown_table(header, rows).splitlines()


def _describe(spec: dict | None) -> str:
    if spec is None:
        return "the network alone"
    parts = []
    if spec.get("blend"):
        weights = ", ".join(f"{w:g}" for w in spec["blend"]["weights"])
        parts.append(f"blend with {spec['blend']['method']}, model weights [{weights}]")
    if spec.get("postprocess"):
        post = spec["postprocess"]
        parts.append(f"{post['method']} matching to {post.get('target', 'last_input')}")
    return "; ".join(parts)


def routes_section(result: dict) -> list[str]:
    """The ``## Heavy-rain routes`` section of docs/skill.md."""
    model, _ = result["selected"]
    checkpoints = ", ".join(
        f"`{name}` (`{r['checkpoint']}`)" for name, r in result["models"].items()
    )
    return [
        "## Heavy-rain routes: losses, postprocessing and blending",
        "",
        f"Checkpoints: {checkpoints}. Routes: `{result['config']}`. Reproduce with"
        f" `{result['command']}` (after `make skill` has trained the loss routes). Blend weights"
        " are fitted on the BoM validation windows, and each checkpoint's route, then the"
        " checkpoint, is selected on them (most targets met there, then the mean CSI ratio to"
        f" LK at 1, 5 and 10 mm/h); the test block and {ZERO_SHOT_SOURCE} (scored zero-shot with"
        " `nowcast evaluate --source`, a start every 10 minutes over the whole event) serve"
        " nothing but these"
        " numbers. Ratios are ratios of means over 10–60 min; CSI and bias are on the common"
        " mask, events `> threshold`; *all-pixels* counts each method's no-data as no rain on"
        " every observed pixel, as pysteps does; *dry FA* is the share of the pixels below"
        " 0.1 mm/h in both the observation and LK where the route forecasts > 0.5 mm/h. Targets"
        " on validation leave out the zero-shot ones.",
        "",
        *route_table(result),
        "",
        "### Targets",
        "",
        *shipping_lines(result),
        *target_lines(result),
        *[f"![{Path(f).stem}]({f})" for f in result["models"][model]["figures"]],
        "",
    ]
