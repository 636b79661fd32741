"""The ``nowcast`` command line: one command per pipeline stage, named like its Make target.

Each command imports its stage inside the function (start-up time): the stages bring torch,
pysteps, xarray and Dask, and ``nowcast --help`` or a one-stage command should not load them all.
"""

from __future__ import annotations

import atexit
import functools
import gc
import inspect
import os
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import typer

from nowcast.config import UserError

app = typer.Typer(
    help="Precipitation nowcasting pipeline: data -> ingest -> patches -> train -> evaluate "
    "-> export / predict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

#: Exit codes: a user error (bad input, full disk, unknown name) and a lock held by another run.
#: Usage errors exit with 2, click's code.
EXIT_USER_ERROR = 1
EXIT_LOCK_HELD = 3
EXIT_INTERRUPTED = 130


@app.callback()
def _options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of every error"),
) -> None:
    ctx.obj = {"debug": debug}


def user_error_line(err: BaseException) -> tuple[str, int] | None:
    """The one line and exit code for a failure the user can cause; None for a bug.

    The listed types are :class:`~nowcast.config.UserError` (bad files, YAML, checkpoints,
    unknown names, empty ranges, full or read-only disks, held locks), ``OSError`` (a file
    that is missing or cannot be written, a scheduler that cannot be reached) and an
    interrupt. Anything else keeps its traceback.
    """
    if isinstance(err, UserError):
        return str(err), err.exit_code
    if isinstance(err, OSError):
        from nowcast.storage import disk_write_error

        where = err.filename or ""
        explained = disk_write_error(err, where) if where else None
        if explained is not None:
            return str(explained), EXIT_USER_ERROR
        text = f"{where}: {err.strerror}" if where and err.strerror else str(err)
        return text, EXIT_USER_ERROR
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    return None


class UsageError(UserError):
    """Options that do not go together (exit code 2, as for click's own usage errors)."""

    exit_code = 2


def _command(func):
    """Register a command behind the error boundary: a user's error is one line on stderr and
    a non-zero exit (``--debug`` shows its traceback); a bug keeps its traceback.

    The registered function takes the command's context first (typer fills a parameter
    annotated ``typer.Context``), which is where the global ``--debug`` is.
    """

    @functools.wraps(func)
    def run(ctx: typer.Context, *args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (UserError, OSError, KeyboardInterrupt) as err:
            line = user_error_line(err)
            if line is None or (ctx.find_root().obj or {}).get("debug"):
                raise
            message, code = line
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=code) from None

    signature = inspect.signature(func, eval_str=True)
    context = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    run.__signature__ = signature.replace(parameters=[context, *signature.parameters.values()])
    return app.command()(run)


@_command
def data(
    source: list[str] = typer.Option(None, "--source", "-s", help="catalog source(s); default all"),
    catalog: Path = typer.Option(None, help="data catalog YAML"),
) -> None:
    """Verify or download the pysteps sample radar data into NOWCAST_DATA_ROOT."""
    from nowcast.sources.catalog import load_catalog
    from nowcast.sources.sample_data import fetch_sample_data

    result = fetch_sample_data(source or None, load_catalog(catalog))
    typer.echo(result.summary())


@_command
def ingest(
    source: str = typer.Argument(..., help="catalog source name, e.g. bom"),
    cube_dir: str = typer.Option("data/cubes", help="output directory or fsspec URL"),
    catalog: Path = typer.Option(None, help="data catalog YAML"),
    start: datetime = typer.Option(None, help="first time (UTC)"),
    end: datetime = typer.Option(None, help="last time (UTC)"),
    scheduler: str = typer.Option(
        None,
        help="Dask scheduler address, 'processes' (a new local cluster) or 'in-process' "
        "(default: in-process up to 2000 frames, else a local cluster)",
    ),
    strict: bool = typer.Option(False, help="unreadable files are fatal instead of skipped"),
    append: bool = typer.Option(False, help="add newly arrived times to an existing cube"),
    latlon: bool = typer.Option(False, help="store 2-D lat/lon coordinates"),
    force: bool = typer.Option(False, help="rebuild even if the cube is up to date"),
) -> None:
    """Ingest a catalog source into a CF zarr cube of rain rate (mm/h)."""
    with _gc_paused():  # start-up time, as for predict (loading the catalog imports pysteps)
        from nowcast.sources.catalog import load_catalog
        from nowcast.sources.cube import describe_cube, open_cube
        from nowcast.sources.ingest import ingest as run_ingest

        catalog_config = load_catalog(catalog)
    _skip_exit_collection()

    result = run_ingest(
        source,
        cube_dir,
        catalog=catalog_config,
        start=start,
        end=end,
        scheduler=scheduler,
        strict=strict,
        append=append,
        latlon=latlon,
        force=force,
    )
    typer.echo(result.summary())
    typer.echo(describe_cube(open_cube(result.path)))


