"""Training loop for the nowcasting models: one GPU, the CPU, or several GPUs through torchrun.

The loop is written out top to bottom in :func:`train` (in the spirit of nanoGPT): no framework
hides a step. Run it as::

    python -m nowcast.train pipelines/configs/bom.yaml [--resume] [--device cpu]
    torchrun --nproc_per_node=2 -m nowcast.train pipelines/configs/bom.yaml

It reads the ``train`` section of an experiment config (:class:`TrainConfig`), the patch store
``<patch_dir>/<name>.zarr`` through :mod:`nowcast.dataset`, and writes to ``<run_dir>``:

- ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (see :mod:`nowcast.checkpoint`);
- ``train_log.csv`` with columns ``step, epoch, split, loss, mse_mmh, csi_1mmh, lr,
  samples_per_s`` (``split`` is ``train`` or ``val``; ``epoch`` is 1-based);
- ``tensorboard/`` event files.

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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from nowcast import dataset as data
from nowcast.checkpoint import (
    BEST,
    LAST,
    checkpoint_path,
    load_checkpoint,
    make_checkpoint,
    restore_rng_state,
    save_checkpoint,
    training_pixel_sizes,
)
from nowcast.config import ConfigError
from nowcast.devices import resolve_device
from nowcast.experiment import ExperimentConfig, load_experiment, stage_config
from nowcast.models import build_model
from nowcast.training.config import (
    ModelSpec,
    OptimizerConfig,
    TrainConfig,
    TrainingDivergedError,
)
from nowcast.training.setup import (
    LOG_FIELDS,
    TrainLog,
    build_loss,
    build_optimizer,
    build_schedulers,
    configure_backends,
    learning_rate_factor,
    planned_steps,
    resolve_amp_dtype,
    seed_epoch,
    seed_everything,
    validate,
)
from nowcast.training.step import StepParts, TrainingState, stop_check, train_step

logger = logging.getLogger(__name__)

__all__ = [
    "LOG_FIELDS",
    "ModelSpec",
    "OptimizerConfig",
    "StepParts",
    "TrainConfig",
    "TrainLog",
    "TrainingDivergedError",
    "TrainingState",
    "build_loss",
    "learning_rate_factor",
    "resolve_amp_dtype",
    "resolve_device",
    "train",
    "train_step",
]


@dataclasses.dataclass
class Run:
    """One training run's fixed parts: where it writes, what it trains, how it is scheduled."""

    experiment: ExperimentConfig
    config: TrainConfig
    info: dict
    parts: StepParts
    plateau: Any
    last_path: Path
    best_path: Path
    is_master: bool
    checkpoints_written: int = 0

    def save(self, state: TrainingState, is_best: bool) -> None:
        """Write last.pt (and best.pt) on rank 0, with barriers so no rank is mid-step."""
        distributed = self.parts.distributed
        if distributed:
            dist.barrier()
        if self.is_master:
            scheduler = self.parts.scheduler
            checkpoint = make_checkpoint(
                model=self.parts.raw_model,
                optimizer=self.parts.optimizer,
                scheduler_state={
                    "step": scheduler.state_dict() if scheduler else None,
                    "plateau": self.plateau.state_dict() if self.plateau else None,
                },
                scaler=self.parts.scaler,
                config=self.config.model_dump(mode="json"),
                experiment=self.experiment.name,
                model_name=self.config.model.name,
                model_kwargs=self.config.model.kwargs,
                store_info=self.info,
                step=state.step,
                epoch=state.epoch,
                batch_index=state.batch_index,
                best_metric=state.best_metric,
            )
            save_checkpoint(self.last_path, checkpoint)
            self.checkpoints_written += 1
            if is_best:
                save_checkpoint(self.best_path, checkpoint)
                self.checkpoints_written += 1
        if distributed:
            dist.barrier()


