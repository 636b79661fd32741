"""Set-up of a training run: processes, run folder, loaders, precision, seeds, optimizer and
schedules, the log."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler

from nowcast import storage
from nowcast.patches.loader import make_dataloaders
from nowcast.training.checkpoint import TrainedOn, check_checkpoint
from nowcast.training.config import TrainConfig
from nowcast.training.device import resolve_device
from nowcast.training.step import StepParts

logger = logging.getLogger(__name__)

#: Lock file of a run folder, held by rank 0 while ``train`` runs.
RUN_LOCK = "train.lock"
LOG_FIELDS = ("step", "epoch", "split", "loss", "mse_mmh", "csi_1mmh", "lr", "samples_per_s")


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype for an ``amp`` setting on ``device`` (None: full fp32).

    Parameters
    ----------
    amp : {"auto", "bf16", "fp16", "off"}
        The config value; ``"auto"`` is bf16 on GPUs that support it, fp16 on other CUDA GPUs
        and off elsewhere.
    device : torch.device
        Training device.

    Returns
    -------
    torch.dtype or None
        ``torch.bfloat16``, ``torch.float16`` or None.

    Raises
    ------
    ValueError
        For fp16 on the CPU (no speed-up there, and loss scaling would be needed).
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("amp 'fp16' needs a GPU; use 'bf16' or 'off' on the CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) global generators.

    Parameters
    ----------
    seed : int
        Seed.
    """
    random.seed(seed)
    # The legacy global generator on purpose: it is the one third-party augmentation code uses.
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make the shuffle and worker seeds of ``loader`` a function of ``(seed, epoch)``.

    A resumed run replays the same epoch order this way, whatever happened before it. A dataset
    with a ``set_epoch`` method is told the epoch as well.

    Parameters
    ----------
    loader : torch.utils.data.DataLoader
        Training loader: its sampler has ``set_epoch`` (``DistributedSampler``) or it and/or
        its sampler have a ``torch.Generator``.
    seed : int
        Run seed.
    epoch : int
        Epoch about to start (0-based).
    """
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        # For augmentation seeded per (seed, epoch, sample); a persistent worker keeps its own
        # copy of the dataset and does not see this call.
        loader.dataset.set_epoch(epoch)
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (
        loader.generator,
        getattr(sampler, "generator", None),
        getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    )
    generators = {id(generator): generator for generator in candidates if generator is not None}
    for generator in generators.values():
        generator.manual_seed(epoch_seed)
    if isinstance(sampler, RandomSampler) and sampler.generator is None:
        warnings.warn(
            "the training loader shuffles with the global generator; the data order of a run "
            "resumed mid-epoch will differ (give the DataLoader a torch.Generator)",
            stacklevel=2,
        )


def learning_rate_factor(
    step: int, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / (warmup_steps + 1)``, then for ``"cosine"`` a half cosine from
    1 down to ``min_lr_ratio`` at ``total_steps``; 1 otherwise.

    Parameters
    ----------
    step : int
        Optimizer steps done.
    schedule : {"cosine", "plateau", "none"}
        Schedule name.
    warmup_steps : int
        Warm-up length.
    total_steps : int
        Planned length of the run.
    min_lr_ratio : float
        Cosine floor.

    Returns
    -------
    float
        The factor.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule != "cosine":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def configure_backends(device: torch.device) -> None:
    """On CUDA: TF32 matmuls and convolutions, and cuDNN autotuning (fixed patch shapes)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with the config's settings; the fused kernel on CUDA."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=config.optimizer.lr,
        betas=config.optimizer.betas,
        weight_decay=config.optimizer.weight_decay,
        fused=device.type == "cuda",
    )


