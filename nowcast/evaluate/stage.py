"""The evaluate stage: plan the windows and methods, score them on Dask, write the outputs."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from nowcast import __version__, storage
from nowcast.advection.motion import N_MOTION_FRAMES
from nowcast.config import ConfigError, ExperimentConfig, load_experiment, stage_config
from nowcast.evaluate.ensemble import (
    ENSEMBLE_CURVES_FILE,
    ENSEMBLE_METRICS_FILE,
    failed_windows,
    probabilistic_tables,
    rain_methods,
)
from nowcast.evaluate.figures import draw_figures
from nowcast.evaluate.report import report_text
from nowcast.evaluate.scoring import (
    cube_windows,
    plan_windows,
    score_store_patches,
    score_window,
    store_windows,
)
from nowcast.evaluate.setup import (
    EVALUATION_DIR,
    MEMBER_KWARGS,
    PROBABILITY_METHODS,
    PROBABILITY_THRESHOLDS,
    EvaluateConfig,
    ForecastSetup,
    Window,
)
from nowcast.evaluate.tables import METRIC_COLUMNS, differences_table, metrics_table, stack_starts
from nowcast.nowcasts.interface import uses_motion
from nowcast.nowcasts.variants import base_methods, check_method_names, parse_variants
from nowcast.parallel import dask_client, show_progress
from nowcast.sources.cube import cube_pixel_size, open_cube
from nowcast.training.checkpoint import check_checkpoint


def _experiment(config: str | Path | ExperimentConfig) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        return config
    return load_experiment(config)


def resolve_methods(
    experiment: ExperimentConfig, config: EvaluateConfig, variants: dict | None = None
) -> tuple[tuple[str, ...], str | None]:
    """The methods to run and the checkpoint path (None when no method needs the model).

    Raises
    ------
    ConfigError
        If a method is neither registered nor in ``variants`` (the experiment's
        ``forecast_methods``), or the model is needed and the checkpoint does not exist.
    """
    variants = variants or {}
    checkpoint = config.checkpoint or str(Path(experiment.run_path) / "checkpoints" / "best.pt")
    if config.methods is None:
        methods = ["persistence", "extrapolation"]
        if Path(checkpoint).is_file():
            methods.append("model")
    else:
        methods = list(config.methods)
    check_method_names(methods, variants, "evaluate.methods")
    bases = base_methods(methods, variants)
    # model_steps perturbs the deterministic model: the run's checkpoint unless it names one.
    own = config.method_kwargs.get("model_steps", {}).get("checkpoint")
    needing = [m for m in bases if m == "model" or (m == "model_steps" and not own)]
    if not needing:
        return tuple(methods), None
    if not Path(checkpoint).is_file():
        raise ConfigError(
            f"evaluate: method '{needing[0]}' needs the checkpoint {checkpoint}; run "
            "`nowcast train` or set evaluate.checkpoint"
        )
    return tuple(methods), checkpoint


def _compare(config: EvaluateConfig, methods: tuple[str, ...]) -> str:
    """The method of ``differences.csv``: a rain forecast, by default the model or the last."""
    rain = rain_methods(methods)
    if not rain:
        raise ConfigError(
            f"evaluate.methods {list(methods)}: only probability forecasts; add a method that "
            "forecasts rain (e.g. extrapolation or steps)"
        )
    compare = (config.compare or ("model" if "model" in rain else rain[-1])).lower()
    if compare not in methods:
        raise ConfigError(f"evaluate.compare '{compare}' is not among the methods {list(methods)}")
    if compare not in rain:
        raise ConfigError(
            f"evaluate.compare '{compare}' forecasts probabilities, not rain; choose one of "
            f"{list(rain)}"
        )
    return compare


def _method_kwargs(config: EvaluateConfig, bases: list[str]) -> dict[str, dict]:
    """``method_kwargs`` with the run's members (ensembles) and probability thresholds.

    What ``method_kwargs`` sets itself wins.
    """
    kwargs = {name.lower(): dict(value) for name, value in config.method_kwargs.items()}
    for name in bases:
        if name in MEMBER_KWARGS:
            kwargs.setdefault(name, {}).setdefault(MEMBER_KWARGS[name], config.members)
        if name in PROBABILITY_METHODS:
            kwargs.setdefault(name, {}).setdefault("thresholds", list(PROBABILITY_THRESHOLDS))
    return kwargs


def _check_model(checkpoint: str, info: dict, n_leadtimes: int) -> None:
    meta = check_checkpoint(checkpoint)
    problems = []
    if int(meta["timestep_minutes"]) != info["timestep_minutes"]:
        problems.append(
            f"timestep {meta['timestep_minutes']} min != windows' {info['timestep_minutes']} min"
        )
    if int(meta["n_input_frames"]) > info["n_input_frames"]:
        problems.append(
            f"needs {meta['n_input_frames']} input frames, windows have {info['n_input_frames']}"
        )
    if int(meta["n_target_frames"]) < n_leadtimes:
        problems.append(f"predicts {meta['n_target_frames']} lead times, {n_leadtimes} asked")
    if problems:
        raise ConfigError(f"evaluate: checkpoint {checkpoint} does not fit: {'; '.join(problems)}")


def _records(table: pd.DataFrame) -> list[dict]:
    return json.loads(table.to_json(orient="records", double_precision=15))


def evaluate(
    config: str | Path | ExperimentConfig,
    scheduler: str | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Run the evaluate stage of an experiment.

    Parameters
    ----------
    config : str, Path or ExperimentConfig
        Experiment config file or a loaded config.
    scheduler : str, optional
        Dask scheduler address, ``"threads"``, or None for a local cluster.
    progress : bool, optional
        Show a progress bar over the windows.

    Returns
    -------
    dict of str
        Paths of the outputs: ``folder``, ``metrics_csv``, ``metrics_json``, ``differences_csv``,
        ``report``, ``figures`` (list), with ``score_patches`` ``patch_metrics_csv`` and, when a
        method is an ensemble or a probability forecast, ``ensemble_metrics_csv`` and
        ``ensemble_curves_csv`` (:mod:`nowcast.evaluate.ensemble`).

    Raises
    ------
    ConfigError
        For an invalid section, a missing cube or checkpoint, or a split without windows.
    """
    experiment = _experiment(config)
    eval_config = stage_config(experiment, "evaluate", EvaluateConfig)
    store = experiment.patch_store
    if storage.exists(store):
        table, info = store_windows(store, eval_config.split)
    else:
        table, info = cube_windows(experiment, eval_config.split)
        store = None
    plan = plan_evaluation(experiment, eval_config, table, info, store=store)
    return score_and_write(plan, scheduler=scheduler, progress=progress)


