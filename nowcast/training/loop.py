"""Training loop for the nowcasting models: one GPU, the CPU, or several GPUs through torchrun.

The loop is written out top to bottom in :func:`train` (in the spirit of nanoGPT): no framework
hides a step. Run it as::

    python -m nowcast.train pipelines/configs/bom.yaml [--resume] [--device cpu]
    torchrun --nproc_per_node=2 -m nowcast.train pipelines/configs/bom.yaml

It reads the ``train`` section of an experiment config (:class:`TrainConfig`), the patch store
``<patch_dir>/<name>.zarr`` through :mod:`nowcast.patches.loader`, and writes to ``<run_dir>``:

- ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (see :mod:`nowcast.training.checkpoint`);
- ``train_log.csv`` with columns ``step, epoch, split, loss, mse_mmh, csi_1mmh, lr,
  samples_per_s`` (``split`` is ``train`` or ``val``; ``epoch`` is 1-based);
- ``tensorboard/`` event files;
- ``train.lock`` while it runs (rank 0), so a second ``train`` of the run fails instead.

``--resume`` continues exactly: the model, optimizer, schedulers, gradient scaler, random
generators and the position in the data (epoch and batch) come back from ``last.pt``, each
epoch's shuffle is seeded from ``(seed, epoch)``, and the batches of the current epoch consumed
before the interruption are skipped, so that a resumed CPU run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from nowcast.config import ConfigError, ExperimentConfig, load_experiment, stage_config
from nowcast.models.registry import build_model
from nowcast.parallel import progress_interval
from nowcast.patches.normalization import Normalization
from nowcast.patches.reader import PatchStore
from nowcast.training.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    TrainedOn,
    checkpoint_path,
    load_checkpoint,
    make_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from nowcast.training.config import TrainConfig, TrainingDivergedError
from nowcast.training.setup import (
    TrainLog,
    build_step_parts,
    configure_backends,
    log_validation,
    make_train_loaders,
    resolve_amp_dtype,
    seed_epoch,
    seed_everything,
    start_run,
)
from nowcast.training.step import StepParts, point_forecast, train_step
from nowcast.verification import contingency_accum, contingency_compute, contingency_init

logger = logging.getLogger(__name__)

#: Rain rate (mm/h) of the CSI reported at each validation (an event is rain above it).
CSI_THRESHOLD = 1.0
#: The :class:`TrainingState` fields a checkpoint stores (where a resumed run goes on).
CHECKPOINT_POSITION = ("step", "epoch", "batch_index", "best_metric")


@dataclasses.dataclass
class TrainingState:
    """Where a run stands: what a checkpoint stores besides the weights, and the run's clock.

    ``batch_index`` counts the batches of the current epoch already consumed (a run resumed
    mid-epoch skips them); ``stop_reason`` is None while the run goes on, else ``epochs``,
    ``max_steps``, ``time_budget`` or ``stop_requested``. ``rng_state`` holds the random
    generators' states of a resumed run until the next epoch restores them. ``seconds`` and
    ``samples`` add up the time spent in training steps and the samples they saw (all
    processes).
    """

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    best_metric: float = math.inf
    stop_reason: str | None = None
    rng_state: dict | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    seconds: float = 0.0
    samples: int = 0
    checkpoints_written: int = 0
    resumed_from: dict | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> TrainingState:
        """The position and generator states a checkpoint records (its clock starts now)."""
        position = {key: checkpoint[key] for key in CHECKPOINT_POSITION}
        return cls(**position, rng_state=checkpoint["rng_state"])

    def position(self) -> dict:
        """The checkpoint entries of :data:`CHECKPOINT_POSITION`."""
        return {key: getattr(self, key) for key in CHECKPOINT_POSITION}


def channels_last_for(config: TrainConfig, device: torch.device) -> bool:
    """Whether the model runs channels_last: on the CPU (oneDNN) a channels_last step is as
    fast or faster (benchmarks/bench_train.py), and on CUDA it feeds the tensor cores."""
    if config.channels_last == "auto":
        return device.type in ("cuda", "cpu")
    return bool(config.channels_last)


def build_network(
    experiment: ExperimentConfig, config: TrainConfig, trained_on: TrainedOn, device
) -> tuple[torch.nn.Module, torch.dtype | None]:
    """The model of the ``train`` section on ``device`` (not compiled) and its autocast dtype."""
    where = f"{getattr(experiment, '_path', experiment.name)}: section 'train'"
    try:
        amp_dtype = resolve_amp_dtype(config.amp, device)
    except ValueError as err:
        raise ConfigError(f"{where}: field 'amp': {err}") from None
    frames = trained_on.frames
    try:
        model = build_model(
            config.model.name, frames.n_input, frames.n_target, **config.model.kwargs
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: field 'model.kwargs': {err}") from None
    model.to(device)
    if channels_last_for(config, device):
        model.to(memory_format=torch.channels_last)
    return model, amp_dtype


def write_checkpoints(
    paths: tuple[Path, ...],
    experiment: ExperimentConfig,
    config: TrainConfig,
    trained_on: TrainedOn,
    parts: StepParts,
    plateau,
    state: TrainingState,
) -> None:
    """Write the run's checkpoint at ``state`` to each of ``paths`` (and count them)."""
    checkpoint = make_checkpoint(
        model=parts.raw_model,
        optimizer=parts.optimizer,
        scheduler_state={
            "step": parts.scheduler.state_dict() if parts.scheduler else None,
            "plateau": plateau.state_dict() if plateau else None,
        },
        scaler=parts.scaler,
        config=config.model_dump(mode="json"),
        experiment=experiment.name,
        model_name=config.model.name,
        model_kwargs=config.model.kwargs,
        trained_on=trained_on,
        **state.position(),
    )
    for path in paths:
        save_checkpoint(path, checkpoint)
        state.checkpoints_written += 1