@_command
def patches(
    config: Path = typer.Argument(..., help="experiment config, pipelines/configs/<name>.yaml"),
    scheduler: str = typer.Option(None, help="Dask scheduler address (default: local cluster)"),
    force: bool = typer.Option(False, help="rebuild even if the store is up to date"),
) -> None:
    """Cut the experiment's cubes into a normalized zarr patch-sequence store."""
    from nowcast.patches.build import build_patches
    from nowcast.patches.reader import PatchStore

    path = build_patches(config, scheduler=scheduler, force=force)
    store = PatchStore.open(path)
    splits = store.samples()["split"].value_counts().to_dict()
    windows = store.windows()["split"].value_counts().to_dict()
    typer.echo(f"patch store: {path}")
    typer.echo(f"samples per split: {splits}; full-domain windows per split: {windows}")


@_command
def train(
    config: Path = typer.Argument(..., help="experiment config, pipelines/configs/<name>.yaml"),
    resume: bool = typer.Option(False, help="continue exactly from checkpoints/last.pt"),
    device: str = typer.Option(None, help="cuda, cuda:1, mps or cpu (default: auto)"),
) -> None:
    """Train the experiment's model (multi-GPU: torchrun --nproc_per_node=N -m nowcast.train)."""
    import json

    from nowcast.training.loop import train as run_train

    summary = run_train(config, resume=resume, device=device)
    typer.echo(json.dumps(summary, indent=2, default=str))


