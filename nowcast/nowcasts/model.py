"""A trained network as a forecast method: normalize, run on the whole grid, transform back.

The models are fully convolutional (see :mod:`nowcast.models`), so the full radar domain is
predicted in one pass whatever the patch size they were trained on. Inputs are normalized with
the parameters the patch store fitted (recorded in the checkpoint), no-data becomes 0 exactly as
in the patch store, and the output is transformed back to mm/h, clipped at 0, with the last input
frame's no-data area set to NaN.

A stochastic model's checkpoint (``stochastic_convlstm``) gives an ensemble (realization,
lead_time, y, x). The work of a window is shared by its members: the motion, the transport of
the inputs into the Lagrangian frame and the encoder run once; the forecaster then draws the
members in member batches, and each member is moved out of the Lagrangian frame as it comes, so
memory holds the output ensemble plus one member batch of network state. The members' noise
comes from a CPU ``torch.Generator`` seeded with :func:`nowcast.nowcasts.seeds.window_seed`:
the same noise on any device and whatever the member batch, so a rerun gives the same members
(another member batch changes them only by the float rounding of oneDNN's convolutions, which
depends on the batch size). In a Lagrangian frame each member
also moves along its own perturbed motion, as STEPS' members do: pysteps' ``bps`` perturbation
(:func:`nowcast.advection.lagrangian.bps_perturbation`) of the coarse motion, drawn from the
member's own generator (``numpy.random.SeedSequence(window_seed).spawn``, one child per member),
added at every step of the transport of that member's outputs (the inputs move along the
unperturbed motion), so members differ in position as well as intensity.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
import xarray as xr
from torch import nn

from nowcast.advection.lagrangian import LagrangianFrame, bps_perturbation
from nowcast.config import ConfigError
from nowcast.nowcasts.forecast import make_ensemble_forecast
from nowcast.nowcasts.inputs import (
    check_inputs,
    input_pixel_size_km,
    input_timestep,
    no_data_mask,
    reference_time,
    to_forecast,
)
from nowcast.nowcasts.isotonic import apply_calibration
from nowcast.nowcasts.masking import apply_incremental_mask, mask_radius
from nowcast.nowcasts.matching import MATCHING_SETTINGS, probability_match
from nowcast.nowcasts.seeds import window_seed
from nowcast.training.checkpoint import TrainedOn, load_model
from nowcast.training.device import resolve_device
from nowcast.windows import counted_back, frame_step_note, frames_per_model_step

LOGGER = logging.getLogger(__name__)

#: Defaults of a stochastic model's ensemble: members, members per forecaster batch, run seed.
N_MEMBERS = 20
MEMBER_BATCH = 4
SEED = 0
#: What :meth:`ModelNowcast.ensemble_bytes` allows for torch's and oneDNN's own workspaces and
#: thread pools (about 70 MiB with one member on a 512 x 512 grid).
WORKSPACE_BYTES = 128 * 2**20


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
    n_members, member_batch, seed : int, optional
        For a stochastic model: members of each forecast (default 20), members drawn per
        forecaster batch (default 4; memory grows with it) and the run's seed (default 0), which
        with the radar source and reference time seeds each window
        (:func:`~nowcast.nowcasts.seeds.window_seed`). A call may override them.
    mask_method : {"incremental", None}, optional
        For a stochastic model: STEPS' incremental mask on each member
        (:mod:`nowcast.nowcasts.masking`), by default ``"incremental"`` as in pysteps' STEPS;
        None lets the members rain anywhere.
    probability_matching : {"auto", "none", "cdf", "mean"}, optional
        Match each lead (a stochastic model's members pooled) to the last observed frame's
        distribution (:func:`nowcast.nowcasts.matching.probability_match`, as STEPS'
        ``probmatching_method``). ``"auto"`` (the default) matches with the checkpoint's
        ``unseen_radar_matching`` (chosen by ``make skill`` on held-out radars) when the inputs'
        ``radar_source`` is none of the checkpoint's training sources, and not on the training
        radar, where the model (and a noise gain) was chosen on validation windows; ``"none"``
        never matches.

    Attributes
    ----------
    stochastic : bool
        Whether the model forecasts an ensemble (a stochastic model's checkpoint).

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
        n_members: int = N_MEMBERS,
        member_batch: int = MEMBER_BATCH,
        seed: int = SEED,
        mask_method: str | None = "incremental",
        probability_matching: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.probability_matching = _matching_setting(probability_matching)
        if mask_method not in ("incremental", None):
            raise ValueError(f"mask_method must be 'incremental' or None, got {mask_method!r}")
        self.mask_method = mask_method
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
            self.unseen_radar_matching = meta.get("unseen_radar_matching")
        else:
            self.unseen_radar_matching = None
            self.calibration = None
            if trained_on is None:
                raise ValueError("an in-memory model needs trained_on")
            self.n_target_frames = getattr(model, "n_target_frames", None)
            self.model_name = type(model).__name__
        self.model = model.to(self.device).eval()
        # The uncompiled module: a stochastic model's encode/decode are called directly.
        self.network = self.model
        self.stochastic = bool(getattr(model, "stochastic", False))
        self.n_members, self.member_batch = _members(n_members, member_batch)
        self.seed = int(seed)
        if compile:
            self.model = torch.compile(self.model)
        self.normalization = trained_on.normalization
        self.training_sources = frozenset(trained_on.pixel_size_m)
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
        if self.stochastic:
            raise ValueError("a stochastic model forecasts members: call predict_members")
        lagrangian, frames = self._network_input(rain_rate, velocity)
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

    def _network_input(
        self, rain_rate: np.ndarray, velocity: np.ndarray | None
    ) -> tuple[LagrangianFrame | None, torch.Tensor]:
        """The window's Lagrangian frame (None in the Eulerian frame) and the network's input
        (1, n_input_frames, 1, y, x), normalized with no data as 0."""
        rain_rate = np.clip(np.asarray(rain_rate, dtype=np.float32), 0.0, None)
        lagrangian = None
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
        return lagrangian, torch.from_numpy(normalized)[None, :, None].to(self.device)

    def predict_members(
        self,
        rain_rate: np.ndarray,
        n_members: int,
        velocity: np.ndarray | None = None,
        member_batch: int | None = None,
        seed: int = 0,
        n_leadtimes: int | None = None,
        pixel_size_km: float = 1.0,
        noise_gain: float | None = None,
    ) -> np.ndarray:
        """Run a stochastic model: ``n_members`` members drawn in member batches.

        Parameters
        ----------
        rain_rate : numpy.ndarray
            Input rain rate (n_input_frames, y, x) in mm/h, NaN for no data.
        n_members : int
            Members, >= 1.
        velocity : numpy.ndarray, optional
            LK motion (2, y, x) of these inputs, when the caller already has it.
        member_batch : int, optional
            Members per forecaster batch, by default the method's.
        seed : int, optional
            The window's seed (:func:`~nowcast.nowcasts.seeds.window_seed`): it seeds the
            members' noise and their motion perturbations.
        n_leadtimes : int, optional
            Lead times kept, by default all the model predicts.
        pixel_size_km : float, optional
            Pixel size, for the motion perturbations (pixels per timestep to km/h) and the
            incremental mask.
        noise_gain : float, optional
            Factor on the members' noise, by default the checkpoint's ``noise_gain``.

        Returns
        -------
        numpy.ndarray
            float32 rain rate (n_members, n_leadtimes, y, x), >= 0 (no mask applied).
        """
        n_members, member_batch = _members(n_members, member_batch or self.member_batch)
        lagrangian, frames = self._network_input(rain_rate, velocity)
        n_lead = min(int(n_leadtimes or self.n_target_frames), self.n_target_frames)
        perturbations = [None] * n_members
        if lagrangian is not None:
            coarse = lagrangian.coarse_motion
            perturbations = [
                bps_perturbation(coarse, pixel_size_km, self.timestep_minutes, rng)
                for rng in _member_generators(seed, n_members)
            ]
        # The mask follows each member in the network's frame, from the last input (the
        # reference time, where the Lagrangian frame coincides with the Eulerian one).
        last_observed = np.asarray(rain_rate[-1], dtype=np.float32)
        radius = mask_radius(self.timestep_minutes, pixel_size_km)
        # The noise is drawn on the CPU, so a seed gives the same members on any device.
        generator = torch.Generator().manual_seed(int(seed))
        values = np.empty((n_members, n_lead, *frames.shape[-2:]), dtype=np.float32)
        with torch.inference_mode():
            encoded = self.network.encode(frames)
            for first in range(0, n_members, member_batch):
                count = min(member_batch, n_members - first)
                batch = self.network.decode(encoded, count, generator, noise_gain)
                batch = batch[0, :, :n_lead, 0]
                rain = torch.clamp(self.normalization.inverse(batch.float()), min=0.0)
                del batch
                for k in range(count):
                    member = first + k
                    field = rain[k].cpu().numpy()
                    if self.mask_method == "incremental":
                        apply_incremental_mask(field, last_observed, radius)
                    if lagrangian is None:
                        values[member] = field
                    else:
                        values[member] = lagrangian.outputs_from_lagrangian(
                            field, perturbations[member]
                        )
                    if self.calibration:
                        values[member] = apply_calibration(values[member], self.calibration)
                del rain
        return values

    def ensemble_bytes(
        self, n_members: int, n_leadtimes: int, shape, member_batch: int | None = None
    ) -> int:
        """Estimated peak memory of :meth:`predict_members` on a (ny, nx) grid, in bytes.

        The output ensemble (float32) plus one member batch of the forecaster: per member its
        hidden and cell states, gates and features (all layers taken at the patch resolution,
        an upper bound with ``downsample``) and noise, and the full-resolution outputs in their
        few transient copies; plus the encoder's states and the window's and one member's
        trajectories (float32, two components per pixel and step), and
        :data:`WORKSPACE_BYTES`. An upper bound meant to check that a request can fit (it
        exceeds the measured peak by 10-40 % on 512 x 512 and 1024 x 1024 grids).
        """
        n_members, member_batch = _members(n_members, member_batch or self.member_batch)
        ny, nx = (int(n) for n in shape)
        pixels = ny * nx
        output = n_members * int(n_leadtimes) * pixels * 4
        network = self.network
        multiple = int(getattr(network, "spatial_multiple", 1))
        factor = int(getattr(network, "patch_factor", 1))
        cells = -(-ny // multiple) * multiple * (-(-nx // multiple) * multiple) // factor**2
        hidden = sum(getattr(network, "hidden_channels", (0,)))
        noise = int(getattr(network, "noise_channels", 0))
        n_target = int(self.n_target_frames or n_leadtimes)
        per_member = cells * 4 * (7 * hidden + noise) + 4 * n_target * pixels * 4
        encoder = cells * 4 * (2 * hidden + self.n_input_frames * factor**2)
        n_steps = max(self.n_input_frames - 1, n_target)
        transport = (n_steps + int(n_leadtimes) + 1) * pixels * 2 * 4
        return output + member_batch * per_member + encoder + transport + WORKSPACE_BYTES

    def __call__(
        self,
        inputs: xr.DataArray,
        n_leadtimes: int,
        timestep_minutes: float | None = None,
        velocity: np.ndarray | None = None,
        n_members: int | None = None,
        member_batch: int | None = None,
        seed: int | None = None,
        noise_gain: float | None = None,
        probability_matching: str | None = None,
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
        n_members, member_batch, seed : int, optional
            A stochastic model's members, member batch and run seed, by default the method's;
            the window's seed is ``window_seed(seed, inputs.attrs["radar_source"], last input
            time)``. A deterministic model takes none but ``n_members=1``.
        noise_gain : float, optional
            A stochastic model's factor on its noise, by default the checkpoint's.
        probability_matching : {"auto", "none", "cdf", "mean"}, optional
            The matching of the forecast (of a stochastic model's members), by default the
            method's; the forecast records the one applied in ``attrs["probability_matching"]``.

        Returns
        -------
        xarray.DataArray
            Forecast (lead_time, y, x) in mm/h; for a stochastic model members (realization,
            lead_time, y, x) with ``attrs["window_seed"]``.
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
        matching = self.matching_for(
            str(inputs.attrs.get("radar_source", "")),
            self.probability_matching
            if probability_matching is None
            else _matching_setting(probability_matching),
        )
        if self.stochastic:
            forecast = self._ensemble(
                inputs,
                rain_rate,
                int(n_leadtimes),
                step,
                velocity,
                n_members=self.n_members if n_members is None else n_members,
                member_batch=member_batch,
                seed=self.seed if seed is None else seed,
                noise_gain=noise_gain,
                matching=matching,
            )
        else:
            if n_members not in (None, 1):
                raise ValueError(
                    f"{self.checkpoint or self.model_name}: a deterministic model forecasts one "
                    f"member, {n_members} asked for"
                )
            values = self.predict_values(rain_rate, velocity)[: int(n_leadtimes)]
            forecast = to_forecast(values, inputs, step, self.name)
            if matching is not None:
                last = np.asarray(inputs.values[-1], dtype=np.float32)
                forecast.values[:] = probability_match(forecast.values, last, matching)
            forecast.attrs["probability_matching"] = matching or "none"
        if self.checkpoint is not None:
            # Which weights made it: a calibration file is checked against this checkpoint.
            forecast.attrs["model_checkpoint"] = self.checkpoint
        return forecast

    def _ensemble(
        self,
        inputs: xr.DataArray,
        rain_rate: np.ndarray,
        n_leadtimes: int,
        step: float,
        velocity: np.ndarray | None,
        *,
        n_members: int,
        member_batch: int | None,
        seed: int,
        noise_gain: float | None,
        matching: str | None = None,
    ) -> xr.DataArray:
        """A stochastic model's members in the ensemble Forecast layout."""
        source = str(inputs.attrs.get("radar_source", ""))
        reference = reference_time(inputs)
        seed = window_seed(seed, source, reference)
        values = self.predict_members(
            rain_rate,
            n_members,
            velocity,
            member_batch,
            seed,
            n_leadtimes,
            input_pixel_size_km(inputs),
            noise_gain,
        )
        # In place (to_ensemble_forecast would copy the whole ensemble).
        values[:, :, no_data_mask(inputs)] = np.nan
        if matching is not None:
            # One lead at a time, its members pooled: a copy of one lead, not of the ensemble.
            last = np.asarray(inputs.values[-1], dtype=np.float32)
            for lead in range(values.shape[1]):
                values[:, lead] = probability_match(values[None, :, lead], last, matching)[0]
        forecast = make_ensemble_forecast(values, reference, step, inputs, method=self.name)
        forecast.attrs["window_seed"] = seed
        forecast.attrs["noise_gain"] = float(
            self.network.noise_gain if noise_gain is None else noise_gain
        )
        forecast.attrs["probability_matching"] = matching or "none"
        return forecast

    def matching_for(self, source: str, setting: str) -> str | None:
        """The forecast's matching on ``source`` under ``setting`` (see the class), or None."""
        if setting == "auto":
            unseen = bool(self.training_sources) and source not in self.training_sources
            return self.unseen_radar_matching if unseen else None
        return None if setting == "none" else setting

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


