"""One optimisation step (shared by the training loop and the benchmarks) and the run state."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from nowcast import losses
from nowcast.training.config import TrainConfig, TrainingDivergedError
from nowcast.training.setup import agree, build_loss, global_mean


@dataclasses.dataclass
class TrainingState:
    """Where a run stands; what a checkpoint stores besides the weights and optimizer state.

    ``batch_index`` counts the batches of the current epoch already consumed (a run resumed
    mid-epoch skips them); ``stop_reason`` is None while the run goes on, else ``epochs``,
    ``max_steps``, ``time_budget`` or ``stop_requested``.
    """

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    best_metric: float = math.inf
    stop_reason: str | None = None


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

    @classmethod
    def for_config(
        cls,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        transform,
        normalization: dict,
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
            loss_fn=build_loss(config, transform, normalization, device),
            device=device,
            amp_dtype=amp_dtype,
            grad_clip=config.grad_clip,
            rain_rate=(lambda t: transform.inverse(t, normalization)) if needs_rain_rate else None,
            **options,
        )


def train_step(parts: StepParts, inputs, targets, mask, step: int = 0, checkpoint=None) -> float:
    """One optimisation step on a batch; returns the loss (mean over ranks).

    Forward under autocast when ``amp_dtype`` is set, the loss in fp32 (low-precision sums over
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
        prediction = parts.model(inputs)
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


def stop_check(
    config: TrainConfig,
    state: TrainingState,
    started: float,
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
        config.max_minutes is not None and time.monotonic() - started > 60.0 * config.max_minutes
    )
    requested = stop_requested is not None and stop_requested(state.step)
    # agree() takes the largest code over the ranks: the time budget wins over a request.
    verdict = agree(2 if out_of_time else int(requested), distributed, device)
    return (None, "stop_requested", "time_budget")[verdict]
