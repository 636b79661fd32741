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
import csv
import functools
import importlib
import inspect
import json
import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, field_validator, model_validator
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from nowcast import losses
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
from nowcast.config import ConfigError, StrictModel
from nowcast.devices import resolve_device
from nowcast.experiment import ExperimentConfig, load_experiment, stage_config
from nowcast.models import DEFAULT_MODEL, build_model, get_method

logger = logging.getLogger(__name__)

LOG_FIELDS = ("step", "epoch", "split", "loss", "mse_mmh", "csi_1mmh", "lr", "samples_per_s")
#: Rain rate (mm/h) of the CSI reported at each validation.
CSI_THRESHOLD = 1.0


class ModelSpec(StrictModel):
    """Which registered model to train and its architecture keyword arguments."""

    name: str = Field(DEFAULT_MODEL, description="registry name, see nowcast.models")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="architecture arguments, e.g. hidden_channels"
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        get_method(value)  # raises ValueError listing the registered names
        return value.lower()


class OptimizerConfig(StrictModel):
    """AdamW settings."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"betas must be in [0, 1), got {value}")
        return value


class TrainConfig(StrictModel):
    """The ``train`` section of an experiment config."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: Literal["cosine", "plateau", "none"] = Field(
        "cosine", description="cosine decay per step, reduce-on-plateau per validation, or none"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the schedule")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor, fraction of lr")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="lr factor of a plateau")
    plateau_patience: int = Field(2, ge=0, description="validations without improvement")
    loss: Literal["mse", "mae", "mse+mae", "bmse+bmae", "mse+bias", "pinball"] = "bmse+bmae"
    loss_kwargs: dict[str, float] = Field(
        default_factory=dict,
        description="keyword arguments of the loss, e.g. {area_weight: 1.0} for mse+bias",
    )
    epochs: int | None = Field(20, ge=1, description="epochs to train (null: max_steps only)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    batch_size: int = Field(8, ge=1, description="per process")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per process")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm (null: off)")
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="auto: bf16 (else fp16) on CUDA, off elsewhere"
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="auto: on CUDA and the CPU (oneDNN), not on MPS"
    )
    compile: bool = Field(False, description="torch.compile the model")
    checkpoint_every: int | None = Field(500, ge=1, description="steps between last.pt writes")
    val_every: int = Field(1, ge=1, description="epochs between validations")
    log_every: int = Field(10, ge=1, description="steps between train log rows")
    augment: bool = True
    time_reversal: bool = Field(
        False, description="also train on windows played backwards (growth <-> decay)"
    )
    max_minutes: float | None = Field(
        None, gt=0, description="time budget: stop cleanly and checkpoint after this long"
    )

    @model_validator(mode="after")
    def _has_length(self) -> TrainConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set 'epochs' or 'max_steps' (or both)")
        return self


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; no checkpoint was written from that state."""

    def __init__(self, step: int, loss: float, last_checkpoint: Path) -> None:
        self.step = step
        self.loss = loss
        super().__init__(
            f"training diverged at step {step}: loss is {loss}; no checkpoint was written from "
            f"this state, the last good one is {last_checkpoint} (resume from it with a lower "
            f"learning rate, a stronger grad_clip or amp: off)"
        )


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


def planned_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Number of optimizer steps the run will take (the cosine's length)."""
    lengths = []
    if config.max_steps is not None:
        lengths.append(config.max_steps)
    if config.epochs is not None:
        lengths.append(config.epochs * steps_per_epoch)
    return min(lengths)