@_command
def evaluate(
    config: Path = typer.Argument(
        None, help="experiment config, pipelines/configs/<name>.yaml (or give --source)"
    ),
    source: str = typer.Option(
        None, "--source", "-s", help="zero-shot: score on every start of this catalog source"
    ),
    catalog: Path = typer.Option(None, help="data catalog YAML (--source)"),
    checkpoint: Path = typer.Option(None, help="model checkpoint (--source; default pretrained)"),
    start: datetime = typer.Option(None, help="first forecast reference time, UTC (--source)"),
    end: datetime = typer.Option(None, help="last forecast reference time, UTC (--source)"),
    out_dir: Path = typer.Option(None, help="output folder (--source; runs/evaluate_<source>)"),
    cube_dir: str = typer.Option(None, help="cube folder (--source; default data/cubes)"),
    figures: bool = typer.Option(True, help="draw curves, maps and a GIF (--source)"),
    methods_from: Path = typer.Option(
        None,
        help="experiment config whose evaluate.methods, method_kwargs, forecast_methods "
        "(blending, probability matching) and evaluate.checkpoint are scored (--source)",
    ),
    members: int = typer.Option(
        None,
        help="members of the ensemble methods, e.g. steps (--source; default "
        "--methods-from's evaluate.members, else 20)",
    ),
    window_stride: int = typer.Option(
        None, help="score every k-th forecast start (--source; default 1: every start)"
    ),
    scheduler: str = typer.Option(None, help="Dask scheduler address (default: local cluster)"),
) -> None:
    """Score the model against persistence and pysteps extrapolation on the test windows,
    or (--source) the pretrained or a given model on any catalog source, zero-shot."""
    source_options = {
        "--methods-from": methods_from,
        "--catalog": catalog,
        "--checkpoint": checkpoint,
        "--start": start,
        "--end": end,
        "--out-dir": out_dir,
        "--cube-dir": cube_dir,
        "--no-figures": None if figures else False,
        "--members": members,
        "--window-stride": window_stride,
    }
    if (config is None) == (source is None):
        raise UsageError("give exactly one of CONFIG or --source NAME")
    if config is not None:
        given = [name for name, value in source_options.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --source")
        from nowcast.evaluate.stage import evaluate as run_evaluate

        outputs = run_evaluate(config, scheduler=scheduler)
    else:
        from nowcast.evaluate.zeroshot import evaluate_source

        methods, variants, method_kwargs = None, None, None
        if methods_from is not None:
            from nowcast.config import load_experiment

            declared = load_experiment(methods_from)
            methods = declared.evaluate.get("methods")
            variants = declared.forecast_methods
            method_kwargs = declared.evaluate.get("method_kwargs")
            checkpoint = checkpoint or declared.evaluate.get("checkpoint")
            if members is None:
                members = declared.evaluate.get("members")
        outputs = evaluate_source(
            source,
            methods=methods,
            forecast_methods=variants,
            catalog=catalog,
            checkpoint=checkpoint,
            start=start,
            end=end,
            out_dir=out_dir,
            cube_dir=cube_dir or "data/cubes",
            scheduler=scheduler,
            figures=figures,
            members=members,
            method_kwargs=method_kwargs,
            window_stride=1 if window_stride is None else window_stride,
        )
    typer.echo(Path(outputs["report"]).read_text())
    typer.echo(f"outputs: {Path(outputs['report']).parent}")


@_command
def calibrate(
    config: Path = typer.Argument(..., help="experiment config, pipelines/configs/<name>.yaml"),
    checkpoint: Path = typer.Option(None, help="default <run_dir>/checkpoints/best.pt"),
    out: Path = typer.Option(None, help="calibration file; default <run_dir>/calibration.json"),
) -> None:
    """Fit isotonic curves of the model on the validation windows into a calibration file."""
    import json

    from nowcast.evaluate.calibration import calibrate as run_calibrate

    summary = run_calibrate(config, checkpoint=checkpoint, out=out)
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(
        "apply it with a forecast method: postprocess: {method: isotonic, file: "
        f"{summary['path']}}}"
    )


@_command
def export(
    config: Path = typer.Argument(..., help="experiment config, pipelines/configs/<name>.yaml"),
) -> None:
    """Write forecasts of the experiment's test windows as CF-1.8 NetCDF."""
    from nowcast.export import export as run_export

    paths = run_export(config)
    typer.echo(f"wrote {len(paths)} NetCDF file(s) to {Path(paths[0]).parent if paths else '-'}")


@_command
def predict(
    source: str = typer.Option(..., "--source", "-s", help="catalog source name"),
    checkpoint: Path = typer.Option(
        None, help="model checkpoint (default: the pretrained nowcast/pretrained model)"
    ),
    at: datetime = typer.Option(None, help="time of the last input frame (UTC)"),
    latest: bool = typer.Option(True, help="use the newest available frame (default)"),
    cube_dir: str = typer.Option("data/cubes", help="where the source's cube is"),
    from_files: bool = typer.Option(False, help="read the raw files instead of the cube"),
    out_dir: Path = typer.Option(Path("runs/predict"), help="output folder"),
    catalog: Path = typer.Option(None, help="data catalog YAML"),
    method: str = typer.Option(
        "model", help="model, or a forecast_methods variant of --config (e.g. model_cdf)"
    ),
    config: Path = typer.Option(
        None, help="experiment config whose forecast_methods declares --method"
    ),
    calibration: Path = typer.Option(
        None, help="calibration file of the checkpoint (nowcast calibrate): isotonic model"
    ),
    probability_matching: str = typer.Option(
        None,
        help="auto (default: the checkpoint's choice on radars it was not trained on, none on "
        "its own), none, cdf or mean: each lead (an ensemble's members pooled) takes the last "
        "observed frame's distribution, as pysteps' STEPS matches its members",
    ),
    timings_json: Path = typer.Option(
        None, help="also write the stage timings, work, start-up and wall seconds as JSON here"
    ),
    members: int = typer.Option(
        None,
        help="forecast N members with the learned ensemble (by default the packaged "
        "nowcast/pretrained/bom_lagrangian_crps.pt when N > 1): the NetCDF adds the members "
        "and P(>= 1, 5, 10 mm/h), plus a P(>= 10 mm/h) map",
    ),
    member_batch: int = typer.Option(4, help="members drawn together (memory grows with it)"),
    seed: int = typer.Option(0, help="seed of the members (with the source and time)"),
    watch: bool = typer.Option(
        False,
        help="keep the model loaded and issue a nowcast for every new frame in the source's "
        "folders (implies --from-files); stop with SIGTERM or Ctrl-C",
    ),
    poll_seconds: float = typer.Option(1.0, help="--watch: seconds between folder listings"),
    settle_seconds: float = typer.Option(
        1.0, help="--watch: seconds a file's size must hold before it is read"
    ),
    keep_hours: float = typer.Option(
        24.0, help="--watch: frames and outputs older than this before the newest are dropped"
    ),
    backlog: str = typer.Option(
        "newest", help="--watch: after the newest frame, the backlog 'newest' or 'oldest' first"
    ),
    heartbeat_seconds: float = typer.Option(60.0, help="--watch: seconds between heartbeats"),
    max_nowcasts: int = typer.Option(None, help="--watch: stop after this many nowcasts"),
    exit_when_idle: float = typer.Option(
        None, help="--watch: stop when nothing changed for this many seconds (replays)"
    ),
) -> None:
    """Issue a nowcast from the newest (or --at) frames: CF NetCDF + forecast map PNG.

    With --watch, one for every new frame, the model loaded once."""
    with _gc_paused():
        from nowcast.config import load_experiment
        from nowcast.predict import predict as run_predict
        from nowcast.sources.catalog import load_catalog
        from nowcast.training.checkpoint import (
            PRETRAINED_CHECKPOINT,
            PRETRAINED_ENSEMBLE_CHECKPOINT,
        )
    _skip_exit_collection()

    if checkpoint is None:
        # The deterministic model stays the default; asking for members asks for the ensemble.
        ensemble = members is not None and members > 1
        checkpoint = PRETRAINED_ENSEMBLE_CHECKPOINT if ensemble else PRETRAINED_CHECKPOINT
    if at is None and not latest:
        raise UsageError("give --at TIME or --latest")
    if members is not None and members < 1:
        raise UsageError(f"--members {members}: give at least 1 member")
    if member_batch < 1:
        raise UsageError(f"--member-batch {member_batch}: give at least 1 member")
    variants = load_experiment(config).forecast_methods if config else None
    if calibration is not None:
        if config is not None or method != "model":
            raise UsageError("--calibration replaces --config/--method")
        method = "model_isotonic"
        postprocess = {"method": "isotonic", "file": str(calibration)}
        variants = {method: {"method": "model", "postprocess": postprocess}}
    catalog_config = load_catalog(catalog)
    if watch:
        if at is not None or timings_json is not None:
            raise UsageError("--watch issues a nowcast per new frame: drop --at/--timings-json")
        _watch(
            source,
            checkpoint,
            catalog_config,
            out_dir,
            {"method": method, "forecast_methods": variants, "members": members,
             "member_batch": member_batch, "seed": seed,
             "probability_matching": probability_matching},
            {"poll_seconds": poll_seconds, "settle_seconds": settle_seconds,
             "keep_hours": keep_hours, "order": backlog, "heartbeat_seconds": heartbeat_seconds,
             "max_nowcasts": max_nowcasts, "idle_exit_seconds": exit_when_idle},
        )  # fmt: skip
        return
    startup = _seconds_since_process_start()
    result = run_predict(
        source,
        checkpoint,
        at=at,
        cube_dir=cube_dir,
        from_files=from_files,
        out_dir=out_dir,
        catalog=catalog_config,
        method=method,
        forecast_methods=variants,
        members=members,
        member_batch=member_batch,
        seed=seed,
        probability_matching=probability_matching,
    )
    timings = result.process_timings(startup, _seconds_since_process_start())
    typer.echo(result.summary(timings))
    if timings_json is not None:
        import json

        timings_json.write_text(json.dumps(timings, indent=2))


def _watch(source, checkpoint, catalog, out_dir, request: dict, settings: dict) -> None:
    """``predict --watch``: load the model once, then watch the source's folders."""
    from nowcast.predict.issue import Predictor
    from nowcast.predict.watch import Watcher, WatchSettings

    catalog[source]  # an unknown source: one line naming the catalog's sources
    try:
        watch_settings = WatchSettings(**settings)
    except ValueError as err:
        raise UsageError(f"--watch: {err}") from None
    predictor = Predictor.load(source, checkpoint, **request)
    summary = Watcher(predictor, catalog, out_dir, watch_settings).run()
    latencies = summary["latencies"]
    if latencies:
        typer.echo(
            f"watch: {summary['nowcasts']} nowcasts, latency median "
            f"{sorted(latencies)[len(latencies) // 2]:.2f} s, max {max(latencies):.2f} s",
            err=True,
        )


# Module import time: the start-up clock where /proc is not available (see below).
_CLI_IMPORTED_AT = time.perf_counter()


def _seconds_since_process_start() -> float:
    """Seconds since this process started (interpreter start-up and imports included).

    Linux gives the start time in /proc/self/stat (field 22, clock ticks since boot, the clock
    of CLOCK_BOOTTIME); elsewhere the clock starts when this module was imported, which misses
    the interpreter's own start-up (tens of milliseconds).
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _CLI_IMPORTED_AT


@contextmanager
def _gc_paused():
    """Import a stage with the cyclic garbage collector paused (start-up time).

    Importing torch, pysteps (with scipy.stats, matplotlib and jsonschema), xarray and cartopy
    creates half a million objects that live as long as the process and no garbage, yet the
    collector walks them again and again as they accumulate, a sizeable share of the imports'
    CPU time (docs/performance.md).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # What the imports left alive stays for the process's life: out of the collector's
        # reach (gc.freeze), the work's own collections do not walk it again either.
        gc.freeze()
        if enabled:
            gc.enable()


def _skip_exit_collection() -> None:
    """At exit, skip the interpreter's last collections over the objects alive then.

    Those collections walk every module's objects again and free nothing the operating system
    would not, and they are most of ``nowcast predict``'s exit time. ``gc.freeze`` at exit moves
    the objects out of the collector's
    reach; outputs are closed by then, and an in-process caller (tests) pays it only at its own
    exit.
    """
    atexit.unregister(gc.freeze)  # once, however often the command runs in one process
    atexit.register(gc.freeze)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
