"""Model size and cost: parameter count and forward-pass FLOPs (for throughput benchmarks)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_GATES_PER_MODE = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Count the parameters of a model.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    trainable_only : bool, optional
        Count only parameters with ``requires_grad``, by default True.

    Returns
    -------
    int
        Number of scalar parameters.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    kernel_volume = math.prod(module.kernel_size)
    if isinstance(module, _TRANSPOSED_CONVS):
        # Each input value is scattered to out_channels / groups * kernel outputs.
        per_input = module.out_channels // module.groups * kernel_volume
        return inputs[0].numel() * per_input
    return output.numel() * (module.in_channels // module.groups) * kernel_volume


def _linear_macs(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _recurrent_macs(module: nn.RNNBase, inputs: tuple, output: tuple) -> int:
    sequence = inputs[0]
    if isinstance(sequence, nn.utils.rnn.PackedSequence):
        n_steps = sequence.data.shape[0]
    else:
        n_steps = sequence.shape[:-1].numel()
    gates = _GATES_PER_MODE[module.mode]
    directions = 2 if module.bidirectional else 1
    state_size = module.proj_size or module.hidden_size
    macs = 0
    for layer in range(module.num_layers):
        layer_input = module.input_size if layer == 0 else state_size * directions
        per_step = gates * module.hidden_size * (layer_input + state_size)
        if module.proj_size:
            per_step += module.hidden_size * module.proj_size
        macs += directions * per_step
    return n_steps * macs


def forward_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """Estimate the FLOPs of one forward pass as 2 x the multiply-accumulates of its layers.

    Forward hooks count the multiply-accumulates of every call of a convolution (including
    transposed), linear or recurrent (LSTM/GRU/RNN) layer, so modules applied once per time step
    are counted once per step. Biases, normalisation, activations, pooling and elementwise gate
    arithmetic are not counted: they are a small fraction of the total for these models.

    Parameters
    ----------
    model : torch.nn.Module
        The model; it is run once on zeros under ``torch.no_grad``.
    input_shape : sequence of int
        Shape of the input, e.g. (batch, n_input_frames, channels, height, width).
    device : torch.device or str, optional
        Device of the dummy input, by default that of the model's first parameter.
    dtype : torch.dtype, optional
        Dtype of the dummy input, by default that of the model's first parameter.

    Returns
    -------
    int
        Estimated floating-point operations of one forward pass.
    """
    reference = next(model.parameters(), None)
    if device is None:
        device = reference.device if reference is not None else "cpu"
    if dtype is None:
        dtype = reference.dtype if reference is not None else torch.float32
    total_macs = 0

    def counter(macs_fn):
        def hook(module, inputs, output):
            nonlocal total_macs
            total_macs += macs_fn(module, inputs, output)

        return hook

    handles = []
    for module in model.modules():
        if isinstance(module, _CONVS + _TRANSPOSED_CONVS):
            handles.append(module.register_forward_hook(counter(_conv_macs)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(counter(_linear_macs)))
        elif isinstance(module, nn.RNNBase):
            handles.append(module.register_forward_hook(counter(_recurrent_macs)))
    try:
        with torch.no_grad():
            model(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * total_macs


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by operators (forward, backward, recomputation).

    Every storage an operator returns is counted once until it is freed (weakref finalizer on the
    storage), so this is the live activation memory a CPU allocator would have to hold.
    """

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for value in tree_flatten(output)[0]:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live_bytes += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return output