def global_mean(value: torch.Tensor, distributed: bool) -> float:
    """Mean of a scalar over all processes (itself without DDP), as a Python float."""
    if distributed:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def agree(flag: int, distributed: bool, device: torch.device) -> int:
    """Maximum of an integer flag over all processes, so that every rank takes the same branch."""
    if not distributed:
        return flag
    value = torch.tensor([flag], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: Callable[..., torch.Tensor],
    transform: Any,
    normalization: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    distributed: bool,
) -> dict[str, float]:
    """Validation loss, MSE in mm/h and CSI at 1 mm/h, pooled over the valid pixels of a loader.

    The CSI counts hits, misses and false alarms over all valid pixels before dividing (pooled,
    as pysteps' ``det_cat_fct`` accumulation); it is computed here in torch rather than with
    :mod:`nowcast.verification` so that the counts stay on the GPU.

    Parameters
    ----------
    model : torch.nn.Module
        The model (not wrapped in DDP; each process validates its shard and sums are reduced).
    loader : torch.utils.data.DataLoader
        Validation batches ``(inputs, targets, target_mask)``.
    loss_fn : callable
        Training loss (mean over valid pixels).
    transform, normalization : object
        From ``load_normalization``; ``transform.inverse(values, normalization)`` gives mm/h.
    device : torch.device
        Device.
    amp_dtype : torch.dtype or None
        Autocast dtype.
    distributed : bool
        Sum the counts over processes.

    Returns
    -------
    dict
        ``loss``, ``mse_mmh`` and ``csi_1mmh`` (NaN when undefined).
    """
    model.eval()
    # loss x n_valid, n_valid, squared error (mm/h), hits, misses, false alarms
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    for inputs, targets, mask in loader:
        inputs, targets, mask = (t.to(device, non_blocking=True) for t in (inputs, targets, mask))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            prediction = model(inputs)
        prediction = prediction.float()
        target_rain_rate = transform.inverse(targets, normalization)
        predicted_rain_rate = transform.inverse(prediction, normalization)
        valid = mask > 0
        n_valid = valid.sum()
        loss = loss_fn(prediction, targets, mask, target_rain_rate)
        error = torch.where(valid, predicted_rain_rate - target_rain_rate, 0.0)
        observed = valid & (target_rain_rate >= CSI_THRESHOLD)
        forecast = valid & (predicted_rain_rate >= CSI_THRESHOLD)
        totals += torch.stack(
            [
                loss.double() * n_valid,
                n_valid.double(),
                (error.double() ** 2).sum(),
                (observed & forecast).sum().double(),
                (observed & ~forecast).sum().double(),
                (~observed & forecast).sum().double(),
            ]
        )
    if distributed:
        dist.all_reduce(totals)
    loss_sum, n_valid, squared_error, hits, misses, false_alarms = totals.tolist()
    events = hits + misses + false_alarms
    return {
        "loss": loss_sum / n_valid if n_valid else math.nan,
        "mse_mmh": squared_error / n_valid if n_valid else math.nan,
        "csi_1mmh": hits / events if events else math.nan,
    }


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


def build_loss(
    train_config: TrainConfig, transform, normalization: dict, device: torch.device
) -> Callable[..., torch.Tensor]:
    """The configured loss with its keyword arguments bound.

    A loss in :data:`nowcast.losses.THRESHOLD_LOSSES` also gets the rain thresholds
    :data:`nowcast.losses.WET_AREA_THRESHOLDS` in the store's normalised units.
    """
    loss_fn = losses.get_method(train_config.loss)
    kwargs: dict[str, Any] = dict(train_config.loss_kwargs)
    if train_config.loss in losses.THRESHOLD_LOSSES:
        rain_rate = torch.tensor(losses.WET_AREA_THRESHOLDS, dtype=torch.float32)
        kwargs["wet_thresholds"] = transform.forward(rain_rate, normalization).to(device)
    if not kwargs:
        return loss_fn
    try:
        inspect.signature(loss_fn).bind_partial(**kwargs)
    except TypeError as error:
        raise ConfigError(
            f"train.loss_kwargs {train_config.loss_kwargs} do not fit loss "
            f"'{train_config.loss}': {error}"
        ) from None
    return functools.partial(loss_fn, **kwargs)