def resume_from(path: Path, parts: StepParts, plateau, device: torch.device) -> TrainingState:
    """Load a checkpoint's model, optimizer, schedulers and scaler into ``parts`` and
    ``plateau``; return the state it records (position and random-generator states)."""
    checkpoint = load_checkpoint(path, map_location=device)
    try:
        parts.raw_model.load_state_dict(checkpoint["model_state"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: its weights do not fit this run's model (another model or architecture): "
            f"{str(err).splitlines()[0][:200]}"
        ) from None
    parts.optimizer.load_state_dict(checkpoint["optimizer_state"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(checkpoint["scheduler_state"]["step"])
    if plateau is not None:
        plateau.load_state_dict(checkpoint["scheduler_state"]["plateau"])
    if checkpoint["scaler_state"]:
        parts.scaler.load_state_dict(checkpoint["scaler_state"])
    state = TrainingState.from_checkpoint(checkpoint)
    state.resumed_from = {"checkpoint": str(path), **state.position()}
    logger.info("resuming from %s", state.resumed_from)
    return state


def run_summary(
    state: TrainingState,
    val_metrics: dict,
    config: TrainConfig,
    parts: StepParts,
    run_dir: Path,
    world_size: int,
    rank: int,
) -> dict:
    """What :func:`train` returns (see there)."""
    device, amp_dtype = parts.device, parts.amp_dtype
    best_path = checkpoint_path(run_dir, BEST)
    return {
        "run_dir": str(run_dir),
        "device": str(device),
        "world_size": world_size,
        "rank": rank,
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
        "channels_last": channels_last_for(config, device),
        "steps": state.step,
        "epochs_completed": state.epoch,
        "stop_reason": state.stop_reason,
        "best_val_loss": state.best_metric,
        "val": val_metrics,
        "samples_per_s": state.samples / state.seconds if state.seconds else math.nan,
        "last_checkpoint": str(checkpoint_path(run_dir, LAST)),
        "best_checkpoint": str(best_path) if best_path.is_file() else None,
        "checkpoints_written": state.checkpoints_written,
        "resumed_from": state.resumed_from,
    }


def agree(flag: int, distributed: bool, device: torch.device) -> int:
    """Maximum of an integer flag over all processes, so that every rank takes the same branch."""
    if not distributed:
        return flag
    value = torch.tensor([flag], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def stop_check(
    config: TrainConfig,
    state: TrainingState,
    stop_requested: Callable[[int], bool] | None,
    distributed: bool,
    device: torch.device,
) -> str | None:
    """Why the run stops after this step (the ranks agree), or None."""
    if config.max_steps is not None and state.step >= config.max_steps:
        return "max_steps"
    if config.max_minutes is None and stop_requested is None:
        return None
    out_of_time = (
        config.max_minutes is not None
        and time.monotonic() - state.started > 60.0 * config.max_minutes
    )
    requested = stop_requested is not None and stop_requested(state.step)
    # agree() takes the largest code over the ranks: the time budget wins over a request.
    verdict = agree(2 if out_of_time else int(requested), distributed, device)
    return (None, "stop_requested", "time_budget")[verdict]


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: DataLoader,
    parts: StepParts,
    normalization: Normalization,
) -> dict[str, float]:
    """Validation loss, MSE in mm/h and CSI at 1 mm/h, pooled over the valid pixels of a loader.

    MSE and CSI score a stochastic model's ensemble mean. The CSI pools a contingency table (rain
    rate ``>`` :data:`CSI_THRESHOLD`) over all valid pixels, lead times and processes.

    Parameters
    ----------
    model : torch.nn.Module
        The model (not wrapped in DDP; each process validates its shard and sums are reduced).
    loader : torch.utils.data.DataLoader
        Validation batches ``(inputs, targets, target_mask)``.
    parts : StepParts
        The training step's loss, device, autocast dtype and whether to reduce over processes.
    normalization : Normalization
        The store's normalization (its inverse gives mm/h).

    Returns
    -------
    dict
        ``loss``, ``mse_mmh`` and ``csi_1mmh`` (NaN when undefined).
    """
    device, amp_dtype = parts.device, parts.amp_dtype
    model.eval()
    # loss x n_valid, n_valid, squared error (mm/h)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    # Every (sample, lead time) frame counts as one start of one pooled lead time.
    table = contingency_init([0.0], [CSI_THRESHOLD])
    for inputs, targets, mask in loader:
        inputs, targets, mask = (t.to(device, non_blocking=True) for t in (inputs, targets, mask))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            prediction = parts.predict(model, inputs)
        prediction = prediction.float()
        target_rain_rate = normalization.inverse(targets)
        predicted_rain_rate = point_forecast(normalization.inverse(prediction), targets)
        valid = mask > 0
        n_valid = valid.sum()
        loss = parts.loss_fn(prediction, targets, mask, target_rain_rate)
        error = torch.where(valid, predicted_rain_rate - target_rain_rate, 0.0)
        totals += torch.stack(
            [loss.double() * n_valid, n_valid.double(), (error.double() ** 2).sum()]
        )
        frames = (-1, 1, *targets.shape[-2:])  # (starts, lead time, y, x); no data is NaN
        contingency_accum(
            table,
            torch.where(valid, predicted_rain_rate, torch.nan).reshape(frames).cpu().numpy(),
            torch.where(valid, target_rain_rate, torch.nan).reshape(frames).cpu().numpy(),
        )
    if parts.distributed:
        dist.all_reduce(totals)
        for name in type(table).additive_fields:
            counts = torch.from_numpy(getattr(table, name)).to(device)
            dist.all_reduce(counts)
            setattr(table, name, counts.cpu().numpy())
    loss_sum, n_valid, squared_error = totals.tolist()
    csi = float(contingency_compute(table, ["CSI"])["CSI"].reshape(-1)[0])
    return {
        "loss": loss_sum / n_valid if n_valid else math.nan,
        "mse_mmh": squared_error / n_valid if n_valid else math.nan,
        "csi_1mmh": csi if np.isfinite(csi) else math.nan,
    }


def run_epoch(
    config: TrainConfig,
    parts: StepParts,
    state: TrainingState,
    loader: DataLoader,
    log: TrainLog | None,
    save: Callable[[bool], None],
    last_path: Path,
    stop_requested: Callable[[int], bool] | None,
    progress: bool,
) -> None:
    """Train through the rest of one epoch, or until a stop; updates ``state``."""
    world_size = dist.get_world_size() if parts.distributed else 1
    seed_epoch(loader, config.seed, state.epoch)
    rng_state, state.rng_state = state.rng_state, None
    if rng_state is not None and state.batch_index == 0:
        # Resumed at an epoch boundary: restore before the loader draws its seeds.
        restore_rng_state(rng_state)
        rng_state = None
    batches = iter(loader)
    for _ in range(state.batch_index):  # resumed mid-epoch: skip what was consumed
        next(batches)
    if rng_state is not None:
        # Resumed mid-epoch: restored after the skip, so the draws made while loading the
        # skipped batches (augmentation) do not count.
        restore_rng_state(rng_state)
    parts.model.train()
    with tqdm(  # closed on an error too, so that a one-line error starts on its own line
        total=len(loader),
        initial=state.batch_index,
        desc=f"epoch {state.epoch + 1}",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=progress_interval(sys.stderr),  # tqdm's stream; a line per update in a log
    ) as bar:
        log_tic, log_samples = time.perf_counter(), 0
        for inputs, targets, mask in batches:
            lr = parts.optimizer.param_groups[0]["lr"]  # the rate of this step, for the log
            loss_value = train_step(parts, inputs, targets, mask, state.step, last_path)
            state.step += 1
            state.batch_index += 1
            log_samples += inputs.shape[0] * world_size
            bar.update(1)
            if state.step % config.log_every == 0:
                now = time.perf_counter()
                samples_per_s = log_samples / max(now - log_tic, 1e-9)
                bar.set_postfix(
                    loss=f"{loss_value:.4g}",
                    samples_per_s=f"{samples_per_s:.1f}",
                    refresh=False,  # shown at the bar's next redraw, at most one per mininterval
                )
                if log is not None:
                    log.write(
                        state.step,
                        state.epoch + 1,
                        "train",
                        loss=loss_value,
                        lr=lr,
                        samples_per_s=samples_per_s,
                    )
                state.seconds += now - log_tic
                state.samples += log_samples
                log_tic, log_samples = now, 0
            state.stop_reason = stop_check(
                config, state, stop_requested, parts.distributed, parts.device
            )
            if state.stop_reason is not None:
                break
            if (
                config.checkpoint_every is not None
                and state.step % config.checkpoint_every == 0
                and state.batch_index < len(loader)  # the end of the epoch saves anyway
            ):
                save(False)
    state.seconds += time.perf_counter() - log_tic
    state.samples += log_samples


def train(
    config: str | os.PathLike | ExperimentConfig,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    stop_requested: Callable[[int], bool] | None = None,
) -> dict:
    """Train a model on an experiment's patch store.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this function: it joins the process
    group (NCCL on CUDA, Gloo on the CPU), wraps the model in DistributedDataParallel, reads its
    shard of the data, and only rank 0 logs and writes checkpoints.

    Parameters
    ----------
    config : str, path-like or ExperimentConfig
        Experiment config file (or the loaded config); its ``train`` section is validated with
        :class:`TrainConfig`.
    resume : bool, optional
        Continue from ``<run_dir>/checkpoints/last.pt``, by default False.
    device : str or torch.device, optional
        Training device; by default CUDA, else MPS, else the CPU.
    progress : bool, optional
        Show a tqdm progress bar (rank 0), by default True.
    stop_requested : callable, optional
        ``stop_requested(step) -> bool`` called after every step; True stops cleanly like the
        time budget (checkpoint, no validation), e.g. on a scheduler's pre-emption signal.

    Returns
    -------
    dict
        Summary: ``run_dir``, ``device``, ``world_size``, ``rank``, ``amp``, ``steps``,
        ``epochs_completed``, ``stop_reason`` (``epochs``, ``max_steps``, ``time_budget`` or
        ``stop_requested``), ``best_val_loss``, ``val`` (last validation metrics),
        ``samples_per_s``, ``last_checkpoint``, ``best_checkpoint``, ``checkpoints_written``
        (by this process) and ``resumed_from`` (the checkpoint and the step, epoch and batch a
        resumed run started from; None for a new run).

    Raises
    ------
    ConfigError
        If the config is invalid; the message names the field.
    FileNotFoundError
        If ``resume`` is set and there is no ``last.pt``.
    FileExistsError
        If ``resume`` is not set and the run folder already has a ``last.pt``.
    nowcast.storage.StoreLockedError, nowcast.storage.DiskWriteError
        If another run holds ``<run_dir>/train.lock``; if a checkpoint would not fit on disk.
    TrainingDivergedError
        If the loss becomes NaN or infinite.
    """
    experiment = config if isinstance(config, ExperimentConfig) else load_experiment(config)
    train_config = stage_config(experiment, "train", TrainConfig)
    run_dir = Path(experiment.run_path)
    last_path, best_path = checkpoint_path(run_dir, LAST), checkpoint_path(run_dir, BEST)

    # ---- processes and device, the run folder's lock -------------------------------------------
    device, world_size, rank, run = start_run(device, run_dir, last_path, resume)
    distributed, is_master = world_size > 1, rank == 0
    log = None
    try:
        configure_backends(device)
        # Every rank gets the same seed: DDP starts from rank 0's weights anyway, and the
        # DistributedSampler gives each rank different samples.
        seed_everything(train_config.seed)

        # ---- data ------------------------------------------------------------------------
        trained_on = TrainedOn.from_store(PatchStore.open(experiment.patch_store))
        train_loader, val_loader = make_train_loaders(
            experiment.patch_store, train_config, distributed
        )
        steps_per_epoch = len(train_loader)

        # ---- model, optimizer, schedules, the step -----------------------------------------
        raw_model, amp_dtype = build_network(experiment, train_config, trained_on, device)
        parts, plateau = build_step_parts(
            raw_model, train_config, trained_on, device, amp_dtype, steps_per_epoch, distributed
        )

        # ---- resume ------------------------------------------------------------------------
        state = resume_from(last_path, parts, plateau, device) if resume else TrainingState()

        # ---- compile, DDP, log ---------------------------------------------------------------
        compiled = torch.compile(raw_model) if train_config.compile else raw_model
        parts.model = compiled
        if distributed:
            parts.model = DistributedDataParallel(
                compiled, device_ids=[device.index] if device.type == "cuda" else None
            )
        if is_master:
            log = TrainLog(run_dir, resume_step=state.step if resume else None)

        def save(is_best: bool) -> None:
            """Write last.pt (and best.pt) on rank 0, with barriers so no rank is mid-step."""
            if distributed:
                dist.barrier()
            if is_master:
                # best.pt first: a kill between the two must not leave last.pt past a lost best.
                paths = (best_path, last_path) if is_best else (last_path,)
                write_checkpoints(
                    paths, experiment, train_config, trained_on, parts, plateau, state
                )
            if distributed:
                dist.barrier()

        # ---- the loop ----------------------------------------------------------------------
        if train_config.max_steps is not None and state.step >= train_config.max_steps:
            state.stop_reason = "max_steps"
        if train_config.epochs is not None and state.epoch >= train_config.epochs:
            state.stop_reason = "epochs"
        val_metrics: dict[str, float] = {}
        state.started = time.monotonic()  # the time budget is the loop's
        while state.stop_reason is None:
            run_epoch(
                train_config,
                parts,
                state,
                train_loader,
                log,
                save,
                last_path,
                stop_requested,
                progress and is_master,
            )
            # After an epoch (or a stop): validate when due, then checkpoint.
            log_epoch = state.epoch + 1
            epoch_done = state.batch_index == steps_per_epoch
            if epoch_done:
                state.epoch, state.batch_index = state.epoch + 1, 0
                if train_config.epochs is not None and state.epoch >= train_config.epochs:
                    state.stop_reason = state.stop_reason or "epochs"
            is_best = False
            due = epoch_done and state.epoch % train_config.val_every == 0
            if due or state.stop_reason in ("epochs", "max_steps"):
                val_metrics = validate(compiled, val_loader, parts, trained_on.normalization)
                log_validation(log, state.step, log_epoch, val_metrics)
                if plateau is not None:
                    plateau.step(val_metrics["loss"])
                is_best = val_metrics["loss"] < state.best_metric
                if is_best:
                    state.best_metric = val_metrics["loss"]
            if epoch_done or state.stop_reason is not None:
                save(is_best)

        return run_summary(state, val_metrics, train_config, parts, run_dir, world_size, rank)
    finally:
        if log is not None:
            log.close()
        run.close()  # the lock, and a process group this call joined


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m nowcast.train`` or ``torchrun -m nowcast.train``).

    Parameters
    ----------
    argv : list of str, optional
        Arguments, by default ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m nowcast.train", description="Train a nowcasting model (see nowcast.train)."
    )
    parser.add_argument("config", help="experiment config YAML")
    parser.add_argument("--resume", action="store_true", help="continue from checkpoints/last.pt")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # Under torchrun only rank 0 reports progress; the other ranks log warnings and errors.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        summary = train(
            args.config, resume=args.resume, device=args.device, progress=not args.no_progress
        )
    except (ConfigError, FileExistsError, FileNotFoundError, TrainingDivergedError) as err:
        parser.exit(1, f"error: {err}\n")
    if summary["rank"] == 0:
        print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
