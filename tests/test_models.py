"""Tests of nowcast.models: ConvLSTM cell and encoder-forecaster, baselines, registry, costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from nowcast.models import registry as model_registry
from nowcast.models.cnn_lstm import CNNLSTM
from nowcast.models.complexity import PeakTensorMemory, count_parameters, forward_flops
from nowcast.models.convlstm import ConvLSTMCell, EncoderForecaster
from nowcast.models.fc_lstm import FCLSTM
from nowcast.models.registry import build_model, get_method, register, registered_models
from nowcast.models.spatial import apply_tiled

# Small enough to train in a fraction of a second per step on one core.
TINY_KWARGS = {
    "convlstm": {"patch_factor": 4, "hidden_channels": (8, 8), "kernel_sizes": 3},
    "cnn_lstm": {"tile_size": 16, "conv_channels": (4, 8), "lstm_hidden": 32},
    "fc_lstm": {"tile_size": 8, "hidden_size": 32, "num_layers": 1},
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def moving_blobs(batch: int, n_frames: int, height: int, width: int, seed: int = 0):
    """Gaussian rain cells advected at a constant random velocity: a learnable sequence."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(height, dtype=torch.float32).reshape(1, 1, height, 1)
    x = torch.arange(width, dtype=torch.float32).reshape(1, 1, 1, width)
    start = torch.rand(batch, 2, generator=generator) * torch.tensor([height, width]) * 0.5
    velocity = torch.rand(batch, 2, generator=generator) * 2.0 + 0.5
    steps = torch.arange(n_frames, dtype=torch.float32).reshape(1, n_frames)
    centre_y = (start[:, :1] + velocity[:, :1] * steps).reshape(batch, n_frames, 1, 1)
    centre_x = (start[:, 1:] + velocity[:, 1:] * steps).reshape(batch, n_frames, 1, 1)
    blob = torch.exp(-((y - centre_y) ** 2 + (x - centre_x) ** 2) / (2 * 3.0**2))
    return 2.0 * blob.unsqueeze(2) - 0.5


def split(sequence: torch.Tensor, n_input_frames: int):
    return sequence[:, :n_input_frames], sequence[:, n_input_frames:]


def train(model: nn.Module, inputs, targets, n_steps: int, lr: float) -> tuple[float, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(inputs), targets).item()
    for _ in range(n_steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(inputs), targets).item()
    return initial, final


# --- ConvLSTM cell ------------------------------------------------------------------------------


def test_cell_state_and_output_shapes():
    cell = ConvLSTMCell(3, 5, kernel_size=3)
    h, c = cell.init_state(2, 7, 9, dtype=torch.float64)
    assert h.shape == c.shape == (2, 5, 7, 9)
    assert h.dtype == torch.float64 and not h.any()
    cell = cell.double()
    h, c = cell(torch.randn(2, 3, 7, 9, dtype=torch.float64), (h, c))
    assert h.shape == c.shape == (2, 5, 7, 9)
    assert (h.abs() < 1).all()