def train(
    config: str | os.PathLike | ExperimentConfig,
    resume: bool = False,
    device: str | torch.device | None = None,
    data_module: Any = None,
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
    data_module : object, optional
        Provider of ``make_dataloaders``, ``load_normalization`` and ``store_info`` with the
        contract of :mod:`nowcast.dataset` (the default); tests pass an in-memory fake.
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
    where = f"{getattr(experiment, '_path', experiment.name)}: section 'train'"
    data = data_module if data_module is not None else importlib.import_module("nowcast.dataset")
    run_dir = Path(experiment.run_path)
    last_path, best_path = checkpoint_path(run_dir, LAST), checkpoint_path(run_dir, BEST)
    if resume and not last_path.is_file():
        raise FileNotFoundError(f"cannot resume: {last_path} does not exist")
    if not resume and last_path.is_file():
        raise FileExistsError(
            f"{last_path} exists: pass --resume to continue that run, or choose another run_dir"
        )

    # ---- processes and device ------------------------------------------------------------
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns_process_group = distributed and not dist.is_initialized()
    if owns_process_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    is_master = rank == 0
    log = None
    try:
        try:
            amp_dtype = resolve_amp_dtype(train_config.amp, device)
        except ValueError as err:
            raise ConfigError(f"{where}: field 'amp': {err}") from None
        # benchmarks/bench_train.py: on the CPU (oneDNN) a channels_last step is as fast or up
        # to ~10 % faster.
        channels_last = (
            device.type in ("cuda", "cpu")
            if train_config.channels_last == "auto"
            else train_config.channels_last
        )
        configure_backends(device)
        # Every rank gets the same seed: DDP starts from rank 0's weights anyway, and the
        # DistributedSampler gives each rank different samples.
        seed_everything(train_config.seed)

        # ---- data ------------------------------------------------------------------------
        store = experiment.patch_store
        info = data.store_info(store)
        # Recorded in the checkpoints: the grid spacing the model learnt on, per source.
        info["pixel_size_m"] = training_pixel_sizes(info.get("cube_paths") or {})
        transform, normalization = data.load_normalization(store)
        loaders = data.make_dataloaders(
            store,
            train_config.batch_size,
            num_workers=train_config.num_workers,
            augment=train_config.augment,
            distributed=distributed,
            seed=train_config.seed,
            # Only passed when asked for, so data modules without the option keep working.
            **({"time_reversal": True} if train_config.time_reversal else {}),
        )
        train_loader, val_loader = loaders["train"], loaders["val"]
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training split of {store} gives no batch of {train_config.batch_size}"
            )
        total_steps = planned_steps(train_config, steps_per_epoch)

        # ---- model, optimizer, schedule, loss -------------------------------------------
        try:
            raw_model = build_model(
                train_config.model.name,
                int(info["n_input_frames"]),
                int(info["n_target_frames"]),
                **train_config.model.kwargs,
            )
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: field 'model.kwargs': {err}") from None
        raw_model.to(device)
        if channels_last:
            raw_model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(raw_model, train_config, device)
        step_scheduler, plateau = build_schedulers(optimizer, train_config, total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        loss_fn = build_loss(train_config, transform, normalization, device)
        needs_rain_rate = train_config.loss in losses.RAIN_RATE_LOSSES

        # ---- resume ----------------------------------------------------------------------
        step, epoch, batch_index, best_metric = 0, 0, 0, math.inf
        rng_state = None
        if resume:
            checkpoint = load_checkpoint(last_path, map_location=device)
            raw_model.load_state_dict(checkpoint["model_state"])
            optimizer.load_state_dict(checkpoint["optimizer_state"])
            if step_scheduler is not None:
                step_scheduler.load_state_dict(checkpoint["scheduler_state"]["step"])
            if plateau is not None:
                plateau.load_state_dict(checkpoint["scheduler_state"]["plateau"])
            if checkpoint["scaler_state"]:
                scaler.load_state_dict(checkpoint["scaler_state"])
            step, epoch = checkpoint["step"], checkpoint["epoch"]
            batch_index, best_metric = checkpoint["batch_index"], checkpoint["best_metric"]
            rng_state = checkpoint["rng_state"]
            del checkpoint
            logger.info(
                "resuming %s at step %d (epoch %d, batch %d)", run_dir, step, epoch + 1, batch_index
            )

        model = torch.compile(raw_model) if train_config.compile else raw_model
        eval_model = model
        if distributed:
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if is_master:
            log = TrainLog(run_dir, resume_step=step if resume else None)

        checkpoints_written = 0

        def save(is_best: bool) -> None:
            # Barrier before: no rank is mid-step; after: nobody reads or exits before rank 0
            # has written.
            nonlocal checkpoints_written
            if distributed:
                dist.barrier()
            if is_master:
                checkpoint = make_checkpoint(
                    model=raw_model,
                    optimizer=optimizer,
                    scheduler_state={
                        "step": step_scheduler.state_dict() if step_scheduler else None,
                        "plateau": plateau.state_dict() if plateau else None,
                    },
                    scaler=scaler,
                    config=train_config.model_dump(mode="json"),
                    experiment=experiment.name,
                    model_name=train_config.model.name,
                    model_kwargs=train_config.model.kwargs,
                    store_info=info,
                    step=step,
                    epoch=epoch,
                    batch_index=batch_index,
                    best_metric=best_metric,
                )
                save_checkpoint(last_path, checkpoint)
                checkpoints_written += 1
                if is_best:
                    save_checkpoint(best_path, checkpoint)
                    checkpoints_written += 1
            if distributed:
                dist.barrier()

        # ---- training loop ---------------------------------------------------------------
        stop_reason = None
        if train_config.max_steps is not None and step >= train_config.max_steps:
            stop_reason = "max_steps"
        if train_config.epochs is not None and epoch >= train_config.epochs:
            stop_reason = "epochs"
        started = time.monotonic()
        train_seconds, train_samples = 0.0, 0
        val_metrics: dict[str, float] = {}
        while stop_reason is None:
            seed_epoch(train_loader, train_config.seed, epoch)
            if rng_state is not None and batch_index == 0:
                # Resumed at an epoch boundary: restore before the loader draws its seeds.
                restore_rng_state(rng_state)
                rng_state = None
            batches = iter(train_loader)
            for _ in range(batch_index):  # resumed mid-epoch: skip what was consumed
                next(batches)
            if rng_state is not None:
                # Resumed mid-epoch: restored after the skip, so the draws made while loading
                # the skipped batches (augmentation) do not count.
                restore_rng_state(rng_state)
                rng_state = None
            model.train()
            bar = tqdm(
                total=steps_per_epoch,
                initial=batch_index,
                desc=f"epoch {epoch + 1}",
                disable=not (progress and is_master),
                dynamic_ncols=True,
            )
            epoch_tic = log_tic = time.perf_counter()
            log_samples = 0
            for inputs, targets, mask in batches:
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    prediction = model(inputs)
                # The loss in fp32: low-precision sums over a whole batch lose the small errors.
                target_rain_rate = (
                    transform.inverse(targets, normalization) if needs_rain_rate else None
                )
                loss = loss_fn(prediction.float(), targets, mask, target_rain_rate)
                loss_value = global_mean(loss, distributed)
                if not math.isfinite(loss_value):
                    raise TrainingDivergedError(step + 1, loss_value, last_path)
                lr = optimizer.param_groups[0]["lr"]  # the rate of this step, for the log
                scaler.scale(loss).backward()
                if train_config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), train_config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if step_scheduler is not None:
                    step_scheduler.step()
                step += 1
                batch_index += 1
                log_samples += inputs.shape[0] * world_size
                bar.update(1)

                if step % train_config.log_every == 0:
                    now = time.perf_counter()
                    samples_per_s = log_samples / max(now - log_tic, 1e-9)
                    bar.set_postfix(loss=f"{loss_value:.4g}", samples_per_s=f"{samples_per_s:.1f}")
                    if log is not None:
                        log.write(
                            step,
                            epoch + 1,
                            "train",
                            loss=loss_value,
                            lr=lr,
                            samples_per_s=samples_per_s,
                        )
                    train_seconds += now - log_tic
                    train_samples += log_samples
                    log_tic, log_samples = now, 0

                if train_config.max_steps is not None and step >= train_config.max_steps:
                    stop_reason = "max_steps"
                elif train_config.max_minutes is not None or stop_requested is not None:
                    out_of_time = (
                        train_config.max_minutes is not None
                        and time.monotonic() - started > 60.0 * train_config.max_minutes
                    )
                    requested = stop_requested is not None and stop_requested(step)
                    verdict = agree(2 if out_of_time else int(requested), distributed, device)
                    stop_reason = {0: None, 1: "stop_requested", 2: "time_budget"}[verdict]
                if stop_reason is not None:
                    break
                if (
                    train_config.checkpoint_every is not None
                    and step % train_config.checkpoint_every == 0
                    and batch_index < steps_per_epoch  # the end of the epoch saves anyway
                ):
                    save(is_best=False)
            bar.close()
            train_seconds += time.perf_counter() - log_tic
            train_samples += log_samples
            logger.debug("epoch %d took %.1f s", epoch + 1, time.perf_counter() - epoch_tic)

            # ---- end of epoch (or stop): validate, checkpoint ----------------------------
            log_epoch = epoch + 1
            epoch_done = batch_index == steps_per_epoch
            if epoch_done:
                epoch, batch_index = epoch + 1, 0
                if train_config.epochs is not None and epoch >= train_config.epochs:
                    stop_reason = stop_reason or "epochs"
            is_best = False
            if (epoch_done and epoch % train_config.val_every == 0) or stop_reason in (
                "epochs",
                "max_steps",
            ):
                val_metrics = validate(
                    eval_model,
                    val_loader,
                    loss_fn,
                    transform,
                    normalization,
                    device,
                    amp_dtype,
                    distributed,
                )
                if log is not None:
                    log.write(step, log_epoch, "val", **val_metrics)
                if plateau is not None:
                    plateau.step(val_metrics["loss"])
                is_best = val_metrics["loss"] < best_metric
                if is_best:
                    best_metric = val_metrics["loss"]
                logger.info(
                    "epoch %d step %d: val loss %.4g, MSE %.4g (mm/h)^2, CSI(1 mm/h) %.3f",
                    log_epoch,
                    step,
                    val_metrics["loss"],
                    val_metrics["mse_mmh"],
                    val_metrics["csi_1mmh"],
                )
            if epoch_done or stop_reason is not None:
                save(is_best)

        return {
            "run_dir": str(run_dir),
            "device": str(device),
            "world_size": world_size,
            "rank": rank,
            "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
            "channels_last": channels_last,
            "steps": step,
            "epochs_completed": epoch,
            "stop_reason": stop_reason,
            "best_val_loss": best_metric,
            "val": val_metrics,
            "samples_per_s": train_samples / train_seconds if train_seconds else math.nan,
            "last_checkpoint": str(last_path),
            "best_checkpoint": str(best_path) if best_path.is_file() else None,
            "checkpoints_written": checkpoints_written,
        }
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
