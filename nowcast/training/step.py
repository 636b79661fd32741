"""The training step: forward, loss, backward and optimizer step.

The training loop (:func:`nowcast.training.loop.train`) and the benchmarks
(``benchmarks/bench_train.py``, ``bench_gpu.py``) run this same step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from nowcast.config import ConfigError
from nowcast.patches.normalization import Normalization
from nowcast.training import losses
from nowcast.training.config import TrainConfig, TrainingDivergedError


def global_mean(value: torch.Tensor, distributed: bool) -> float:
    """Mean of a scalar over all processes (itself without DDP), as a Python float."""
    if distributed:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def build_loss(
    train_config: TrainConfig, normalization: Normalization, device: torch.device
) -> Callable[..., torch.Tensor]:
    """The configured loss with its keyword arguments bound.

    A loss in :data:`nowcast.training.losses.THRESHOLD_LOSSES` also gets the rain thresholds
    :data:`nowcast.training.losses.WET_AREA_THRESHOLDS` in the store's normalised units.
    """
    loss_fn = losses.get_method(train_config.loss)
    kwargs: dict[str, Any] = dict(train_config.loss_kwargs)
    if train_config.loss in losses.THRESHOLD_LOSSES:
        rain_rate = torch.tensor(losses.WET_AREA_THRESHOLDS, dtype=torch.float32)
        kwargs["wet_thresholds"] = normalization.forward(rain_rate).to(device)
    if train_config.loss == "crps_rain":
        kwargs["to_rain_rate"] = normalization.inverse
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


@dataclasses.dataclass
class StepParts:
    """What one optimisation step uses: the model, its optimizer and how to score a batch."""

    model: torch.nn.Module
    raw_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_fn: Callable[..., torch.Tensor]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    grad_clip: float | None = None
    scheduler: Any = None
    #: Called with the normalised targets when the loss needs them in mm/h, else None.
    rain_rate: Callable[[torch.Tensor], torch.Tensor] | None = None
    distributed: bool = False
    #: Members per sample of a stochastic model (``train.members``); 1 for a deterministic one.
    members: int = 1

    def predict(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The forecast of ``model`` (``self.model``, or the unwrapped model in validation).

        A deterministic model is called as ``model(inputs)``. A stochastic one draws
        :attr:`members` members per sample, with independent noise from torch's global
        generator (its state is in every checkpoint, so a resumed run draws the same noise),
        and returns them on a member axis after the batch axis.
        """
        if not getattr(self.raw_model, "stochastic", False):
            return model(inputs)
        return model(inputs, n_members=self.members)

    @classmethod
    def for_config(
        cls,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        normalization: Normalization,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        **options,
    ) -> StepParts:
        """The parts of a ``train:`` section: its loss (with the rain rates it needs), gradient
        clipping and a scaler for fp16; ``options`` are the other fields (e.g. ``scheduler``)."""
        needs_rain_rate = config.loss in losses.RAIN_RATE_LOSSES
        return cls(
            model=options.pop("compiled", model),
            raw_model=model,
            optimizer=optimizer,
            scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
            loss_fn=build_loss(config, normalization, device),
            device=device,
            amp_dtype=amp_dtype,
            grad_clip=config.grad_clip,
            rain_rate=normalization.inverse if needs_rain_rate else None,
            members=config.members,
            **options,
        )


def point_forecast(prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The ensemble mean of members (batch, m, ...) of ``targets`` (batch, ...); a forecast
    without a member axis as it is. Validation scores the mean's MSE and CSI."""
    return prediction.mean(dim=1) if prediction.dim() == targets.dim() + 1 else prediction


def train_step(parts: StepParts, inputs, targets, mask, step: int = 0, checkpoint=None) -> float:
    """One optimisation step on a batch; returns the loss (mean over ranks).

    Forward under autocast when ``amp_dtype`` is set (:meth:`StepParts.predict`: with
    members, gradients flow through all of them), the loss in fp32 (low-precision sums over
    a whole batch lose the small errors), backward through the gradient scaler, optional
    clipping, optimizer and per-step scheduler. The training loop and the benchmarks
    (``benchmarks/bench_train.py``, ``bench_gpu.py``) run this same function.

    Raises
    ------
    TrainingDivergedError
        If the loss is NaN or infinite (``step`` and ``checkpoint`` go into the message).
    """
    device = parts.device
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    mask = mask.to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        prediction = parts.predict(parts.model, inputs)
    target_rain_rate = parts.rain_rate(targets) if parts.rain_rate is not None else None
    loss = parts.loss_fn(prediction.float(), targets, mask, target_rain_rate)
    loss_value = global_mean(loss, parts.distributed)
    if not math.isfinite(loss_value):
        raise TrainingDivergedError(step + 1, loss_value, checkpoint)
    parts.scaler.scale(loss).backward()
    if parts.grad_clip is not None:
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.raw_model.parameters(), parts.grad_clip)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scheduler is not None:
        parts.scheduler.step()
    return loss_value