class EnsembleNowcast(ModelNowcast):
    """The learned ensemble: :class:`ModelNowcast` of a stochastic model's checkpoint only.

    Registered as the forecast method ``ensemble``; it takes the arguments of
    :class:`ModelNowcast` (``name`` defaults to ``"ensemble"``).

    Raises
    ------
    ConfigError
        If the checkpoint's model is deterministic (one line naming it).
    """

    def __init__(self, checkpoint=None, *, name: str = "ensemble", **kwargs) -> None:
        super().__init__(checkpoint, name=name, **kwargs)
        if not self.stochastic:
            raise ConfigError(
                f"{self.checkpoint or self.model_name}: model '{self.model_name}' is "
                "deterministic; the ensemble method needs a stochastic model's checkpoint "
                "(stochastic_convlstm, trained with loss: crps)"
            )


def _matching_setting(setting) -> str:
    """``probability_matching`` checked: "auto", "none" (also None), "cdf" or "mean"."""
    setting = "none" if setting is None else str(setting)
    if setting not in MATCHING_SETTINGS:
        raise ValueError(
            f"probability_matching must be one of {', '.join(MATCHING_SETTINGS)}, got {setting!r}"
        )
    return setting


def _members(n_members, member_batch) -> tuple[int, int]:
    """``n_members`` and ``member_batch`` as ints, each >= 1 (a ValueError names them)."""
    if int(n_members) < 1 or int(member_batch) < 1:
        raise ValueError(
            f"n_members and member_batch must be >= 1, got {n_members} and {member_batch}"
        )
    return int(n_members), min(int(member_batch), int(n_members))


def _member_generators(seed: int, n_members: int) -> list[np.random.Generator]:
    """One generator per member, member ``j``'s the same whatever ``n_members``.

    Children of ``SeedSequence(seed)``: a stream apart from the torch generator that the same
    seed starts (both would otherwise be Mersenne twisters seeded alike).
    """
    children = np.random.SeedSequence(int(seed)).spawn(int(n_members))
    return [np.random.default_rng(child) for child in children]