@dataclasses.dataclass
class EvaluationPlan:
    """What :func:`score_and_write` scores and where it writes (see :func:`plan_evaluation`).

    ``summary`` is the run metadata of ``metrics.json`` (``sources`` is filled after scoring);
    ``notes`` are report lines put under the title; ``store`` is the patch store, if any.
    """

    experiment: ExperimentConfig
    config: EvaluateConfig
    windows: list[Window]
    setup: ForecastSetup
    compare: str
    summary: dict
    folder: Path
    store: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def plan_evaluation(
    experiment: ExperimentConfig,
    eval_config: EvaluateConfig,
    table: pd.DataFrame,
    info: dict,
    *,
    store: str | None = None,
    windows_from: str | None = None,
    folder: str | Path | None = None,
) -> EvaluationPlan:
    """Check the methods and the checkpoint against the windows, and plan the forecasts.

    Parameters
    ----------
    experiment : ExperimentConfig
        Names the run (report title) and gives the default checkpoint and variants.
    eval_config : EvaluateConfig
        The evaluate settings.
    table : pandas.DataFrame
        Windows (source, cube_path, reference_time), as :func:`store_windows` lists them.
    info : dict
        ``n_input_frames``, ``n_target_frames`` and ``timestep_minutes`` of the windows.
    store : str, optional
        The patch store the windows come from (None: from the cubes).
    windows_from : str, optional
        Where the windows come from, for ``metrics.json``; default ``patch store`` or ``cubes``.
    folder : str or Path, optional
        Output folder; default ``<run_dir>/evaluation``.

    Returns
    -------
    EvaluationPlan

    Raises
    ------
    ConfigError
        For a split without windows, too many lead times, a missing or unfit checkpoint.
    """
    if table.empty:
        raise ConfigError(f"evaluate: no windows in split '{eval_config.split}'")
    variants = parse_variants(experiment.forecast_methods)
    methods, checkpoint = resolve_methods(experiment, eval_config, variants)
    n_leadtimes = eval_config.n_leadtimes or info["n_target_frames"]
    if n_leadtimes > info["n_target_frames"]:
        raise ConfigError(
            f"evaluate.n_leadtimes={n_leadtimes} exceeds the windows' {info['n_target_frames']} "
            "target frames"
        )
    advecting = [name for name in base_methods(methods, variants) if uses_motion(name)]
    if advecting and info["n_input_frames"] < N_MOTION_FRAMES:
        raise ConfigError(f"{', '.join(advecting)} need(s) {N_MOTION_FRAMES} input frames")
    if checkpoint is not None:
        _check_model(checkpoint, info, n_leadtimes)
    compare = _compare(eval_config, methods)
    window_step = eval_config.window_stride or max(1, round(30 / info["timestep_minutes"]))
    windows = plan_windows(table, window_step, eval_config.max_windows)
    bases = base_methods(methods, variants)
    setup = ForecastSetup(
        methods=methods,
        method_kwargs=_method_kwargs(eval_config, bases),
        variants={name: variants[name] for name in methods if name in variants},
        checkpoint=checkpoint,
        device=eval_config.device,
        n_input_frames=info["n_input_frames"],
        n_leadtimes=n_leadtimes,
        timestep_minutes=info["timestep_minutes"],
        thresholds=tuple(eval_config.thresholds),
        scales=tuple(eval_config.fss_scales),
        seed=eval_config.seed,
    )
    # members only matter, and are only recorded, when an ensemble method runs.
    unused = None if any(name in MEMBER_KWARGS for name in bases) else {"members"}

    summary = {
        "experiment": experiment.name,
        "split": eval_config.split,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "nowcast_version": __version__,
        "methods": list(methods),
        "forecast_methods": {
            name: spec.model_dump(mode="json", exclude_none=True)
            for name, spec in setup.variants.items()
        },
        "compare": compare,
        "checkpoint": checkpoint,
        "windows_from": windows_from or ("patch store" if store else "cubes"),
        "n_input_frames": setup.n_input_frames,
        "timestep_minutes": setup.timestep_minutes,
        "lead_times": setup.lead_times.tolist(),
        "window_stride": window_step,
        "sources": {},
        "config": json.loads(eval_config.model_dump_json(exclude=unused)),
    }
    folder = Path(folder) if folder is not None else Path(experiment.run_path) / EVALUATION_DIR
    return EvaluationPlan(experiment, eval_config, windows, setup, compare, summary, folder, store)


