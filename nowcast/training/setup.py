"""Set-up of a training run: precision, seeds, optimizer and schedules, validation, the log."""

from __future__ import annotations

import csv
import functools
import inspect
import logging
import math
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler

from nowcast import losses
from nowcast.config import ConfigError
from nowcast.training.config import TrainConfig

logger = logging.getLogger(__name__)

LOG_FIELDS = ("step", "epoch", "split", "loss", "mse_mmh", "csi_1mmh", "lr", "samples_per_s")
#: Rain rate (mm/h) of the CSI reported at each validation.
CSI_THRESHOLD = 1.0


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
