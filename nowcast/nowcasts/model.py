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

from nowcast import transforms
from nowcast.checkpoint import load_model
from nowcast.devices import resolve_device
from nowcast.lagrangian import DEFAULT_MOTION_STRIDE, LagrangianFrame
from nowcast.nowcasts.isotonic import apply_calibration
from nowcast.nowcasts.utils import check_inputs, input_timestep, to_forecast
from nowcast.windows import counted_back, frame_stride, stride_note

LOGGER = logging.getLogger(__name__)


class ModelNowcast:
    """Forecast method wrapping a model; build it once, call it for every forecast.

    Parameters
    ----------
    checkpoint : str or path-like, optional
        Checkpoint written by ``nowcast train`` (loaded once, with ``weights_only=True``).
    model : torch.nn.Module, optional
        An in-memory model instead of a checkpoint; then ``normalization``,
        ``n_input_frames`` and ``timestep_minutes`` must be given.
    normalization : dict, optional
        ``{"method": name, "params": {...}}`` as the patch store records it.
    calibrated : bool, optional
        Apply the isotonic calibration that checkpoints written before calibration files
        stored in themselves (deprecated, with a warning), by default True. New calibrations
        are files (:mod:`nowcast.calibration`) applied by a forecast-method variant.
    frame : {"eulerian", "lagrangian"}, optional
        For an in-memory model: whether it works in the Lagrangian frame of its inputs (from a
        checkpoint this is read from the checkpoint).
    motion_stride : int, optional
        For an in-memory Lagrangian model: pixels between the nodes of the coarse motion grid
        it was trained with (from a checkpoint: its ``motion_stride``, else
        :data:`nowcast.lagrangian.DEFAULT_MOTION_STRIDE`).
    n_input_frames : int, optional
        Input frames the model reads.
    timestep_minutes : float, optional
        Timestep the model was trained on. Inputs at a step k times shorter are read every k-th
        frame counted back from the last (:func:`nowcast.windows.frame_stride`); any other
        spacing is refused.
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
        normalization: dict | None = None,
        n_input_frames: int | None = None,
        timestep_minutes: float | None = None,
        device: str | torch.device | None = None,
        name: str = "model",
        frame: str = "eulerian",
        motion_stride: int = DEFAULT_MOTION_STRIDE,
        calibrated: bool = True,
        compile: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        if (checkpoint is None) == (model is None):
            raise ValueError("give either a checkpoint path or an in-memory model")
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        if checkpoint is not None:
            model, meta = load_model(checkpoint, self.device)
            normalization = meta["normalization"]
            n_input_frames = meta["n_input_frames"]
            timestep_minutes = meta["timestep_minutes"]
            frame = meta.get("frame", "eulerian")
            motion_stride = meta.get("motion_stride") or motion_stride
            self.calibration = meta.get("calibration") if calibrated else None
            if self.calibration:
                warnings.warn(
                    f"{checkpoint}: applying the isotonic calibration stored in the checkpoint "
                    "(deprecated: `nowcast calibrate` writes a separate calibration file, "
                    "named by a forecast method's `postprocess: {method: isotonic, file: ...}`)",
                    DeprecationWarning,
                    stacklevel=2,
                )
            self.n_target_frames = int(meta["n_target_frames"])
            self.model_name = meta["model_name"]
        else:
            self.calibration = None
            if normalization is None or n_input_frames is None:
                raise ValueError("an in-memory model needs normalization and n_input_frames")
            self.n_target_frames = getattr(model, "n_target_frames", None)
            self.model_name = type(model).__name__
        self.model = model.to(self.device).eval()
        if compile:
            self.model = torch.compile(self.model)
        self.normalization = dict(normalization)
        self.transform = transforms.get_method(self.normalization["method"])
        self.n_input_frames = int(n_input_frames)
        self.timestep_minutes = timestep_minutes
        self.name = name
        if frame not in ("eulerian", "lagrangian"):
            raise ValueError(f"unknown frame {frame!r}; expected 'eulerian' or 'lagrangian'")
        self.frame = frame
        self.motion_stride = int(motion_stride)
        # The registry's METHOD_NEEDS: a Lagrangian-frame model advects along the LK motion.
        self.uses_motion = frame == "lagrangian"

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
        params = self.normalization["params"]
        rain_rate = np.clip(np.asarray(rain_rate, dtype=np.float32), 0.0, None)
        if self.frame == "lagrangian":
            # One set of trajectories moves the inputs in and the outputs out (nowcast.warp).
            n_steps = max(rain_rate.shape[0] - 1, self.n_target_frames or 1)
            lagrangian = LagrangianFrame.of_inputs(
                rain_rate, self.motion_stride, n_steps, velocity=velocity, device=self.device
            )
            rain_rate = lagrangian.inputs_to_lagrangian(rain_rate)
        normalized = self.transform.forward(rain_rate, params)
        normalized = np.where(np.isfinite(normalized), normalized, 0.0).astype(np.float32)
        frames = torch.from_numpy(normalized)[None, :, None].to(self.device)
        # inference_mode rather than no_grad: no autograd bookkeeping on the tensors at all.
        with torch.inference_mode():
            prediction = self.model(frames)[0, :, 0].float()
            rain = self.transform.inverse(prediction, params)
            rain = torch.clamp(rain, min=0.0)
            if self.frame == "lagrangian":
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
        """Inputs at the model's timestep by :func:`nowcast.windows.frame_stride`'s rule.

        Frames ``step`` minutes apart are read every k-th, counted back from the last one (the
        reference time), when the model's step is k times theirs; otherwise a one-line
        ConfigError names both steps.
        """
        source = inputs.attrs.get("radar_source") or "the inputs"
        k = frame_stride(self.timestep_minutes, step, source)
        if k == 1:
            return inputs
        try:
            kept = counted_back(inputs.sizes["time"], self.n_input_frames, k)
        except ValueError as err:
            raise ValueError(
                f"{source}: {err} at the model's {float(self.timestep_minutes):g}-minute step"
            ) from None
        LOGGER.info(stride_note(source, step, self.timestep_minutes))
        return inputs.isel(time=kept)
