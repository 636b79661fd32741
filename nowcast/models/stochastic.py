"""A stochastic ConvLSTM: the residual encoder-forecaster driven by a correlated noise field.

Each member of an ensemble is the forecast of one draw of a spatially correlated Gaussian noise
field, concatenated to the forecaster's input at every step. The input frames are encoded once
per sample; the members start from copies of the encoded states, so the encoder's work is
shared and only the forecaster runs once per member. With ``residual=True`` (the default) the
output layer starts at zero: before training every member is the last input frame (in a
Lagrangian frame, extrapolation) and the noise has no effect; training on an ensemble score
such as the fair CRPS (:func:`nowcast.training.losses.fair_crps`) teaches the network to turn
the noise into spread.

The noise of one member is one field per noise channel: white noise at the patch resolution
smoothed by a Gaussian of standard deviation ``noise_scale_pixels`` (input pixels), scaled back
to unit variance. With ``noise_memory=1`` (the default) it is the same field at every lead time,
so a member is one consistent scenario; below 1 it evolves as a first-order autoregression with
that correlation between consecutive steps, as STEPS evolves its cascade noise, so a
perturbation does not push the same place the same way for the whole hour. With
``noise_spectrum="frame"`` the white noise is filtered instead with the amplitude spectrum of the
sample's last input frame, as STEPS' nonparametric noise is (pysteps'
``initialize_nonparam_2d_fft_filter``): a smooth field gets smooth noise, a cellular one
small-scale noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nowcast import import_pysteps
from nowcast.models.convlstm import ConvLSTMCell, EncoderForecaster
from nowcast.models.registry import register

__all__ = ["Encoded", "StochasticEncoderForecaster", "correlated_noise", "frame_spectrum_noise"]

NOISE_SPECTRA = ("gaussian", "frame")


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1-D Gaussian over ``[-3 sigma, 3 sigma]`` with unit sum of squares (unit output variance)."""
    radius = math.ceil(3.0 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    # Separable smoothing by g (x) g of unit-variance white noise has variance (sum g^2)^2.
    kernel = kernel / kernel.square().sum().sqrt()
    return kernel.to(dtype=dtype, device=device)


def correlated_noise(
    n_members: int,
    batch: int,
    channels: int,
    height: int,
    width: int,
    sigma: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw stationary Gaussian noise fields of unit variance, smoothed over ``sigma`` cells.

    White noise is drawn on a grid wider by ``ceil(3 sigma)`` on every side and smoothed with a
    separable Gaussian of standard deviation ``sigma`` grid cells ("valid" convolution), so the
    field is stationary up to its edges. The draws go member by member, each of shape
    (batch, channels, ...): a given generator state gives the same members however they are
    then split into member batches.

    Parameters
    ----------
    n_members, batch, channels, height, width : int
        Shape of the draw.
    sigma : float
        Standard deviation of the Gaussian smoothing in grid cells: the fields' correlation at
        a lag of ``d`` cells is ``exp(-d**2 / (4 sigma**2))``; 0 gives white noise.
    generator : torch.Generator, optional
        Source of the draws, by default torch's global generator of ``device``. The fields are
        drawn on the generator's device and then moved to ``device``.
    device : torch.device or str, optional
        Device of the result, by default the generator's (the CPU without one).

    Returns
    -------
    torch.Tensor
        Float32 noise of shape (batch * n_members, channels, height, width), sample-major: row
        ``b * n_members + j`` is member ``j`` of sample ``b``.
    """
    radius = math.ceil(3.0 * sigma) if sigma > 0 else 0
    draw_device = generator.device if generator is not None else device
    shape = (batch, channels, height + 2 * radius, width + 2 * radius)
    draws = [torch.randn(shape, generator=generator, device=draw_device) for _ in range(n_members)]
    white = torch.stack(draws, dim=1).reshape(batch * n_members, *shape[1:])
    white = white.to(device) if device is not None else white
    if radius == 0:
        return white
    kernel = _gaussian_kernel(sigma, white.dtype, white.device)
    size = kernel.numel()
    rows = kernel.reshape(1, 1, size, 1).expand(channels, 1, size, 1)
    columns = kernel.reshape(1, 1, 1, size).expand(channels, 1, 1, size)
    smooth = F.conv2d(white, rows, groups=channels)
    return F.conv2d(smooth, columns, groups=channels)


def _frame_filters(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Amplitude filters (batch, y, x // 2 + 1) of unit mean square and no mean, one per frame.

    A frame with rain gets pysteps' nonparametric filter (its own tapered amplitude spectrum);
    a frame with nothing to copy (all dry, or no contrast left once pysteps removes the
    rain/no-rain step) gets the amplitude of :func:`correlated_noise`'s Gaussian smoothing,
    ``exp(-2 pi**2 sigma**2 k**2)``.
    """
    # Imported here: the model module (and a training process) needs pysteps only for this noise.
    fftgenerators = import_pysteps("pysteps.noise.fftgenerators")
    height, width = frames.shape[-2:]
    wavenumbers = np.hypot.outer(np.fft.fftfreq(height), np.fft.rfftfreq(width))
    gaussian = np.exp(-2.0 * (np.pi * sigma * wavenumbers) ** 2)
    gaussian[0, 0] = 0.0
    filters = []
    for frame in frames:
        amplitude = gaussian
        if np.ptp(frame) > 0:
            spectrum = fftgenerators.initialize_nonparam_2d_fft_filter(frame)["field"]
            spectrum[0, 0] = 0.0  # centred noise
            amplitude = spectrum if spectrum.any() else gaussian
        filters.append(amplitude / np.sqrt(np.mean(amplitude**2)))
    return np.stack(filters)


def frame_spectrum_noise(
    white: torch.Tensor, frames: torch.Tensor, n_members: int, sigma: float
) -> torch.Tensor:
    """Filter white noise with the amplitude spectrum of each sample's frame.

    pysteps' ``generate_noise_2d_fft_filter`` does this filtering with numpy's random state; it
    is written out here so that the noise comes from the caller's torch generator (the members
    must not depend on the member batches, and training checkpoints record that generator) and
    stays on the model's device.

    Parameters
    ----------
    white : torch.Tensor
        Unit white noise (batch * n_members, channels, y, x), sample-major.
    frames : torch.Tensor
        One 2-D frame per sample (batch, y, x) on the noise's grid.
    n_members : int
        Members per sample.
    sigma : float
        Gaussian smoothing (grid cells) for samples whose frame has no contrast.

    Returns
    -------
    torch.Tensor
        Noise of the shape of ``white``, each field of zero mean and unit variance.
    """
    filters = _frame_filters(frames.detach().double().cpu().numpy(), sigma)
    filters = torch.from_numpy(filters).to(white.device, torch.float32)
    filters = filters.repeat_interleave(n_members, dim=0)[:, None]
    spectrum = torch.fft.rfft2(white.float()) * filters
    noise = torch.fft.irfft2(spectrum, s=white.shape[-2:])  # zero mean: the filters have none
    return (noise / noise.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)).to(white.dtype)


@dataclasses.dataclass
class Encoded:
    """The encoder's summary of a batch of input windows, shared by all members.

    Attributes
    ----------
    states : list of torch.Tensor
        The encoder's last ``(h, c)`` of every layer, each (batch, hidden, y, x).
    last_patches : torch.Tensor
        The last input frame as patches (batch, channels * patch_factor**2, y, x), padded.
    last_frame : torch.Tensor
        The last input frame (batch, channels, height, width), the residual's baseline.
    """

    states: list[torch.Tensor]
    last_patches: torch.Tensor
    last_frame: torch.Tensor

    @property
    def batch(self) -> int:
        """Number of samples."""
        return self.last_frame.shape[0]


@register("stochastic_convlstm")
class StochasticEncoderForecaster(EncoderForecaster):
    """Residual ConvLSTM encoder-forecaster whose members are driven by correlated noise.

    The constructor takes the arguments of :class:`~nowcast.models.convlstm.EncoderForecaster`
    (``residual`` defaults to True here) plus the noise's. The forecaster's full-resolution
    first layer (the bottom one with ``downsample``) reads ``noise_channels`` more channels:
    the member's noise field, after the previous prediction when
    ``forecaster_input="prediction"``.

    Members of one sample share the encoder: :meth:`encode` runs once per batch and
    :meth:`decode` repeats its states for each member. Training with ``m`` members per sample
    runs the forecaster on ``batch_size * m`` sequences: its activation memory and time scale
    with that product, the encoder's with ``batch_size`` only.

    Parameters
    ----------
    n_input_frames, n_target_frames : int
        Past frames read and future frames predicted.
    in_channels : int, optional
        Channels per frame, by default 1.
    noise_channels : int, optional
        Channels of each member's noise field, by default 4.
    noise_scale_pixels : float, optional
        Standard deviation of the noise's Gaussian smoothing in input pixels, by default 32 (the
        correlation at a lag of ``d`` pixels is ``exp(-d**2 / (4 s**2))``); the noise lives at
        the patch resolution, and 0 gives white noise there.
    noise_memory : float, optional
        Correlation of a member's noise between consecutive forecaster steps, in [0, 1], by
        default 1 (one field for every step): ``z_t = rho z_{t-1} + sqrt(1 - rho**2) e_t``
        with independent fields ``e_t``, so every step's field keeps unit variance.
    noise_spectrum : {"gaussian", "frame"}, optional
        Spectrum of the noise, by default "gaussian" (white noise smoothed over
        ``noise_scale_pixels``); "frame" gives each sample's members the amplitude spectrum of
        its last input frame on the noise's grid (pysteps' nonparametric filter), and the
        Gaussian one where that frame has no contrast.
    noise_gain : float, optional
        Factor on the noise in eval mode, by default 1 (in training mode the noise keeps unit
        variance whatever this is): the spread-calibration knob, chosen on validation
        windows after training (a shipped checkpoint records its value).
    residual : bool, optional
        Predict a correction of the last input frame, with the output layer starting at zero,
        by default True.
    **kwargs
        The other :class:`~nowcast.models.convlstm.EncoderForecaster` arguments
        (``patch_factor``, ``hidden_channels``, ``kernel_sizes``, ``downsample``, ``peephole``,
        ``norm``, ``gradient_checkpointing``, ``forecaster_input``, ``forget_bias``,
        ``pad_mode``).

    Attributes
    ----------
    stochastic : bool
        True: ``forward`` takes ``n_members`` and returns a member axis.
    """

    stochastic = True

    def __init__(
        self,
        n_input_frames: int,
        n_target_frames: int,
        in_channels: int = 1,
        noise_channels: int = 4,
        noise_scale_pixels: float = 32.0,
        noise_gain: float = 1.0,
        noise_memory: float = 1.0,
        noise_spectrum: str = "gaussian",
        residual: bool = True,
        patch_factor: int = 4,
        hidden_channels: Sequence[int] = (64, 64),
        kernel_sizes: int | Sequence[int] = (3, 3),
        peephole: bool = True,
        norm: str | None = None,
        forget_bias: float = 1.0,
        **kwargs: object,
    ) -> None:
        if noise_channels < 1:
            raise ValueError(f"noise_channels must be >= 1, got {noise_channels}")
        if not noise_scale_pixels >= 0:
            raise ValueError(f"noise_scale_pixels must be >= 0, got {noise_scale_pixels}")
        if not noise_gain >= 0:
            raise ValueError(f"noise_gain must be >= 0, got {noise_gain}")
        if not 0 <= noise_memory <= 1:
            raise ValueError(f"noise_memory must be in [0, 1], got {noise_memory}")
        if noise_spectrum not in NOISE_SPECTRA:
            raise ValueError(
                f"noise_spectrum must be one of {NOISE_SPECTRA}, got {noise_spectrum!r}"
            )
        super().__init__(
            n_input_frames,
            n_target_frames,
            in_channels,
            patch_factor=patch_factor,
            hidden_channels=hidden_channels,
            kernel_sizes=kernel_sizes,
            peephole=peephole,
            norm=norm,
            forget_bias=forget_bias,
            residual=residual,
            **kwargs,
        )
        self.noise_channels = noise_channels
        self.noise_scale_pixels = float(noise_scale_pixels)
        self.noise_gain = float(noise_gain)
        self.noise_memory = float(noise_memory)
        self.noise_spectrum = noise_spectrum
        first = self.forecaster[0]
        self.forecaster[0] = ConvLSTMCell(
            first.in_channels + noise_channels,
            first.hidden_channels,
            first.kernel_size,
            peephole=peephole,
            norm=norm,
            forget_bias=forget_bias,
        )

    def encode(self, frames: torch.Tensor) -> Encoded:
        """Run the encoder over the input frames, once per sample.

        Parameters
        ----------
        frames : torch.Tensor
            Input of shape (batch, n_input_frames, in_channels, height, width).

        Returns
        -------
        Encoded
            The states and last frame the members start from.
        """
        patches, states = self._encode(frames)
        return Encoded(list(states), patches[:, -1], frames[:, -1])

    def _member_noise(
        self,
        encoded: Encoded,
        n_members: int,
        generator: torch.Generator | None,
        gain: float,
    ) -> list[torch.Tensor]:
        """The noise of every forecaster step, each (batch * n_members, noise_channels, y, x).

        All steps' fields of a member are drawn in one call of :func:`correlated_noise`, member
        by member, so the members do not depend on how they are split into member batches.
        """
        patch_height, patch_width = encoded.last_patches.shape[-2:]
        steps = 1 if self.noise_memory == 1 else self.n_target_frames
        sigma = self.noise_scale_pixels / self.patch_factor
        by_frame = self.noise_spectrum == "frame"
        fields = correlated_noise(
            n_members,
            encoded.batch,
            self.noise_channels * steps,
            patch_height,
            patch_width,
            0.0 if by_frame else sigma,
            generator,
            encoded.last_patches.device,
        )
        if by_frame:
            # The last frame's mean over each patch: the frame on the noise's grid.
            patch_means = encoded.last_patches.mean(dim=1)
            fields = frame_spectrum_noise(fields, patch_means, n_members, sigma)
        fields = fields.to(encoded.last_patches.dtype) * gain
        fields = fields.reshape(fields.shape[0], steps, self.noise_channels, *fields.shape[-2:])
        if steps == 1:
            return [fields[:, 0]] * self.n_target_frames
        rho = self.noise_memory
        innovation = math.sqrt(1.0 - rho * rho)
        noise = [fields[:, 0]]
        for step in range(1, steps):
            noise.append(rho * noise[-1] + innovation * fields[:, step])
        return noise

    def decode(
        self,
        encoded: Encoded,
        n_members: int,
        generator: torch.Generator | None = None,
        noise_gain: float | None = None,
    ) -> torch.Tensor:
        """Forecast ``n_members`` members of every sample from the shared encoder states.

        Parameters
        ----------
        encoded : Encoded
            What :meth:`encode` returned.
        n_members : int
            Members to draw (one forecaster batch of ``batch * n_members`` sequences).
        generator : torch.Generator, optional
            Source of the noise, by default torch's global generator (on the model's device),
            whose state a training checkpoint records.
        noise_gain : float, optional
            Factor on the noise, by default the model's ``noise_gain`` in eval mode and 1 in
            training mode.

        Returns
        -------
        torch.Tensor
            Members of shape (batch, n_members, n_target_frames, in_channels, height, width).
        """
        if noise_gain is None:
            noise_gain = 1.0 if self.training else self.noise_gain
        gain = float(noise_gain)
        batch = encoded.batch
        _, channels, height, width = encoded.last_frame.shape
        states = [state.repeat_interleave(n_members, dim=0) for state in encoded.states]
        noise = self._member_noise(encoded, n_members, generator, gain)
        previous = None
        if self.forecaster_input == "prediction":
            previous = encoded.last_patches.repeat_interleave(n_members, dim=0)
        predictions = []
        for step_noise in noise:
            step_input = (
                step_noise if previous is None else torch.cat([previous, step_noise], dim=1)
            )
            prediction, *states = self._run_step(self._forecaster_step, step_input, *states)
            predictions.append(prediction)
            if previous is not None:
                previous = prediction
        predicted = torch.stack(predictions, dim=1)
        predicted = F.pixel_shuffle(
            predicted.reshape(batch * n_members * self.n_target_frames, *predicted.shape[2:]),
            self.patch_factor,
        )
        predicted = predicted[..., :height, :width].reshape(
            batch, n_members, self.n_target_frames, channels, height, width
        )
        if self.residual:
            predicted = predicted + encoded.last_frame[:, None, None]
        return predicted

    def iter_members(
        self,
        frames: torch.Tensor,
        n_members: int,
        member_batch: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Encode once, then yield the members in batches of at most ``member_batch``.

        A caller that writes each batch out holds one member batch at a time. With a given
        generator state the members are the same whatever ``member_batch``.

        Parameters
        ----------
        frames : torch.Tensor
            Input of shape (batch, n_input_frames, in_channels, height, width).
        n_members : int
            Members to draw, >= 1.
        member_batch : int, optional
            Members per forecaster batch, by default all at once.
        generator : torch.Generator, optional
            Source of the noise, by default torch's global generator.

        Yields
        ------
        torch.Tensor
            Consecutive members, (batch, k, n_target_frames, in_channels, height, width).

        Raises
        ------
        ValueError
            If ``n_members`` or ``member_batch`` is below 1.
        """
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        member_batch = n_members if member_batch is None else member_batch
        if member_batch < 1:
            raise ValueError(f"member_batch must be >= 1, got {member_batch}")
        encoded = self.encode(frames)
        for first in range(0, n_members, member_batch):
            yield self.decode(encoded, min(member_batch, n_members - first), generator)

    def forecast_members(
        self,
        frames: torch.Tensor,
        n_members: int,
        member_batch: int = 4,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """All members, drawn in member batches of ``member_batch`` (see :meth:`iter_members`).

        Returns
        -------
        torch.Tensor
            Members (batch, n_members, n_target_frames, in_channels, height, width).
        """
        return torch.cat(list(self.iter_members(frames, n_members, member_batch, generator)), 1)

    def forward(
        self,
        frames: torch.Tensor,
        n_members: int = 1,
        generator: torch.Generator | None = None,
        member_batch: int | None = None,
    ) -> torch.Tensor:
        """Predict ``n_members`` members of the next ``n_target_frames`` frames.

        Parameters
        ----------
        frames : torch.Tensor
            Input of shape (batch, n_input_frames, in_channels, height, width); any height and
            width.
        n_members : int, optional
            Members per sample, by default 1.
        generator : torch.Generator, optional
            Source of the noise, by default torch's global generator.
        member_batch : int, optional
            Members per forecaster batch, by default all at once.

        Returns
        -------
        torch.Tensor
            Members (batch, n_members, n_target_frames, in_channels, height, width).
        """
        chunks = list(self.iter_members(frames, n_members, member_batch, generator))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
