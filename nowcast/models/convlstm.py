"""ConvLSTM encoder-forecaster of Shi et al. (2015), with an optional HKO-7/TrajGRU hierarchy.

References
----------
Shi, X., Chen, Z., Wang, H., Yeung, D.-Y., Wong, W.-K. and Woo, W.-C. (2015). Convolutional LSTM
network: a machine learning approach for precipitation nowcasting. NeurIPS 28.

Shi, X., Gao, Z., Lausen, L., Wang, H., Yeung, D.-Y., Wong, W.-K. and Woo, W.-C. (2017). Deep
learning for precipitation nowcasting: a benchmark and a new model. NeurIPS 30.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nowcast.models.registry import register
from nowcast.models.spatial import PAD_MODES, check_sequence_input, pad_to_multiple

NORMS = (None, "group", "layer")
FORECASTER_INPUTS = ("zeros", "prediction")

State = tuple[torch.Tensor, torch.Tensor]


def _largest_divisor_at_most(value: int, limit: int) -> int:
    return max(d for d in range(1, min(value, limit) + 1) if value % d == 0)


def _gate_norm(norm: str | None, hidden_channels: int) -> nn.GroupNorm | None:
    """Normalisation of the 4 stacked gate pre-activations; groups never straddle two gates."""
    if norm is None:
        return None
    if norm == "group":
        groups_per_gate = _largest_divisor_at_most(hidden_channels, 8)
    elif norm == "layer":
        # One group per gate: each gate normalised over its channels and space, as in the
        # layer-normalised LSTM (Ba et al., 2016).
        groups_per_gate = 1
    else:
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    return nn.GroupNorm(4 * groups_per_gate, 4 * hidden_channels)


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell with peephole connections (Shi et al., 2015, eq. 3).

    All four gates come from one convolution over the concatenation ``[x, h_{t-1}]``::

        i = sigmoid(W_i * [x, h] + w_ci o c_{t-1} + b_i)
        f = sigmoid(W_f * [x, h] + w_cf o c_{t-1} + b_f)
        c_t = f o c_{t-1} + i o tanh(W_c * [x, h] + b_c)
        o = sigmoid(W_o * [x, h] + w_co o c_t + b_o)
        h_t = o o tanh(c_t)

    where ``*`` is convolution and ``o`` the Hadamard product. The peephole weights are one value
    per hidden channel, shape (hidden_channels, 1, 1), so the cell runs on any grid size.

    Parameters
    ----------
    in_channels : int
        Channels of the input ``x``; 0 makes an input-less cell (``x`` must be None), which is
        the same as a zero input without the wasted convolution.
    hidden_channels : int
        Channels of the hidden and cell states.
    kernel_size : int, optional
        Odd side of the gate convolution kernel ("same" padding), by default 3.
    peephole : bool, optional
        Whether to use the peephole terms, by default True.
    norm : {None, "group", "layer"}, optional
        Normalisation of the gate pre-activations: ``"group"`` uses GroupNorm with up to 8
        groups per gate, ``"layer"`` one group per gate. The convolution then has no bias and
        the forget bias goes into the norm's shift. By default None.
    forget_bias : float, optional
        Initial bias of the forget gate, by default 1.0 (keeps memory early in training).
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        peephole: bool = True,
        norm: str | None = None,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.kernel_size = kernel_size
        self.peephole = peephole
        self.gate_norm = _gate_norm(norm, hidden_channels)
        self.gates = nn.Conv2d(
            in_channels + hidden_channels,
            4 * hidden_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=self.gate_norm is None,
        )
        if peephole:
            self.peephole_input = nn.Parameter(torch.zeros(hidden_channels, 1, 1))
            self.peephole_forget = nn.Parameter(torch.zeros(hidden_channels, 1, 1))
            self.peephole_output = nn.Parameter(torch.zeros(hidden_channels, 1, 1))
        else:
            self.register_parameter("peephole_input", None)
            self.register_parameter("peephole_forget", None)
            self.register_parameter("peephole_output", None)
        self.reset_gate_bias(forget_bias)

    @torch.no_grad()
    def reset_gate_bias(self, forget_bias: float) -> None:
        """Set the gate biases to zero except the forget gate's, set to ``forget_bias``.

        Parameters
        ----------
        forget_bias : float
            Forget-gate bias.
        """
        bias = self.gate_norm.bias if self.gate_norm is not None else self.gates.bias
        bias.zero_()
        bias[self.hidden_channels : 2 * self.hidden_channels] = forget_bias

    def init_state(
        self,
        batch: int,
        height: int,
        width: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State:
        """Return the zero initial state.

        Parameters
        ----------
        batch, height, width : int
            State size.
        device : torch.device or str, optional
            Device of the state, by default that of the cell's parameters.
        dtype : torch.dtype, optional
            Dtype of the state, by default that of the cell's parameters.

        Returns
        -------
        tuple of torch.Tensor
            ``(h, c)``, each of shape (batch, hidden_channels, height, width).
        """
        weight = self.gates.weight
        shape = (batch, self.hidden_channels, height, width)
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        return (
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor | None, state: State) -> State:
        """Advance the cell by one time step.

        Parameters
        ----------
        x : torch.Tensor or None
            Input of shape (batch, in_channels, height, width); None for an input-less cell.
        state : tuple of torch.Tensor
            ``(h_{t-1}, c_{t-1})``, each (batch, hidden_channels, height, width).

        Returns
        -------
        tuple of torch.Tensor
            ``(h_t, c_t)``.
        """
        h_prev, c_prev = state
        if (x is None) != (self.in_channels == 0):
            raise ValueError(
                f"cell built with in_channels={self.in_channels} got "
                f"{'no input' if x is None else 'an input'}"
            )
        stacked = h_prev if x is None else torch.cat([x, h_prev], dim=1)
        gates = self.gates(stacked)
        if self.gate_norm is not None:
            gates = self.gate_norm(gates)
        input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)
        if self.peephole:
            input_gate = input_gate + self.peephole_input * c_prev
            forget_gate = forget_gate + self.peephole_forget * c_prev
        c = torch.sigmoid(forget_gate) * c_prev + torch.sigmoid(input_gate) * torch.tanh(candidate)
        if self.peephole:
            output_gate = output_gate + self.peephole_output * c
        h = torch.sigmoid(output_gate) * torch.tanh(c)
        return h, c


def _per_layer(value: int | Sequence[int], n_layers: int, name: str) -> tuple[int, ...]:
    values = (value,) * n_layers if isinstance(value, int) else tuple(value)
    if len(values) != n_layers:
        raise ValueError(f"{name} has {len(values)} entries for {n_layers} layers")
    return values


@register("convlstm")
class EncoderForecaster(nn.Module):
    """ConvLSTM encoder-forecaster for precipitation nowcasting (Shi et al., 2015).

    Frames are turned into patches by space-to-depth (``pixel_unshuffle`` by ``patch_factor``),
    read by a stack of ConvLSTM layers (the encoder), whose last states initialise a second stack
    with its own weights (the forecaster) that unrolls ``n_target_frames`` steps. Each
    prediction is a 1x1 convolution of the forecaster hidden states followed by depth-to-space
    (``pixel_shuffle``).

    Two layouts:

    * ``downsample=False`` (Shi et al., 2015): all layers at the patch resolution; forecaster
      layer ``l`` reads the hidden state of forecaster layer ``l - 1``; the prediction reads the
      concatenation of all forecaster hidden states.
    * ``downsample=True`` (HKO-7 / TrajGRU hierarchy, Shi et al., 2017): a strided convolution
      halves the resolution between encoder layers; the forecaster runs top-down, a transposed
      convolution doubling the resolution between its layers; the prediction reads the bottom
      forecaster layer (the only one at full patch resolution).

    The forecaster's first layer (the top one with ``downsample``) gets no input by default
    (``forecaster_input="zeros"``), as in Shi et al.; this is the same as a zero input and makes
    the forecast a function of the encoded state only. ``forecaster_input="prediction"`` feeds the
    previous prediction (the last input frame at the first step) to the full-resolution
    forecaster layer instead.

    The model is fully convolutional: grids of any size are padded (bottom/right) to a multiple
    of ``patch_factor * 2 ** (n_layers - 1)`` (``patch_factor`` without ``downsample``) and the
    prediction is cropped back. Output values are unconstrained reals.

    Parameters
    ----------
    n_input_frames : int
        Number of past frames read.
    n_target_frames : int
        Number of future frames predicted.
    in_channels : int, optional
        Channels per frame, by default 1.
    patch_factor : int, optional
        Space-to-depth factor, by default 4.
    hidden_channels : sequence of int, optional
        Hidden channels of each layer (encoder and forecaster alike), by default (64, 64).
    kernel_sizes : int or sequence of int, optional
        Gate kernel size of each layer, by default (3, 3).
    downsample : bool, optional
        Use the HKO-7/TrajGRU resolution hierarchy, by default False.
    peephole : bool, optional
        Use peephole connections, by default True.
    norm : {None, "group", "layer"}, optional
        Gate normalisation of every cell, by default None.
    gradient_checkpointing : bool, optional
        Recompute each time step in the backward pass instead of storing its activations
        (``torch.utils.checkpoint``, non-reentrant), by default False. Only the per-step states
        stay in memory, so peak activation memory grows much more slowly with sequence length.
    forecaster_input : {"zeros", "prediction"}, optional
        What the forecaster reads at each step, by default ``"zeros"``.
    residual : bool, optional
        Predict a correction added to the last input frame, with the output layer initialised
        to zero so that the untrained model is persistence, by default False. On inputs moved
        into the Lagrangian frame this makes the model start as extrapolation (L-CNN idea).
    forget_bias : float, optional
        Initial forget-gate bias, by default 1.0.
    pad_mode : {"replicate", "reflect"}, optional
        Padding up to the required multiple, by default ``"replicate"``.
    """

    def __init__(
        self,
        n_input_frames: int,
        n_target_frames: int,
        in_channels: int = 1,
        patch_factor: int = 4,
        hidden_channels: Sequence[int] = (64, 64),
        kernel_sizes: int | Sequence[int] = (3, 3),
        downsample: bool = False,
        peephole: bool = True,
        norm: str | None = None,
        gradient_checkpointing: bool = False,
        forecaster_input: str = "zeros",
        residual: bool = False,
        forget_bias: float = 1.0,
        pad_mode: str = "replicate",
    ) -> None:
        super().__init__()
        hidden_channels = tuple(hidden_channels)
        n_layers = len(hidden_channels)
        if n_layers == 0:
            raise ValueError("hidden_channels must have at least one layer")
        kernel_sizes = _per_layer(kernel_sizes, n_layers, "kernel_sizes")
        if patch_factor < 1:
            raise ValueError(f"patch_factor must be >= 1, got {patch_factor}")
        if forecaster_input not in FORECASTER_INPUTS:
            raise ValueError(
                f"unknown forecaster_input {forecaster_input!r}; expected one of "
                f"{FORECASTER_INPUTS}"
            )
        if pad_mode not in PAD_MODES:
            raise ValueError(f"unknown pad mode {pad_mode!r}; expected one of {PAD_MODES}")
        self.n_input_frames = n_input_frames
        self.n_target_frames = n_target_frames
        self.in_channels = in_channels
        self.patch_factor = patch_factor
        self.hidden_channels = hidden_channels
        self.downsample = downsample
        self.gradient_checkpointing = gradient_checkpointing
        self.forecaster_input = forecaster_input
        self.pad_mode = pad_mode
        patch_channels = in_channels * patch_factor**2
        feed_prediction = forecaster_input == "prediction"
        cell_options = {"peephole": peephole, "norm": norm, "forget_bias": forget_bias}

        self.encoder = nn.ModuleList(
            ConvLSTMCell(
                patch_channels if level == 0 else hidden_channels[level - 1],
                hidden_channels[level],
                kernel_sizes[level],
                **cell_options,
            )
            for level in range(n_layers)
        )
        forecaster_in_channels = []
        for level in range(n_layers):
            if downsample:
                from_above = hidden_channels[level + 1] if level < n_layers - 1 else 0
                channels = from_above + (patch_channels if level == 0 and feed_prediction else 0)
            elif level == 0:
                channels = patch_channels if feed_prediction else 0
            else:
                channels = hidden_channels[level - 1]
            forecaster_in_channels.append(channels)
        self.forecaster = nn.ModuleList(
            ConvLSTMCell(
                forecaster_in_channels[level],
                hidden_channels[level],
                kernel_sizes[level],
                **cell_options,
            )
            for level in range(n_layers)
        )
        if downsample:
            # downsamplers[l] takes level l to level l + 1; upsamplers[l] takes l + 1 back to l.
            self.downsamplers = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(hidden_channels[level], hidden_channels[level], 3, 2, 1),
                    nn.LeakyReLU(0.2),
                )
                for level in range(n_layers - 1)
            )
            self.upsamplers = nn.ModuleList(
                nn.Sequential(
                    nn.ConvTranspose2d(
                        hidden_channels[level + 1], hidden_channels[level + 1], 4, 2, 1
                    ),
                    nn.LeakyReLU(0.2),
                )
                for level in range(n_layers - 1)
            )
            head_channels = hidden_channels[0]
        else:
            self.downsamplers = nn.ModuleList()
            self.upsamplers = nn.ModuleList()
            head_channels = sum(hidden_channels)
        self.head = nn.Conv2d(head_channels, patch_channels, 1)
        self.residual = residual
        if residual:
            # Start as persistence of the last input frame (in a Lagrangian frame: as
            # extrapolation), so training only has to learn the correction.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def spatial_multiple(self) -> int:
        """Grid sizes are padded to a multiple of this value."""
        levels = len(self.hidden_channels) - 1 if self.downsample else 0
        return self.patch_factor * 2**levels

    def _encoder_step(self, patches: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor]:
        new_states = []
        layer_input = patches
        for level, cell in enumerate(self.encoder):
            if level > 0 and self.downsample:
                layer_input = self.downsamplers[level - 1](layer_input)
            h, c = cell(layer_input, (states[2 * level], states[2 * level + 1]))
            new_states += [h, c]
            layer_input = h
        return tuple(new_states)

    def _forecaster_step(
        self, previous_prediction: torch.Tensor | None, *states: torch.Tensor
    ) -> tuple[torch.Tensor]:
        n_layers = len(self.forecaster)
        new_states: list[torch.Tensor | None] = [None] * (2 * n_layers)
        if self.downsample:
            from_above = None
            for level in reversed(range(n_layers)):
                inputs = []
                if from_above is not None:
                    inputs.append(self.upsamplers[level](from_above))
                if level == 0 and previous_prediction is not None:
                    inputs.append(previous_prediction)
                layer_input = torch.cat(inputs, dim=1) if inputs else None
                state = (states[2 * level], states[2 * level + 1])
                h, c = self.forecaster[level](layer_input, state)
                new_states[2 * level : 2 * level + 2] = [h, c]
                from_above = h
            features = from_above
        else:
            layer_input = previous_prediction
            for level, cell in enumerate(self.forecaster):
                h, c = cell(layer_input, (states[2 * level], states[2 * level + 1]))
                new_states[2 * level : 2 * level + 2] = [h, c]
                layer_input = h
            features = torch.cat(new_states[0::2], dim=1)
        return (self.head(features), *new_states)

    def _run_step(self, step, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(step, *args, use_reentrant=False)
        return step(*args)

    def _initial_states(self, patches: torch.Tensor) -> list[torch.Tensor]:
        batch, _, _, height, width = patches.shape
        states = []
        for level, cell in enumerate(self.encoder):
            scale = 2**level if self.downsample else 1
            states += cell.init_state(
                batch, height // scale, width // scale, patches.device, patches.dtype
            )
        return states

    def _encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The input frames as patches (batch, n_frames, C', h, w) and the encoder's states
        after the last of them."""
        check_sequence_input(frames, self.n_input_frames, self.in_channels)
        batch, n_frames, channels, height, width = frames.shape
        images, _ = pad_to_multiple(
            frames.reshape(batch * n_frames, channels, height, width),
            self.spatial_multiple,
            self.pad_mode,
        )
        patches = F.pixel_unshuffle(images, self.patch_factor)
        patches = patches.reshape(batch, n_frames, *patches.shape[1:])
        states = self._initial_states(patches)
        for step in range(n_frames):
            states = self._run_step(self._encoder_step, patches[:, step], *states)
        return patches, states

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Predict the next ``n_target_frames`` frames.

        Parameters
        ----------
        frames : torch.Tensor
            Input of shape (batch, n_input_frames, in_channels, height, width); any height and
            width.

        Returns
        -------
        torch.Tensor
            Prediction of shape (batch, n_target_frames, in_channels, height, width).
        """
        patches, states = self._encode(frames)
        batch, _, channels, height, width = frames.shape
        previous = patches[:, -1] if self.forecaster_input == "prediction" else None
        predictions = []
        for _ in range(self.n_target_frames):
            prediction, *states = self._run_step(self._forecaster_step, previous, *states)
            predictions.append(prediction)
            if previous is not None:
                previous = prediction

        predicted = torch.stack(predictions, dim=1)
        predicted = F.pixel_shuffle(
            predicted.reshape(batch * self.n_target_frames, *predicted.shape[2:]),
            self.patch_factor,
        )
        predicted = predicted[..., :height, :width]
        predicted = predicted.reshape(batch, self.n_target_frames, channels, height, width)
        if self.residual:
            predicted = predicted + frames[:, -1:]
        return predicted