def test_cell_uses_one_fused_gate_convolution_and_forget_bias():
    cell = ConvLSTMCell(2, 4, kernel_size=5, forget_bias=1.5)
    convs = [m for m in cell.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1
    assert convs[0].in_channels == 6 and convs[0].out_channels == 16
    assert convs[0].kernel_size == (5, 5)
    bias = convs[0].bias.detach()
    assert torch.equal(bias[4:8], torch.full((4,), 1.5))
    assert not bias[:4].any() and not bias[8:].any()
    normed = ConvLSTMCell(2, 4, norm="group", forget_bias=1.5)
    assert normed.gates.bias is None
    assert torch.equal(normed.gate_norm.bias.detach()[4:8], torch.full((4,), 1.5))


def test_cell_peephole_shape_is_independent_of_grid():
    cell = ConvLSTMCell(1, 6)
    for name in ("peephole_input", "peephole_forget", "peephole_output"):
        assert getattr(cell, name).shape == (6, 1, 1)
    for size in ((4, 4), (11, 3)):
        h, c = cell(torch.randn(1, 1, *size), cell.init_state(1, *size))
        assert h.shape == (1, 6, *size)
    assert ConvLSTMCell(1, 6, peephole=False).peephole_input is None


@pytest.mark.parametrize("norm", [None, "group", "layer"])
def test_cell_gradcheck(norm):
    torch.manual_seed(0)
    cell = ConvLSTMCell(2, 4, kernel_size=3, norm=norm).double()
    names = [name for name, _ in cell.named_parameters()]
    # Non-zero peepholes so that their terms take part in the check.
    params = [p.detach().clone() + 0.3 * torch.randn_like(p) for _, p in cell.named_parameters()]
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    h = torch.randn(2, 4, 5, 4, dtype=torch.float64)
    c = torch.randn(2, 4, 5, 4, dtype=torch.float64)

    def step(x, h, c, *param_values):
        return functional_call(cell, dict(zip(names, param_values, strict=True)), (x, (h, c)))

    inputs = tuple(t.requires_grad_() for t in (x, h, c, *params))
    assert torch.autograd.gradcheck(step, inputs, eps=1e-6, atol=1e-5)


def test_cell_peephole_terms_follow_shi_equations():
    torch.manual_seed(0)
    cell = ConvLSTMCell(1, 2, kernel_size=1)
    with torch.no_grad():
        cell.peephole_input.fill_(0.5)
        cell.peephole_forget.fill_(-0.25)
        cell.peephole_output.fill_(0.75)
    x = torch.randn(1, 1, 3, 3)
    h_prev, c_prev = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    h, c = cell(x, (h_prev, c_prev))
    gates = cell.gates(torch.cat([x, h_prev], dim=1))
    i, f, g, o = gates.chunk(4, dim=1)
    c_expected = torch.sigmoid(f - 0.25 * c_prev) * c_prev + torch.sigmoid(
        i + 0.5 * c_prev
    ) * torch.tanh(g)
    h_expected = torch.sigmoid(o + 0.75 * c_expected) * torch.tanh(c_expected)
    torch.testing.assert_close(c, c_expected)
    torch.testing.assert_close(h, h_expected)


# --- Encoder-forecaster -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"hidden_channels": (6, 8, 10), "kernel_sizes": (3, 5, 3), "downsample": True},
        {"forecaster_input": "prediction", "norm": "layer"},
        {"forecaster_input": "prediction", "downsample": True, "norm": "group"},
        {"patch_factor": 1, "hidden_channels": (4,), "kernel_sizes": 3, "peephole": False},
    ],
)
def test_encoder_forecaster_output_shape(kwargs):
    torch.manual_seed(0)
    options = {"patch_factor": 2, "hidden_channels": (6, 8), **kwargs}
    model = EncoderForecaster(3, 4, in_channels=2, **options)
    prediction = model(torch.randn(2, 3, 2, 13, 18))
    assert prediction.shape == (2, 4, 2, 13, 18)
    assert torch.isfinite(prediction).all()


def test_encoder_forecaster_rejects_wrong_input():
    model = EncoderForecaster(3, 2, hidden_channels=(4,), kernel_sizes=3)
    with pytest.raises(ValueError, match="3 input frames"):
        model(torch.randn(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 3, 2, 8, 8))
    with pytest.raises(ValueError, match="forecaster_input"):
        EncoderForecaster(3, 2, forecaster_input="last")


