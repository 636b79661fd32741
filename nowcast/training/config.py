"""The ``train:`` section of an experiment config, and the training errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nowcast.config import StrictModel, UserError
from nowcast.models.registry import DEFAULT_MODEL, get_method, is_stochastic
from nowcast.training.losses import MEMBER_LOSSES

logger = logging.getLogger(__name__)


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
    loss: Literal[
        "mse", "mae", "mse+mae", "bmse+bmae", "mse+bias", "pinball", "crps", "crps_rain"
    ] = "bmse+bmae"
    loss_kwargs: dict[str, float] = Field(
        default_factory=dict,
        description="keyword arguments of the loss, e.g. {area_weight: 1.0} for mse+bias",
    )
    epochs: int | None = Field(20, ge=1, description="epochs to train (null: max_steps only)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    batch_size: int = Field(8, ge=1, description="per process")
    members: int = Field(
        1,
        ge=1,
        description="ensemble members per sample of a stochastic model (>= 2, with loss crps); "
        "the forecaster runs batch_size x members sequences per step",
    )
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

    @model_validator(mode="after")
    def _members_fit_model_and_loss(self) -> TrainConfig:
        # An ensemble loss needs members, and members need a model that draws them.
        name, member_loss = self.model.name, self.loss in MEMBER_LOSSES
        if is_stochastic(name):
            if self.members < 2 or not member_loss:
                raise ValueError(
                    f"model '{name}' is stochastic: train it with loss: crps (or crps_rain) and "
                    "members >= 2 "
                    f"(got loss {self.loss}, members {self.members})"
                )
        elif member_loss or self.members > 1:
            raise ValueError(
                f"loss {self.loss} with members {self.members} needs a stochastic model "
                f"(stochastic_convlstm); '{name}' forecasts one member: use members: 1 and "
                f"another loss"
            )
        return self


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss became NaN or infinite; no checkpoint was written from that state."""

    def __init__(self, step: int, loss: float, last_checkpoint: Path) -> None:
        self.step = step
        self.loss = loss
        super().__init__(
            f"training diverged at step {step}: loss is {loss}; no checkpoint was written from "
            f"this state, the last good one is {last_checkpoint} (resume from it with a lower "
            f"learning rate, a stronger grad_clip or amp: off)"
        )
