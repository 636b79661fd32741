"""Tests of the learned ensemble: the stochastic ConvLSTM, the fair CRPS, training with members."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_train import (
    LOG1P,
    assert_same_tensors,
    make_experiment,
    read_log,
    run_training,
    store_root,  # noqa: F401 (a fixture)
)

from nowcast.config import ConfigError, parse_model
from nowcast.models import (
    StochasticEncoderForecaster,
    build_model,
    get_method,
    registered_models,
)
from nowcast.models.stochastic import correlated_noise, frame_spectrum_noise
from nowcast.training import losses
from nowcast.training.checkpoint import checkpoint_path, load_checkpoint, load_model
from nowcast.training.config import TrainConfig
from nowcast.training.step import StepParts, point_forecast, train_step

pytestmark = pytest.mark.usefixtures("single_torch_thread")

N_INPUT, N_TARGET, SIZE = 3, 2, 32
TINY_KWARGS = {
    "patch_factor": 4,
    "hidden_channels": [8],
    "kernel_sizes": 3,
    "noise_channels": 2,
    "noise_scale_pixels": 8,
}
TINY_MODEL = {"name": "stochastic_convlstm", "kwargs": TINY_KWARGS}


def tiny_model(seed: int = 0, **kwargs) -> StochasticEncoderForecaster:
    torch.manual_seed(seed)
    return build_model("stochastic_convlstm", N_INPUT, N_TARGET, **{**TINY_KWARGS, **kwargs})


def frames(batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, N_INPUT, 1, SIZE, SIZE), generator=generator)


def perturb_head(model: torch.nn.Module, seed: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the model --------------------------------------------------------------------------


def test_registered_as_a_stochastic_model():
    assert get_method("stochastic_convlstm") is StochasticEncoderForecaster
    # Listed apart: the models of registered_models() return one forecast, not members.
    assert registered_models(stochastic=True) == ["stochastic_convlstm"]
    assert "stochastic_convlstm" not in registered_models()
    model = tiny_model()
    assert model.stochastic is True and model.n_target_frames == N_TARGET
    # The deterministic model has no such attribute: the training step tells them apart by it.
    assert not getattr(get_method("convlstm"), "stochastic", False)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"forecaster_input": "prediction"}, {"downsample": True, "hidden_channels": [8, 8]}],
)
def test_untrained_members_are_the_residual_baseline(kwargs):
    model = tiny_model(**kwargs)
    inputs = frames()
    members = model(inputs, n_members=3, generator=seeded(0))
    assert members.shape == (2, 3, N_TARGET, 1, SIZE, SIZE)
    baseline = inputs[:, None, -1:].expand_as(members)
    assert torch.equal(members, baseline)  # the zero head: the noise has no effect yet


def test_any_grid_and_channels_last_and_a_state_dict_round_trip(tmp_path):
    model = tiny_model(in_channels=2)
    perturb_head(model)
    inputs = torch.randn(2, N_INPUT, 2, 37, 50, requires_grad=True)
    members = model(inputs, n_members=2, generator=seeded(0))
    assert members.shape == (2, 2, N_TARGET, 2, 37, 50)
    members.sum().backward()
    assert torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    restored = tiny_model(seed=1, in_channels=2).to(memory_format=torch.channels_last)
    restored.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        again = restored(inputs, n_members=2, generator=seeded(0))
    torch.testing.assert_close(again, members.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"forecaster_input": "prediction"}])
def test_members_differ_and_a_seed_repeats_them(kwargs):
    model = tiny_model(**kwargs)
    perturb_head(model)
    inputs = frames()
    with torch.no_grad():
        members = model(inputs, n_members=2, generator=seeded(5))
        again = model(inputs, n_members=2, generator=seeded(5))
        other = model(inputs, n_members=2, generator=seeded(6))
    spread = (members[:, 0] - members[:, 1]).abs()
    assert spread.amax(dim=(1, 2, 3, 4)).min() > 1e-3  # every sample's two members differ
    assert torch.equal(members, again)
    assert not torch.allclose(members, other)


def test_noise_gain_scales_the_noise_in_eval_mode_only():
    model = tiny_model(noise_gain=0.0)
    perturb_head(model)
    inputs = frames()
    with torch.no_grad():
        model.eval()
        silent = model(inputs, n_members=3, generator=seeded(5))
        # Gain 0: no noise reaches the forecaster, so every member is the same forecast.
        assert torch.equal(silent[:, 0], silent[:, 1]) and torch.equal(silent[:, 0], silent[:, 2])
        loud = model.decode(model.encode(inputs), 3, seeded(5), noise_gain=1.0)
        model.train()
        trained = model(inputs, n_members=3, generator=seeded(5))
    # Training mode draws unit-variance noise whatever the gain: the same members as gain 1.
    torch.testing.assert_close(trained, loud)
    assert (loud[:, 0] - loud[:, 1]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="noise_gain"):
        tiny_model(noise_gain=-0.5)


def test_member_batches_give_the_same_members_and_share_the_encoder():
    model = tiny_model()
    perturb_head(model)
    inputs = frames(batch=2)
    seen = {"encoder": [], "forecaster": []}
    for name in seen:
        getattr(model, name)[0].register_forward_hook(
            lambda _module, args, _output, name=name: seen[name].append(args[0].shape[0])
        )
    with torch.no_grad():
        whole = model(inputs, n_members=5, generator=seeded(3))
        assert seen == {"encoder": [2] * N_INPUT, "forecaster": [2 * 5] * N_TARGET}
        seen["encoder"].clear()
        seen["forecaster"].clear()
        batched = model.forecast_members(inputs, 5, member_batch=2, generator=seeded(3))
    # The encoder reads each sample once; the forecaster runs per member batch (2, 2, 1).
    assert seen["encoder"] == [2] * N_INPUT
    assert seen["forecaster"] == [4] * N_TARGET + [4] * N_TARGET + [2] * N_TARGET
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="n_members"):
        model(inputs, n_members=0)


def test_noise_is_stationary_with_unit_variance_and_the_set_correlation():
    sigma = 3.0
    noise = correlated_noise(4, 2, 3, 48, 48, sigma, seeded(0))
    assert noise.shape == (8, 3, 48, 48)
    assert noise.var().item() == pytest.approx(1.0, abs=0.15)
    # Gaussian smoothing of white noise: correlation exp(-d^2 / (4 sigma^2)) at lag d.
    lag = 3
    correlation = (noise[..., lag:] * noise[..., :-lag]).mean() / noise.var()
    assert correlation.item() == pytest.approx(math.exp(-(lag**2) / (4 * sigma**2)), abs=0.08)
    white = correlated_noise(4, 2, 3, 48, 48, 0.0, seeded(0))
    assert abs((white[..., 1:] * white[..., :-1]).mean().item()) < 0.05
    # Member by member: the first two members do not depend on how many follow.
    assert torch.equal(
        correlated_noise(2, 1, 3, 16, 16, sigma, seeded(1)),
        correlated_noise(4, 1, 3, 16, 16, sigma, seeded(1))[:2],
    )


def step_noise(model: StochasticEncoderForecaster, n_members: int, seed: int) -> torch.Tensor:
    """The noise every forecaster step reads, (steps, batch * n_members, channels, y, x)."""
    with torch.no_grad():
        encoded = model.encode(frames(batch=2))
        return torch.stack(model._member_noise(encoded, n_members, seeded(seed), 1.0))


@pytest.mark.parametrize("memory", [0.0, 0.5])
def test_noise_memory_sets_the_correlation_between_steps(memory):
    model = tiny_model(noise_memory=memory, noise_scale_pixels=0)
    noise = step_noise(model, 64, seed=4)
    assert noise.shape == (N_TARGET, 2 * 64, 2, SIZE // 4, SIZE // 4)
    for step in noise:
        assert step.var().item() == pytest.approx(1.0, abs=0.1)
    correlation = (noise[1] * noise[0]).mean() / noise[0].var()
    assert correlation.item() == pytest.approx(memory, abs=0.06)
    # One field for the whole hour by default.
    held = step_noise(tiny_model(noise_scale_pixels=0), 3, seed=4)
    assert torch.equal(held[0], held[-1])
    with pytest.raises(ValueError, match="noise_memory"):
        tiny_model(noise_memory=1.5)


@pytest.mark.parametrize(
    "noise", [{"noise_memory": 0.5}, {"noise_spectrum": "frame"}], ids=["evolving", "frame"]
)
def test_other_noises_give_the_same_members_in_any_member_batches(noise):
    model = tiny_model(**noise)
    perturb_head(model)
    inputs = frames(batch=2)
    inputs[1] = 0.0  # a dry sample beside a wet one
    with torch.no_grad():
        whole = model(inputs, n_members=5, generator=seeded(3))
        batched = model.forecast_members(inputs, 5, member_batch=2, generator=seeded(3))
        held = tiny_model()
        held.load_state_dict(model.state_dict())
        default = held(inputs, n_members=5, generator=seeded(3))
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-6)
    # The same weights with the default noise (one Gaussian field for the hour) give other members.
    assert not torch.allclose(whole, default, atol=1e-4)


def mean_power(noise: torch.Tensor) -> np.ndarray:
    """Power spectrum (y, x // 2 + 1) of the centred fields of ``noise`` (..., y, x), averaged."""
    fields = noise.reshape(-1, *noise.shape[-2:]).double()
    fields = fields - fields.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.rfft2(fields).abs().square().mean(dim=0).numpy()


def high_share(power: np.ndarray) -> float:
    """Share of the power at wavenumbers above a quarter of the grid's Nyquist."""
    height, width = power.shape[0], (power.shape[1] - 1) * 2
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(height), np.fft.rfftfreq(width), indexing="ij"))
    return float(power[k > 0.125].sum() / power.sum())