def resume_state(run: Run, device: torch.device) -> tuple[TrainingState, dict]:
    """Load last.pt into the run's model, optimizer, schedulers and scaler."""
    checkpoint = load_checkpoint(run.last_path, map_location=device)
    parts = run.parts
    parts.raw_model.load_state_dict(checkpoint["model_state"])
    parts.optimizer.load_state_dict(checkpoint["optimizer_state"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(checkpoint["scheduler_state"]["step"])
    if run.plateau is not None:
        run.plateau.load_state_dict(checkpoint["scheduler_state"]["plateau"])
    if checkpoint["scaler_state"]:
        parts.scaler.load_state_dict(checkpoint["scaler_state"])
    state = TrainingState(
        step=checkpoint["step"],
        epoch=checkpoint["epoch"],
        batch_index=checkpoint["batch_index"],
        best_metric=checkpoint["best_metric"],
    )
    logger.info(
        "resuming %s at step %d (epoch %d, batch %d)",
        run.last_path.parent.parent,
        state.step,
        state.epoch + 1,
        state.batch_index,
    )
    return state, checkpoint["rng_state"]


def build_run(
    experiment: ExperimentConfig,
    config: TrainConfig,
    info: dict,
    transform,
    normalization: dict,
    device: torch.device,
    distributed: bool,
    is_master: bool,
    total_steps: int,
) -> Run:
    """Model, optimizer, schedules, scaler and loss of a run (the model not yet compiled)."""
    where = f"{getattr(experiment, '_path', experiment.name)}: section 'train'"
    try:
        amp_dtype = resolve_amp_dtype(config.amp, device)
    except ValueError as err:
        raise ConfigError(f"{where}: field 'amp': {err}") from None
    try:
        raw_model = build_model(
            config.model.name,
            int(info["n_input_frames"]),
            int(info["n_target_frames"]),
            **config.model.kwargs,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: field 'model.kwargs': {err}") from None
    raw_model.to(device)
    if channels_last_for(config, device):
        raw_model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(raw_model, config, device)
    step_scheduler, plateau = build_schedulers(optimizer, config, total_steps)
    parts = StepParts.for_config(
        raw_model,
        optimizer,
        config,
        transform,
        normalization,
        device,
        amp_dtype,
        scheduler=step_scheduler,
        distributed=distributed,
    )
    run_dir = Path(experiment.run_path)
    return Run(
        experiment,
        config,
        info,
        parts,
        plateau,
        checkpoint_path(run_dir, LAST),
        checkpoint_path(run_dir, BEST),
        is_master,
    )


def channels_last_for(config: TrainConfig, device: torch.device) -> bool:
    """benchmarks/bench_train.py: on the CPU (oneDNN) a channels_last step is as fast or up to
    ~10 % faster, and on CUDA it feeds the tensor cores."""
    if config.channels_last == "auto":
        return device.type in ("cuda", "cpu")
    return bool(config.channels_last)


def run_epoch(
    run: Run,
    state: TrainingState,
    loader: DataLoader,
    rng_state: dict | None,
    clock: dict,
    log: TrainLog | None,
    progress: bool,
    stop_requested: Callable[[int], bool] | None,
) -> None:
    """Train through the rest of one epoch, or until a stop; updates ``state`` and ``clock``."""
    config, parts = run.config, run.parts
    world_size = dist.get_world_size() if parts.distributed else 1
    seed_epoch(loader, config.seed, state.epoch)
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
    bar = tqdm(
        total=len(loader),
        initial=state.batch_index,
        desc=f"epoch {state.epoch + 1}",
        disable=not (progress and run.is_master),
        dynamic_ncols=True,
    )
    log_tic, log_samples = time.perf_counter(), 0
    for inputs, targets, mask in batches:
        lr = parts.optimizer.param_groups[0]["lr"]  # the rate of this step, for the log
        loss_value = train_step(parts, inputs, targets, mask, state.step, run.last_path)
        state.step += 1
        state.batch_index += 1
        log_samples += inputs.shape[0] * world_size
        bar.update(1)
        if state.step % config.log_every == 0:
            now = time.perf_counter()
            samples_per_s = log_samples / max(now - log_tic, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4g}", samples_per_s=f"{samples_per_s:.1f}")
            if log is not None:
                log.write(
                    state.step,
                    state.epoch + 1,
                    "train",
                    loss=loss_value,
                    lr=lr,
                    samples_per_s=samples_per_s,
                )
            clock["seconds"] += now - log_tic
            clock["samples"] += log_samples
            log_tic, log_samples = now, 0
        state.stop_reason = stop_check(
            config, state, clock["started"], stop_requested, parts.distributed, parts.device
        )
        if state.stop_reason is not None:
            break
        if (
            config.checkpoint_every is not None
            and state.step % config.checkpoint_every == 0
            and state.batch_index < len(loader)  # the end of the epoch saves anyway
        ):
            run.save(state, is_best=False)
    bar.close()
    clock["seconds"] += time.perf_counter() - log_tic
    clock["samples"] += log_samples


def end_epoch(
    run: Run,
    state: TrainingState,
    steps_per_epoch: int,
    validation: Callable[[], dict],
    log: TrainLog | None,
) -> dict | None:
    """After an epoch (or a stop): validate when due, then checkpoint; the val metrics or None."""
    config = run.config
    log_epoch = state.epoch + 1
    epoch_done = state.batch_index == steps_per_epoch
    if epoch_done:
        state.epoch, state.batch_index = state.epoch + 1, 0
        if config.epochs is not None and state.epoch >= config.epochs:
            state.stop_reason = state.stop_reason or "epochs"
    val_metrics, is_best = None, False
    due = epoch_done and state.epoch % config.val_every == 0
    if due or state.stop_reason in ("epochs", "max_steps"):
        val_metrics = validation()
        if log is not None:
            log.write(state.step, log_epoch, "val", **val_metrics)
        if run.plateau is not None:
            run.plateau.step(val_metrics["loss"])
        is_best = val_metrics["loss"] < state.best_metric
        if is_best:
            state.best_metric = val_metrics["loss"]
        logger.info(
            "epoch %d step %d: val loss %.4g, MSE %.4g (mm/h)^2, CSI(1 mm/h) %.3f",
            log_epoch,
            state.step,
            val_metrics["loss"],
            val_metrics["mse_mmh"],
            val_metrics["csi_1mmh"],
        )
    if epoch_done or state.stop_reason is not None:
        run.save(state, is_best)
    return val_metrics


def run_summary(
    run: Run, state: TrainingState, clock: dict, val_metrics: dict, world_size: int, rank: int
) -> dict:
    """What :func:`train` returns (see there)."""
    amp_dtype, device = run.parts.amp_dtype, run.parts.device
    return {
        "run_dir": str(run.last_path.parent.parent),
        "device": str(device),
        "world_size": world_size,
        "rank": rank,
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
        "channels_last": channels_last_for(run.config, device),
        "steps": state.step,
        "epochs_completed": state.epoch,
        "stop_reason": state.stop_reason,
        "best_val_loss": state.best_metric,
        "val": val_metrics,
        "samples_per_s": clock["samples"] / clock["seconds"] if clock["seconds"] else math.nan,
        "last_checkpoint": str(run.last_path),
        "best_checkpoint": str(run.best_path) if run.best_path.is_file() else None,
        "checkpoints_written": run.checkpoints_written,
    }


def load_data(experiment: ExperimentConfig, config: TrainConfig, distributed: bool):
    """Store facts, normalization and the train/val loaders of the experiment's patch store.

    Returns
    -------
    tuple
        ``(info, transform, normalization, loaders)``; ``info`` also records the training
        pixel size per source (``pixel_size_m``), which the checkpoints keep.
    """
    store = experiment.patch_store
    info = data.store_info(store)
    info["pixel_size_m"] = training_pixel_sizes(info.get("cube_paths") or {})
    transform, normalization = data.load_normalization(store)
    loaders = data.make_dataloaders(
        store,
        config.batch_size,
        num_workers=config.num_workers,
        augment=config.augment,
        distributed=distributed,
        seed=config.seed,
        time_reversal=config.time_reversal,
    )
    if len(loaders["train"]) == 0:
        raise ValueError(f"the training split of {store} gives no batch of {config.batch_size}")
    return info, transform, normalization, loaders


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
        (by this process).

    Raises
    ------
    ConfigError
        If the config is invalid; the message names the field.
    FileNotFoundError
        If ``resume`` is set and there is no ``last.pt``.
    FileExistsError
        If ``resume`` is not set and the run folder already has a ``last.pt``.
    TrainingDivergedError
        If the loss becomes NaN or infinite.
    """
    experiment = config if isinstance(config, ExperimentConfig) else load_experiment(config)
    train_config = stage_config(experiment, "train", TrainConfig)
    run_dir = Path(experiment.run_path)
    last_path = checkpoint_path(run_dir, LAST)
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"cannot resume: {last_path} does not exist")
    if not resume and last_path.is_file():
        raise FileExistsError(
            f"{last_path} exists: pass --resume to continue that run, or choose another run_dir"
        )

    # ---- processes and device ----------------------------------------------------------------
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_process_group = distributed and not dist.is_initialized()
    if owns_process_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    log = None
    try:
        configure_backends(device)
        # Every rank gets the same seed: DDP starts from rank 0's weights anyway, and the
        # DistributedSampler gives each rank different samples.
        seed_everything(train_config.seed)

        # ---- data ------------------------------------------------------------------------
        info, transform, normalization, loaders = load_data(experiment, train_config, distributed)
        train_loader, val_loader = loaders["train"], loaders["val"]
        steps_per_epoch = len(train_loader)

        # ---- model, optimizer, schedule, loss; resume --------------------------------------
        total_steps = planned_steps(train_config, steps_per_epoch)
        run = build_run(
            experiment,
            train_config,
            info,
            transform,
            normalization,
            device,
            distributed,
            rank == 0,
            total_steps,
        )
        state, rng_state = resume_state(run, device) if resume else (TrainingState(), None)
        compiled = torch.compile(run.parts.raw_model) if train_config.compile else run.parts.model
        run.parts.model = compiled
        if distributed:
            run.parts.model = DistributedDataParallel(
                compiled, device_ids=[device.index] if device.type == "cuda" else None
            )
        if run.is_master:
            log = TrainLog(run_dir, resume_step=state.step if resume else None)

        def validation() -> dict:
            return validate(
                compiled,
                val_loader,
                run.parts.loss_fn,
                transform,
                normalization,
                device,
                run.parts.amp_dtype,
                distributed,
            )

        # ---- the loop ----------------------------------------------------------------------
        if train_config.max_steps is not None and state.step >= train_config.max_steps:
            state.stop_reason = "max_steps"
        if train_config.epochs is not None and state.epoch >= train_config.epochs:
            state.stop_reason = "epochs"
        clock = {"started": time.monotonic(), "seconds": 0.0, "samples": 0}
        val_metrics: dict[str, float] = {}
        while state.stop_reason is None:
            run_epoch(run, state, train_loader, rng_state, clock, log, progress, stop_requested)
            rng_state = None
            val_metrics = end_epoch(run, state, steps_per_epoch, validation, log) or val_metrics

        return run_summary(run, state, clock, val_metrics, world_size, rank)
    finally:
        if log is not None:
            log.close()
        if owns_process_group:
            dist.destroy_process_group()


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