def build_schedulers(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Return the per-step scheduler and the per-validation plateau scheduler (either may be None).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer.
    config : TrainConfig
        Training config.
    total_steps : int
        Planned length of the run (for the cosine).

    Returns
    -------
    step_scheduler : torch.optim.lr_scheduler.LRScheduler or None
        Stepped after every optimizer step.
    plateau : torch.optim.lr_scheduler.ReduceLROnPlateau or None
        Stepped with the validation loss.
    """
    schedulers = torch.optim.lr_scheduler
    if config.schedule == "cosine":

        def factor(step: int) -> float:
            return learning_rate_factor(
                step, "cosine", config.warmup_steps, total_steps, config.min_lr_ratio
            )

        return schedulers.LambdaLR(optimizer, factor), None
    warmup = None
    if config.warmup_steps:
        # LinearLR is "chainable": after warm-up it leaves the lr alone, so the plateau's
        # reductions stick (a LambdaLR would reset the lr to base_lr * factor every step).
        warmup = schedulers.LinearLR(
            optimizer, 1.0 / (config.warmup_steps + 1), 1.0, total_iters=config.warmup_steps
        )
    if config.schedule == "none":
        return warmup, None
    plateau = schedulers.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience
    )
    return warmup, plateau


def start_processes(device: str | torch.device | None) -> tuple[torch.device, int, int, bool]:
    """Pick this process's device and, under torchrun, join the process group.

    The group uses NCCL on CUDA and Gloo on the CPU; a group already initialised (by the
    caller) is joined as it is.

    Parameters
    ----------
    device : str, torch.device or None
        The requested device (see :func:`nowcast.training.device.resolve_device`); under
        torchrun a CUDA device is the one of ``LOCAL_RANK``.

    Returns
    -------
    tuple
        ``(device, world_size, rank, owns_process_group)``; ``owns_process_group`` is True
        when this call initialised the group, which the caller then destroys.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_process_group = world_size > 1 and not dist.is_initialized()
    if owns_process_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return device, world_size, rank, owns_process_group


def start_run(
    device: str | torch.device | None, run_dir: Path, last_path: Path, resume: bool
) -> tuple[torch.device, int, int, ExitStack]:
    """Start a training run: :func:`start_processes`, the run folder's lock, then
    :func:`check_run_folder`.

    Rank 0 alone holds ``<run_dir>/train.lock`` (:data:`RUN_LOCK`), so a second ``train`` of
    the same run fails instead of interleaving checkpoints; the ranks agree on whether rank 0
    got it, so none waits at a barrier for a rank that stopped.

    Returns
    -------
    tuple
        ``(device, world_size, rank, run)``; closing ``run`` (an ExitStack) releases the lock
        and leaves a process group this call joined.

    Raises
    ------
    nowcast.storage.StoreLockedError
        If another run holds the lock (every rank raises).
    FileNotFoundError, FileExistsError
        As :func:`check_run_folder`.
    """
    device, world_size, rank, owns_process_group = start_processes(device)
    run = ExitStack()
    if owns_process_group:
        run.callback(dist.destroy_process_group)
    lock = run_dir / RUN_LOCK
    try:
        failure = None
        if rank == 0:
            try:
                run.enter_context(storage.exclusive_lock(lock))
            except Exception as err:  # held, or a folder that cannot take it: every rank stops
                failure = err
        if world_size > 1:
            flag = torch.tensor([int(failure is not None)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and failure is None:
                failure = storage.StoreLockedError(f"{lock}: rank 0 could not take the lock")
        if failure is not None:
            raise failure
        check_run_folder(last_path, resume)
    except BaseException:
        run.close()
        raise
    return device, world_size, rank, run


def check_run_folder(last_path: Path, resume: bool) -> None:
    """Check that a run can start: a resumed run has a usable ``last.pt``, a new one has none.

    Raises
    ------
    FileNotFoundError
        If ``resume`` is set and there is no ``last_path``.
    CheckpointError
        If ``resume`` is set and ``last_path`` is not a usable checkpoint (checked whole, as
        :func:`~nowcast.training.checkpoint.check_checkpoint` does, before any work).
    FileExistsError
        If ``resume`` is not set and ``last_path`` exists.
    """
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"cannot resume: {last_path} does not exist")
    if resume:
        check_checkpoint(last_path)
    if not resume and last_path.is_file():
        raise FileExistsError(
            f"{last_path} exists: pass --resume to continue that run, or choose another run_dir"
        )


def make_train_loaders(
    store: str, config: TrainConfig, distributed: bool
) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders of a patch store for a ``train`` section.

    Raises
    ------
    ValueError
        If the training split does not fill one batch.
    """
    loaders = make_dataloaders(
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
    return loaders["train"], loaders["val"]


def build_step_parts(
    model: torch.nn.Module,
    config: TrainConfig,
    trained_on: TrainedOn,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    steps_per_epoch: int,
    distributed: bool,
) -> tuple[StepParts, torch.optim.lr_scheduler.ReduceLROnPlateau | None]:
    """The optimizer, schedules and loss of a ``train`` section around ``model``.

    Returns
    -------
    tuple
        ``(parts, plateau)``: the training step's parts (the per-step scheduler among them,
        planned over :func:`planned_steps`) and the per-validation plateau scheduler (or None).
    """
    optimizer = build_optimizer(model, config, device)
    step_scheduler, plateau = build_schedulers(
        optimizer, config, planned_steps(config, steps_per_epoch)
    )
    parts = StepParts.for_config(
        model,
        optimizer,
        config,
        trained_on.normalization,
        device,
        amp_dtype,
        scheduler=step_scheduler,
        distributed=distributed,
    )
    return parts, plateau


def planned_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Number of optimizer steps the run will take (the cosine's length)."""
    lengths = []
    if config.max_steps is not None:
        lengths.append(config.max_steps)
    if config.epochs is not None:
        lengths.append(config.epochs * steps_per_epoch)
    return min(lengths)


def log_validation(log: TrainLog | None, step: int, epoch: int, metrics: dict) -> None:
    """Report a validation: a ``val`` row of the log (rank 0) and a logger line."""
    if log is not None:
        log.write(step, epoch, "val", **metrics)
    logger.info(
        "epoch %d step %d: val loss %.4g, MSE %.4g (mm/h)^2, CSI(1 mm/h) %.3f",
        epoch,
        step,
        metrics["loss"],
        metrics["mse_mmh"],
        metrics["csi_1mmh"],
    )


class TrainLog:
    """Training log of the rank-0 process: ``train_log.csv`` rows and TensorBoard scalars.

    Parameters
    ----------
    run_dir : pathlib.Path
        Run folder.
    resume_step : int, optional
        When resuming: rows and events after this step come from the interrupted run and are
        dropped, since they will be redone.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only

        run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = run_dir / "train_log.csv"
        rows = []
        if resume_step is not None and self.csv_path.exists():
            with self.csv_path.open(newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
        with self.csv_path.open("w", newline="") as file:
            writer = csv.DictWriter(file, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, step: int, epoch: int, split: str, **values: float) -> None:
        """Append one row (missing columns stay empty) and its scalars.

        Parameters
        ----------
        step, epoch : int
            Optimizer step and 1-based epoch.
        split : {"train", "val"}
            Which split the values describe.
        **values : float
            Any of ``loss, mse_mmh, csi_1mmh, lr, samples_per_s``.
        """
        with self.csv_path.open("a", newline="") as file:
            csv.DictWriter(file, LOG_FIELDS).writerow(
                {"step": step, "epoch": epoch, "split": split, **values}
            )
        for name, value in values.items():
            self.tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self.tensorboard.close()
