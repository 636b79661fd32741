"""A trained network as a forecast method: normalize, run on the whole grid, transform back.

The models are fully convolutional (see :mod:`nowcast.models`), so the full radar domain is
predicted in one pass whatever the patch size they were trained on. Inputs are normalized with
the parameters the patch store fitted (recorded in the checkpoint), no-data becomes 0 exactly as
in the patch store, and the output is transformed back to mm/h, clipped at 0, with the last input
frame's no-data area set to NaN.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
import xarray as xr
from torch import nn

from nowcast.advection.lagrangian import LagrangianFrame
from nowcast.nowcasts.inputs import check_inputs, input_timestep, to_forecast
from nowcast.nowcasts.isotonic import apply_calibration
from nowcast.training.checkpoint import TrainedOn, load_model
from nowcast.training.device import resolve_device
from nowcast.windows import counted_back, frame_step_note, frames_per_model_step

LOGGER = logging.getLogger(__name__)


class ModelNowcast:
    """Forecast method wrapping a model; build it once, call it for every forecast.

    Parameters
    ----------
    checkpoint : str or path-like, optional
        Checkpoint written by ``nowcast train`` (loaded once, with ``weights_only=True``).
    model : torch.nn.Module, optional
        An in-memory model instead of a checkpoint; then ``trained_on`` must be given.
    trained_on : TrainedOn, optional
        For an in-memory model: its normalization, frames (the model reads
        ``frames.n_input`` inputs; inputs at a step k times shorter than ``frames.timestep``
        are read every k-th frame counted back from the last,
        :func:`nowcast.windows.frames_per_model_step`, any other spacing is refused), reference
        frame and motion grid (from a checkpoint all this is read from the checkpoint).
    calibrated : bool, optional
        Apply the isotonic calibration that checkpoints written before calibration files
        stored in themselves (deprecated, with a warning), by default True. New calibrations
        are files (:mod:`nowcast.evaluate.calibration`) applied by a forecast-method variant.
    device : str or torch.device, optional
        Where the model (and a Lagrangian model's frame transport) runs; by default CUDA when
        available, else the CPU.
    compile : bool, optional
        Run the network through ``torch.compile`` (worth it on a GPU for repeated forecasts:
        the first call compiles), by default False.
    name : str, optional
        Method name recorded in the forecasts, by default ``"model"``.

    Examples
    --------
    >>> nowcast_method = get_method("model")(checkpoint="runs/bom/checkpoints/best.pt")
    >>> forecast = nowcast_method(inputs, n_leadtimes=6)
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        model: nn.Module | None = None,
        trained_on: TrainedOn | None = None,
        device: str | torch.device | None = None,
        name: str = "model",
        calibrated: bool = True,
        compile: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        if (checkpoint is None) == (model is None):
            raise ValueError("give either a checkpoint path or an in-memory model")
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        if checkpoint is not None:
            model, meta = load_model(checkpoint, self.device)
            trained_on = TrainedOn.from_checkpoint(meta)
            self.calibration = meta.get("calibration") if calibrated else None
            if self.calibration:
                warnings.warn(
                    f"{checkpoint}: applying the isotonic calibration stored in the checkpoint "
                    "(deprecated: `nowcast calibrate` writes a separate calibration file, "
                    "named by a forecast method's `postprocess: {method: isotonic, file: ...}`)",
                    DeprecationWarning,
                    stacklevel=2,
                )
            self.n_target_frames = trained_on.frames.n_target
            self.model_name = meta["model_name"]
        else:
            self.calibration = None
            if trained_on is None:
                raise ValueError("an in-memory model needs trained_on")
            self.n_target_frames = getattr(model, "n_target_frames", None)
            self.model_name = type(model).__name__
        self.model = model.to(self.device).eval()
        if compile:
            self.model = torch.compile(self.model)
        self.normalization = trained_on.normalization
        self.n_input_frames = trained_on.frames.n_input
        self.timestep_minutes = trained_on.frames.timestep
        self.name = name
        reference_frame = trained_on.reference_frame
        if reference_frame not in ("eulerian", "lagrangian"):
            raise ValueError(
                f"unknown reference frame {reference_frame!r}; expected 'eulerian' or 'lagrangian'"
            )
        self.reference_frame = reference_frame
        self.motion_node_spacing = int(trained_on.motion_node_spacing)
        # The registry's METHOD_NEEDS: a Lagrangian-frame model advects along the LK motion.
        self.uses_motion = reference_frame == "lagrangian"

    def predict_values(
        self, rain_rate: np.ndarray, velocity: np.ndarray | None = None
    ) -> np.ndarray:
        """Run the model on rain-rate frames.

        Parameters
        ----------
        rain_rate : numpy.ndarray
            Input rain rate (n_input_frames, y, x) in mm/h, NaN for no data.
        velocity : numpy.ndarray, optional
            LK motion (2, y, x) of these inputs for a Lagrangian model, when the caller already
            has it (evaluation shares one field with extrapolation and S-PROG).

        Returns
        -------
        numpy.ndarray
            float32 rain rate (n_target_frames, y, x), >= 0 everywhere (no mask applied).
        """
        rain_rate = np.clip(np.asarray(rain_rate, dtype=np.float32), 0.0, None)
        if self.reference_frame == "lagrangian":
            # One set of trajectories moves the inputs in and the outputs out
            # (nowcast.advection.warp).
            n_steps = max(rain_rate.shape[0] - 1, self.n_target_frames or 1)
            lagrangian = LagrangianFrame.of_inputs(
                rain_rate, self.motion_node_spacing, n_steps, velocity=velocity, device=self.device
            )
            rain_rate = lagrangian.inputs_to_lagrangian(rain_rate)
        normalized = self.normalization.forward(rain_rate)
        normalized = np.where(np.isfinite(normalized), normalized, 0.0).astype(np.float32)
        frames = torch.from_numpy(normalized)[None, :, None].to(self.device)
        # inference_mode rather than no_grad: no autograd bookkeeping on the tensors at all.
        with torch.inference_mode():
            prediction = self.model(frames)[0, :, 0].float()
            rain = self.normalization.inverse(prediction)
            rain = torch.clamp(rain, min=0.0)
            if self.reference_frame == "lagrangian":
                rain = lagrangian.outputs_from_lagrangian(rain)
            else:
                rain = rain.cpu().numpy()
        rain = np.asarray(rain, dtype=np.float32)
        if self.calibration:
            rain = apply_calibration(rain, self.calibration)
        return rain

    def __call__(
        self,
        inputs: xr.DataArray,
        n_leadtimes: int,
        timestep_minutes: float | None = None,
        velocity: np.ndarray | None = None,
    ) -> xr.DataArray:
        """Forecast from the last ``n_input_frames`` frames of ``inputs``.

        Parameters
        ----------
        inputs : xarray.DataArray
            Rain rate (time, y, x) in mm/h with a ``time`` coordinate and a CRS, at least
            ``n_input_frames`` frames at the model's timestep, or ``(n_input_frames - 1) * k +
            1`` frames at a step k times shorter (every k-th is used, counted back from the
            last; the forecast's lead times are then at the model's step).
        n_leadtimes : int
            Number of lead times, at most the model's ``n_target_frames``.
        timestep_minutes : float, optional
            The input frames' spacing when there is one frame; checked otherwise. Lead times
            are at the model's timestep.
        velocity : numpy.ndarray, optional
            Precomputed motion of the inputs (see :meth:`predict_values`).

        Returns
        -------
        xarray.DataArray
            Forecast (lead_time, y, x) in mm/h.
        """
        check_inputs(inputs, n_leadtimes, self.n_input_frames)
        if timestep_minutes is None and inputs.sizes["time"] == 1:
            timestep_minutes = self.timestep_minutes
        step = input_timestep(inputs, timestep_minutes)
        if self.timestep_minutes is not None:
            inputs = self._at_model_step(inputs, step)
            if not np.isclose(step, self.timestep_minutes):
                # The caller's motion field was of the native frames: recompute it.
                velocity = None
            step = float(self.timestep_minutes)
        if self.n_target_frames is not None and n_leadtimes > self.n_target_frames:
            raise ValueError(
                f"the model predicts {self.n_target_frames} lead times, {n_leadtimes} asked for"
            )
        rain_rate = inputs.values[-self.n_input_frames :]
        values = self.predict_values(rain_rate, velocity)[: int(n_leadtimes)]
        forecast = to_forecast(values, inputs, step, self.name)
        if self.checkpoint is not None:
            # Which weights made it: a calibration file is checked against this checkpoint.
            forecast.attrs["model_checkpoint"] = self.checkpoint
        return forecast

    def _at_model_step(self, inputs: xr.DataArray, step: float) -> xr.DataArray:
        """Inputs at the model's timestep by :func:`nowcast.windows.frames_per_model_step`'s rule.

        Frames ``step`` minutes apart are read every k-th, counted back from the last one (the
        reference time), when the model's step is k times theirs; otherwise a one-line
        ConfigError names both steps.
        """
        source = inputs.attrs.get("radar_source") or "the inputs"
        k = frames_per_model_step(self.timestep_minutes, step, source)
        if k == 1:
            return inputs
        try:
            kept = counted_back(inputs.sizes["time"], self.n_input_frames, k)
        except ValueError as err:
            raise ValueError(
                f"{source}: {err} at the model's {float(self.timestep_minutes):g}-minute step"
            ) from None
        LOGGER.info(frame_step_note(source, step, self.timestep_minutes))
        return inputs.isel(time=kept)