def test_peephole_parameters_are_trained():
    torch.manual_seed(0)
    model = EncoderForecaster(3, 2, **TINY_KWARGS["convlstm"])
    peepholes = {name: p for name, p in model.named_parameters() if "peephole" in name}
    # 2 encoder + 2 forecaster cells, 3 peephole vectors each.
    assert len(peepholes) == 12
    parameter_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in parameter_ids for p in peepholes.values())
    inputs, targets = split(moving_blobs(2, 5, 16, 16), 3)
    nn.functional.mse_loss(model(inputs), targets).backward()
    for name, parameter in peepholes.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_overfits_a_single_batch():
    torch.manual_seed(0)
    model = EncoderForecaster(2, 2, patch_factor=4, hidden_channels=(16,), kernel_sizes=3)
    inputs, targets = split(moving_blobs(2, 4, 16, 16), 2)
    initial, final = train(model, inputs, targets, n_steps=300, lr=1e-2)
    assert final < initial / 10


@pytest.mark.parametrize("downsample", [False, True])
def test_predicts_on_a_grid_larger_than_training_patches(downsample):
    torch.manual_seed(0)
    model = EncoderForecaster(3, 2, downsample=downsample, **TINY_KWARGS["convlstm"])
    inputs, targets = split(moving_blobs(2, 5, 16, 16), 3)
    train(model, inputs, targets, n_steps=5, lr=1e-2)
    with torch.no_grad():
        prediction = model(split(moving_blobs(1, 5, 37, 50), 3)[0])
    assert prediction.shape == (1, 2, 1, 37, 50)
    assert torch.isfinite(prediction).all()


def _gradients(model: nn.Module, inputs, targets) -> dict[str, torch.Tensor]:
    model.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("downsample", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(downsample):
    torch.manual_seed(0)
    options = {"downsample": downsample, "forecaster_input": "prediction", "norm": "group"}
    plain = EncoderForecaster(6, 6, **TINY_KWARGS["convlstm"], **options)
    checkpointed = EncoderForecaster(
        6, 6, gradient_checkpointing=True, **TINY_KWARGS["convlstm"], **options
    )
    checkpointed.load_state_dict(plain.state_dict())
    inputs, targets = split(moving_blobs(2, 12, 16, 16), 6)
    expected = _gradients(plain, inputs, targets)
    actual = _gradients(checkpointed, inputs, targets)
    assert expected.keys() == actual.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(actual[name], gradient, atol=1e-5, rtol=1e-5, msg=name)


def _peak_training_memory(n_frames: int, gradient_checkpointing: bool) -> int:
    torch.manual_seed(0)
    model = EncoderForecaster(
        n_frames,
        n_frames,
        gradient_checkpointing=gradient_checkpointing,
        **TINY_KWARGS["convlstm"],
    )
    inputs, targets = split(moving_blobs(2, 2 * n_frames, 32, 32), n_frames)
    memory = PeakTensorMemory()
    with memory:
        nn.functional.mse_loss(model(inputs), targets).backward()
    return memory.peak_bytes


def test_gradient_checkpointing_lowers_peak_memory():
    plain = {n: _peak_training_memory(n, gradient_checkpointing=False) for n in (6, 12)}
    checkpointed = {n: _peak_training_memory(n, gradient_checkpointing=True) for n in (6, 12)}
    assert checkpointed[12] < plain[12] / 2
    # Growth with sequence length: only the per-step states are kept.
    assert checkpointed[12] - checkpointed[6] < (plain[12] - plain[6]) / 2


# --- All registered models ----------------------------------------------------------------------


def test_every_registered_model_has_a_test_configuration():
    assert set(registered_models()) == set(TINY_KWARGS)


@pytest.mark.parametrize("name", registered_models())
def test_registered_model_training_reduces_loss(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 2, **TINY_KWARGS[name])
    inputs, targets = split(moving_blobs(2, 5, 16, 16), 3)
    initial, final = train(model, inputs, targets, n_steps=15, lr=3e-3)
    assert final < 0.9 * initial


@pytest.mark.parametrize("name", registered_models())
def test_state_dict_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, 3, 2, **TINY_KWARGS[name])
    inputs, targets = split(moving_blobs(2, 5, 16, 16), 3)
    train(model, inputs, targets, n_steps=2, lr=1e-2)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    restored = build_model(name, 3, 2, **TINY_KWARGS[name])
    with torch.no_grad():
        assert not torch.equal(restored(inputs), model(inputs))
        restored.load_state_dict(torch.load(path, weights_only=True))
        assert torch.equal(restored(inputs), model(inputs))