def score_and_write(
    plan: EvaluationPlan, scheduler: str | None = None, progress: bool = True
) -> dict[str, str]:
    """Score the plan's windows on Dask and write the outputs into ``plan.folder`` atomically.

    Returns
    -------
    dict of str
        As :func:`evaluate` returns.
    """
    experiment, eval_config, store = plan.experiment, plan.config, plan.store
    windows, setup, compare = plan.windows, plan.setup, plan.compare
    methods = setup.methods
    with dask_client(scheduler) as client:
        futures = client.map(score_window, windows, setup=setup, pure=False)
        if progress:
            show_progress(futures)
        results = client.gather(futures)

    per_start = stack_starts(results, rain_methods(methods))
    bootstrap = (eval_config.n_bootstrap, eval_config.confidence, eval_config.seed)
    metrics = metrics_table(per_start, *bootstrap)
    differences = differences_table(per_start, compare, *bootstrap)
    summary = plan.summary
    _summarise_sources(summary, windows, results)
    probabilistic = probabilistic_tables(results, *bootstrap, compare=compare)
    if probabilistic is not None:
        summary["probabilistic"] = probabilistic.summary()
    failures = failed_windows(results)
    if failures:
        summary["failed_windows"] = failures

    patch_metrics = None
    if eval_config.score_patches:
        if store is None:
            raise ConfigError("evaluate.score_patches needs the patch store; run `nowcast patches`")
        patch_metrics = metrics_table(score_store_patches(store, eval_config, setup), *bootstrap)

    final = plan.folder
    animation_method = compare
    with storage.atomic_path(final) as tmp:
        folder = Path(tmp)
        folder.mkdir(parents=True)
        figures = {}
        if eval_config.figures:
            figures = draw_figures(
                folder,
                metrics,
                eval_config,
                setup,
                windows,
                results,
                animation_method,
                probabilistic=probabilistic,
            )
        metrics.to_csv(folder / "metrics.csv", index=False)
        if probabilistic is not None:
            probabilistic.metrics.to_csv(folder / ENSEMBLE_METRICS_FILE, index=False)
            probabilistic.curves.to_csv(folder / ENSEMBLE_CURVES_FILE, index=False)
        differences.to_csv(folder / "differences.csv", index=False)
        payload = {
            **summary,
            "columns": list(METRIC_COLUMNS),
            "metrics": _records(metrics),
            "differences": _records(differences),
        }
        (folder / "metrics.json").write_text(json.dumps(payload, indent=1, allow_nan=False))
        if patch_metrics is not None:
            patch_metrics.to_csv(folder / "patch_metrics.csv", index=False)
        report = report_text(
            experiment,
            eval_config,
            metrics,
            differences,
            summary,
            figures,
            ensemble_metrics=None if probabilistic is None else probabilistic.metrics,
        )
        if plan.notes:
            title, _, rest = report.partition("\n")
            report = "\n".join([title, "", *plan.notes, rest])
        (folder / "report.md").write_text(report)
    outputs = {
        "folder": str(final),
        "metrics_csv": str(final / "metrics.csv"),
        "metrics_json": str(final / "metrics.json"),
        "differences_csv": str(final / "differences.csv"),
        "report": str(final / "report.md"),
        "figures": [str(final / f) for paths in figures.values() for f in paths],
    }
    if patch_metrics is not None:
        outputs["patch_metrics_csv"] = str(final / "patch_metrics.csv")
    if probabilistic is not None:
        outputs["ensemble_metrics_csv"] = str(final / ENSEMBLE_METRICS_FILE)
        outputs["ensemble_curves_csv"] = str(final / ENSEMBLE_CURVES_FILE)
    return outputs


def _summarise_sources(summary: dict, windows: list[Window], results: list) -> None:
    """Fill ``summary["sources"]``: each source's cube, pixel size and scored windows."""
    for source in dict.fromkeys(w.source for w in windows):
        at_source = [r for r in results if r.window.source == source]
        times = [r.window.reference_time for r in at_source]
        path = at_source[0].window.cube_path
        summary["sources"][source] = {
            "cube": path,
            "pixel_size_m": cube_pixel_size(open_cube(path)),
            "n_windows": len(times),
            "first": pd.Timestamp(times[0]).isoformat(),
            "last": pd.Timestamp(times[-1]).isoformat(),
            "reference_times": [pd.Timestamp(t).isoformat() for t in times],
            "wet_fraction": [r.wet_fraction for r in at_source],
            "valid_fraction": [r.valid_fraction for r in at_source],
        }