def test_frame_spectrum_noise_copies_each_frames_spectrum():
    from pysteps.noise.fftgenerators import initialize_nonparam_2d_fft_filter

    y, x = np.mgrid[0:32, 0:32]
    smooth = np.exp(-((y - 14.0) ** 2 + (x - 18.0) ** 2) / 60.0)
    cellular = smooth * (0.2 + (y // 2 + x // 2) % 2)
    frames_ = torch.tensor(np.stack([smooth, cellular, np.zeros((32, 32))]), dtype=torch.float32)
    members = 200
    white = correlated_noise(members, 3, 1, 32, 32, 0.0, seeded(5))
    noise = frame_spectrum_noise(white, frames_, members, sigma=2.0).reshape(3, members, 32, 32)
    assert torch.isfinite(noise).all()
    torch.testing.assert_close(noise.std(dim=(-2, -1)), torch.ones(3, members), rtol=1e-4, atol=0)
    powers = [mean_power(noise[sample]) for sample in range(3)]
    # The expected power is the square of pysteps' nonparametric filter of the frame.
    for sample in range(2):
        expected = initialize_nonparam_2d_fft_filter(frames_[sample].double().numpy())["field"] ** 2
        expected[0, 0] = 0.0
        keep = expected > 1e-6 * expected.max()
        correlation = np.corrcoef(np.log(powers[sample][keep]), np.log(expected[keep]))[0, 1]
        assert correlation > 0.9
    # A smooth frame gives smooth noise, a cellular one small-scale noise; a dry frame, which has
    # no spectrum, gets the Gaussian smoothing of the default noise (the same correlation at
    # every lag, both fields standardized as the frame noise is).
    assert high_share(powers[1]) > 2 * high_share(powers[0])
    gaussian = correlated_noise(members, 1, 1, 32, 32, 2.0, seeded(6))[:, 0]
    gaussian = gaussian - gaussian.mean(dim=(-2, -1), keepdim=True)
    gaussian = gaussian / gaussian.std(dim=(-2, -1), keepdim=True)
    for lag in (1, 2, 4, 8):
        dry, smooth_gaussian = (
            (field[..., :-lag] * field[..., lag:]).mean().item() for field in (noise[2], gaussian)
        )
        assert dry == pytest.approx(smooth_gaussian, abs=0.03)


def test_an_unknown_noise_spectrum_is_refused():
    with pytest.raises(ValueError, match="noise_spectrum"):
        tiny_model(noise_spectrum="pink")


# ---- the fair CRPS ----------------------------------------------------------------------


def brute_force_fair_crps(members: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    m = members.shape[1]
    error = np.abs(members - target[:, None]).mean(axis=1)
    pairs = np.abs(members[:, :, None] - members[:, None, :]).sum(axis=(1, 2))
    crps = error - pairs / (2 * m * (m - 1))
    return float(crps[mask > 0].mean())


def crps_inputs(n_members: int, seed: int = 0):
    generator = seeded(seed)
    shape = (2, N_TARGET, 1, 8, 8)
    members = torch.rand((2, n_members, *shape[1:]), generator=generator, dtype=torch.float64)
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    mask = (torch.rand(shape, generator=generator) > 0.3).double()
    return members, target, mask


@pytest.mark.parametrize("n_members", [2, 3, 5])
def test_fair_crps_equals_the_brute_force_sum(n_members):
    members, target, mask = crps_inputs(n_members)
    actual = losses.get_method("crps")(members, target, mask)
    expected = brute_force_fair_crps(members.numpy(), target.numpy(), mask.numpy())
    assert actual.item() == pytest.approx(expected, rel=1e-12)


def test_fair_crps_of_equal_members_is_the_mae_and_ignores_no_data():
    members, target, mask = crps_inputs(4, seed=1)
    same = members[:, :1].expand_as(members)
    mae = losses.get_method("mae")(members[:, 0], target, mask)
    torch.testing.assert_close(losses.fair_crps(same, target, mask), mae)

    members.requires_grad_(True)
    reference = losses.fair_crps(members, target, mask)
    reference.backward()
    no_data = (mask == 0).unsqueeze(1).expand_as(members)
    assert torch.all(members.grad[no_data] == 0)
    changed_members, changed_target = members.detach().clone(), target.clone()
    changed_members[no_data] = math.nan
    changed_target[mask == 0] = math.inf
    changed_members.requires_grad_(True)
    loss = losses.fair_crps(changed_members, changed_target, mask)
    loss.backward()
    assert torch.equal(loss.detach(), reference.detach())
    assert torch.isfinite(changed_members.grad).all()


def test_fair_crps_needs_two_members_and_a_member_axis():
    members, target, mask = crps_inputs(2)
    with pytest.raises(ValueError, match="at least 2 members"):
        losses.fair_crps(members[:, :1], target, mask)
    with pytest.raises(ValueError, match="needs members"):
        losses.fair_crps(target, target, mask)
    assert losses.registered_losses(members=True) == list(losses.MEMBER_LOSSES)
    assert list(losses.MEMBER_LOSSES) == ["crps", "crps_rain"]
    assert "crps" not in losses.registered_losses()


def test_crps_rain_is_the_fair_crps_of_the_members_in_rain_rate():
    from nowcast.patches.normalization import Normalization
    from nowcast.training.step import build_loss

    members, target, mask = crps_inputs(3, seed=2)
    log1p = Normalization("log1p", {"scale": 4.0})
    config = parse_model(
        TrainConfig,
        {"model": {"name": "stochastic_convlstm"}, "loss": "crps_rain", "members": 3},
        "train",
    )
    loss_fn = build_loss(config, log1p, torch.device("cpu"))
    members.requires_grad_(True)
    actual = loss_fn(members, target, mask, log1p.inverse(target))
    expected = losses.fair_crps(log1p.inverse(members), log1p.inverse(target), mask)
    torch.testing.assert_close(actual, expected)
    # Not the normalised score: the members' errors weigh as they do in mm/h.
    assert not torch.isclose(actual, losses.fair_crps(members, target, mask))
    actual.backward()
    assert torch.isfinite(members.grad).all() and members.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the target in mm/h"):
        losses.fair_crps_rain(members, target, mask)


# ---- training ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"model": TINY_MODEL, "loss": "crps", "members": 1}, "is stochastic"),
        ({"model": TINY_MODEL, "loss": "mse", "members": 2}, "is stochastic"),
        ({"loss": "crps", "members": 2}, "needs a stochastic model"),
        ({"loss": "mse", "members": 2}, "needs a stochastic model"),
    ],
)
def test_members_loss_and_model_must_fit(section, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_model(TrainConfig, section, "experiment.yaml: section 'train'")
    assert "\n" not in str(error.value)


def step_parts(model: torch.nn.Module, lr: float = 1e-2) -> StepParts:
    config = TrainConfig(
        model=TINY_MODEL, loss="crps", members=2, optimizer={"lr": lr}, max_steps=10
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return StepParts.for_config(model, optimizer, config, LOG1P, torch.device("cpu"))


def test_one_training_step_lowers_the_crps_and_members_then_differ():
    model = tiny_model()
    parts = step_parts(model)
    assert parts.members == 2
    inputs = frames(batch=4)
    targets = 0.5 * inputs[:, -1:].expand(-1, N_TARGET, -1, -1, -1)  # the rain decays
    mask = torch.ones_like(targets)

    def crps() -> float:
        with torch.no_grad():
            members = model(inputs, n_members=8, generator=seeded(0))
            return losses.fair_crps(members, targets, mask).item()

    before = crps()
    first_loss = train_step(parts, inputs, targets, mask)
    # Before any step the members are all the baseline: the CRPS is its MAE.
    assert first_loss == pytest.approx(before, rel=1e-5)
    assert crps() < before
    for _ in range(3):
        train_step(parts, inputs, targets, mask)
    with torch.no_grad():
        members = model(inputs, n_members=2, generator=seeded(1))
    assert (members[:, 0] - members[:, 1]).abs().amax().item() > 1e-4
    # Validation scores MSE and CSI on the ensemble mean.
    torch.testing.assert_close(point_forecast(members, targets), members.mean(dim=1))
    assert point_forecast(targets, targets) is targets


@pytest.mark.parametrize("stop_at", [2, 3])  # mid-epoch, and at the end of epoch 1 (validated)
def test_training_with_members_resumes_exactly(store_root, tmp_path, stop_at):  # noqa: F811
    def experiment(run: str):
        return make_experiment(
            tmp_path,
            store=store_root,
            run=run,
            model=TINY_MODEL,
            loss="crps",
            members=2,
            epochs=2,
            checkpoint_every=1,
        )

    whole = run_training(experiment("whole"))
    assert whole["steps"] == 6 and whole["stop_reason"] == "epochs"
    assert math.isfinite(whole["val"]["loss"]) and whole["val"]["loss"] > 0
    assert whole["val"]["mse_mmh"] >= 0 and 0 <= whole["val"]["csi_1mmh"] <= 1
    val_rows = [row for row in read_log(tmp_path / "whole") if row["split"] == "val"]
    assert len(val_rows) == 2
    first = run_training(experiment("split"), stop_requested=lambda step: step == stop_at)
    assert first["steps"] == stop_at
    resumed = run_training(experiment("split"), resume=True)
    assert resumed["steps"] == 6
    split_state = load_checkpoint(checkpoint_path(tmp_path / "split"))["model_state"]
    whole_state = load_checkpoint(checkpoint_path(tmp_path / "whole"))["model_state"]
    assert_same_tensors(split_state, whole_state)
    assert read_log(tmp_path / "split", timings=False) == read_log(
        tmp_path / "whole", timings=False
    )
    # Training moved the zero head, and the trained members of one input differ.
    assert torch.any(whole_state["head.weight"] != 0)
    model, meta = load_model(checkpoint_path(tmp_path / "whole", "best"))
    assert isinstance(model, StochasticEncoderForecaster) and meta["config"]["members"] == 2
    with torch.no_grad():
        members = model(frames(batch=1), n_members=2, generator=seeded(0))
    assert (members[:, 0] - members[:, 1]).abs().amax().item() > 1e-5