@pytest.mark.parametrize("name", registered_models())
def test_runs_on_a_grid_larger_than_its_tile(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 2, in_channels=2, **TINY_KWARGS[name])
    frames = torch.randn(2, 3, 2, 37, 50, requires_grad=True)
    prediction = model(frames)
    assert prediction.shape == (2, 2, 2, 37, 50)
    assert torch.isfinite(prediction).all()
    prediction.sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0


@pytest.mark.parametrize("name", registered_models())
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 2, **TINY_KWARGS[name])
    frames = torch.randn(2, 3, 1, 20, 24)
    with torch.no_grad():
        expected = model(frames)
        model = model.to(memory_format=torch.channels_last)
        conv_weights = [p for p in model.parameters() if p.ndim == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
        actual = model(frames)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tile_overlap", [0, 5])
def test_tiled_models_share_one_tiling_path(tile_overlap):
    for model_class in (CNNLSTM, FCLSTM):
        model = model_class(2, 1, tile_size=16, tile_overlap=tile_overlap, tile_batch_size=3)
        seen = []
        model.forward_tiles = lambda tiles, seen=seen: seen.append(tiles.shape) or tiles[:, -1:]
        frames = torch.randn(1, 2, 1, 30, 41)
        # A tile function that returns its last input frame must give the last frame back.
        torch.testing.assert_close(model(frames), frames[:, -1:])
        assert all(shape[1:] == (2, 1, 16, 16) and shape[0] <= 3 for shape in seen)


@pytest.mark.parametrize("tile_overlap", [0, 3, 7])
def test_apply_tiled_reassembles_the_grid(tile_overlap):
    frames = torch.randn(2, 3, 2, 19, 26)
    n_calls = []

    def last_frame_doubled(tiles):
        n_calls.append(tiles.shape[0])
        return torch.cat([tiles[:, -1:], 2 * tiles[:, -1:]], dim=1)

    merged = apply_tiled(last_frame_doubled, frames, 8, tile_overlap=tile_overlap)
    torch.testing.assert_close(merged, torch.cat([frames[:, -1:], 2 * frames[:, -1:]], dim=1))
    assert len(n_calls) == 1


# --- Registry -----------------------------------------------------------------------------------


def test_registry_names_and_default():
    assert registered_models() == sorted(["convlstm", "cnn_lstm", "fc_lstm"])
    assert get_method() is EncoderForecaster
    assert get_method("ConvLSTM") is EncoderForecaster
    assert get_method("cnn_lstm") is CNNLSTM
    assert get_method("fc_lstm") is FCLSTM
    model = build_model("convlstm", 4, 3, hidden_channels=(4,), kernel_sizes=3)
    assert (model.n_input_frames, model.n_target_frames) == (4, 3)


def test_unknown_model_name_lists_registered_names():
    with pytest.raises(ValueError, match="unknown model 'unet'") as error:
        get_method("unet")
    for name in registered_models():
        assert name in str(error.value)
    with pytest.raises(ValueError, match="convlstm"):
        build_model("unet", 4, 2)


def test_register_plugs_in_a_custom_model(monkeypatch):
    monkeypatch.setattr(model_registry, "_MODELS", dict(model_registry._MODELS))

    @register("persistence_net")
    class PersistenceNet(nn.Module):
        def __init__(self, n_input_frames, n_target_frames, in_channels=1, scale=1.0):
            super().__init__()
            self.n_target_frames = n_target_frames
            self.scale = nn.Parameter(torch.tensor(scale))

        def forward(self, frames):
            return self.scale * frames[:, -1:].expand(-1, self.n_target_frames, -1, -1, -1)

    assert "persistence_net" in registered_models()
    model = build_model("persistence_net", 3, 2, scale=2.0)
    frames = torch.randn(1, 3, 1, 5, 5)
    torch.testing.assert_close(model(frames), 2.0 * frames[:, [2, 2]])
    with pytest.raises(ValueError, match="already registered"):
        register("persistence_net")(CNNLSTM)


# --- Parameter and FLOP counts ------------------------------------------------------------------


def test_count_parameters_by_hand():
    conv = nn.Conv2d(3, 8, 3)
    assert count_parameters(conv) == 8 * 3 * 3 * 3 + 8
    conv.bias.requires_grad_(False)
    assert count_parameters(conv) == 8 * 3 * 3 * 3
    assert count_parameters(conv, trainable_only=False) == 8 * 3 * 3 * 3 + 8


class _Unbatch(nn.Module):
    """Adapts a 4-D layer to forward_flops' model-shaped input by dropping the time axis."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, frames):
        return self.layer(frames[:, 0])


def test_forward_flops_of_a_single_conv_by_hand():
    model = _Unbatch(nn.Conv2d(3, 8, kernel_size=3, padding=1))
    # Each of the 2 * 8 * 10 * 12 outputs is a dot product over 3 * 3 * 3 inputs.
    assert forward_flops(model, (2, 1, 3, 10, 12)) == 2 * (2 * 8 * 10 * 12) * (3 * 3 * 3)
    strided = _Unbatch(nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1, groups=2))
    assert forward_flops(strided, (1, 1, 4, 8, 8)) == 2 * (6 * 4 * 4) * (2 * 3 * 3)
    transposed = _Unbatch(nn.ConvTranspose2d(4, 6, kernel_size=4, stride=2, padding=1))
    assert forward_flops(transposed, (1, 1, 4, 5, 5)) == 2 * (4 * 5 * 5) * (6 * 4 * 4)


def test_forward_flops_of_linear_and_lstm_by_hand():
    linear = nn.Linear(7, 5)
    assert forward_flops(linear, (3, 4, 7)) == 2 * 3 * 4 * 7 * 5
    lstm = nn.LSTM(6, 10, num_layers=2, batch_first=True)
    per_step = 4 * 10 * (6 + 10) + 4 * 10 * (10 + 10)
    assert forward_flops(lstm, (3, 5, 6)) == 2 * 3 * 5 * per_step


def test_forward_flops_of_a_convlstm_by_hand():
    model = EncoderForecaster(2, 3, patch_factor=2, hidden_channels=(4,), kernel_sizes=3)
    # 8 x 8 frames -> 4 x 4 patches of 4 channels; the forecaster cell has no input.
    encoder_step = (4 * 4) * (4 * 4) * (4 + 4) * 9
    forecaster_step = (4 * 4) * (4 * 4) * 4 * 9
    head_step = (4 * 4) * 4 * 4
    expected_macs = 2 * encoder_step + 3 * (forecaster_step + head_step)
    assert forward_flops(model, (1, 2, 1, 8, 8)) == 2 * expected_macs
    # Padding to the patch multiple is part of the cost: 7 x 7 runs as 8 x 8.
    assert forward_flops(model, (1, 2, 1, 7, 7)) == 2 * expected_macs


def test_residual_model_starts_as_persistence_and_learns_a_correction():
    torch.manual_seed(0)
    model = build_model(
        "convlstm", 3, 2, patch_factor=2, hidden_channels=(4,), kernel_sizes=(3,), residual=True
    )
    frames = torch.rand(2, 3, 1, 8, 8)
    with torch.no_grad():
        untrained = model(frames)
    torch.testing.assert_close(untrained, frames[:, -1:].expand(-1, 2, -1, -1, -1))
    target = frames[:, -1:].expand(-1, 2, -1, -1, -1) * 0.5  # decay
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(frames), target)
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first
