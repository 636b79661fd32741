"""Lagrangian frame: persistence there is pysteps extrapolation; it removes the advection.

The shipped transport (:class:`nowcast.advection.lagrangian.LagrangianFrame` on
:mod:`nowcast.advection.warp`) is
checked against the full-resolution pysteps/scipy reference in ``lagrangian_reference``.
"""

from __future__ import annotations

import lagrangian_reference as reference
import numpy as np
import pandas as pd
import pytest
import torch
from pysteps import extrapolation

from nowcast.advection.lagrangian import LagrangianFrame
from nowcast.advection.motion import coarse_motion, coarse_motion_field, motion_field
from nowcast.patches.normalization import Normalization
from nowcast.sources.synthetic import SyntheticParams, synthetic_frame
from nowcast.training.checkpoint import TrainedOn
from nowcast.windows import FrameSpec


def _frames(n: int, shape=(96, 96)) -> np.ndarray:
    params = SyntheticParams(shape=shape, motion=(2.0, -1.0), seed=4, n_cells=16)
    start = pd.Timestamp("2000-01-01")
    return np.nan_to_num(
        np.stack(
            [synthetic_frame(start + pd.Timedelta(minutes=10 * k), params, 10) for k in range(n)]
        )
    )


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_coarse_motion_field_is_the_full_field_at_the_nodes(stride):
    """pysteps' IDW evaluated at the nodes only is the full-resolution LK field sampled there
    (the last node extrapolated alike), on a grid whose sides are not multiples of the stride."""
    frames = _frames(4, shape=(90, 77))
    frames[:, :5, :7] = np.nan  # no data in a corner
    direct = coarse_motion_field(frames, stride)
    sampled = coarse_motion(motion_field(frames), stride)
    assert direct.shape == sampled.shape and np.abs(sampled).max() > 0.5
    np.testing.assert_allclose(direct, sampled, rtol=0, atol=1e-5)


def test_coarse_motion_field_of_rainless_frames_is_zero():
    frames = np.zeros((3, 40, 50))
    np.testing.assert_array_equal(coarse_motion_field(frames, 8), np.zeros((2, 6, 8)))
    np.testing.assert_array_equal(motion_field(frames), np.zeros((2, 40, 50)))


def test_transport_is_the_pysteps_scipy_reference_at_full_resolution():
    """At stride 1 in float64 the torch transport reproduces pysteps' trajectories and scipy's
    reads to 1e-4 mm/h (the inputs with the reference's validity, the outputs forward)."""
    frames = _frames(9)
    frames[:, 40:44, 10:30] = np.nan  # a no-data strip the trajectories cross
    velocity = motion_field(frames[:6])
    frame = LagrangianFrame.of_inputs(frames[:6], 1, 6, velocity=velocity, dtype=torch.float64)
    moved = frame.inputs_to_lagrangian(frames[:6])
    expected, expected_valid = reference.lagrangian_window(frames[:6], 6, velocity)
    np.testing.assert_array_equal(np.isfinite(moved), expected_valid)
    np.testing.assert_allclose(moved[expected_valid], expected[expected_valid], atol=1e-4)
    outputs = np.nan_to_num(frames[6:]).astype(np.float32)  # a network's outputs are finite
    np.testing.assert_allclose(
        frame.outputs_from_lagrangian(outputs),
        reference.outputs_from_lagrangian(outputs, velocity),
        atol=1e-4,
    )
    backward = LagrangianFrame(-frame.coarse[0].numpy(), 1, (96, 96), 3, dtype=torch.float64)
    back = backward.outputs_from_lagrangian(np.nan_to_num(frames[6:]))
    expected_back = reference.move_frames(frames[6:], reference.window_moves(velocity, 0, 3))
    np.testing.assert_allclose(back, expected_back, atol=1e-4)


def test_lagrangian_persistence_is_pysteps_extrapolation():
    frames = _frames(4)
    velocity = motion_field(frames)
    frame = LagrangianFrame.of_inputs(frames, 1, 3, velocity=velocity, dtype=torch.float64)
    outputs = frame.outputs_from_lagrangian(np.repeat(frames[-1:], 3, axis=0))
    expected = extrapolation.get_method("semilagrangian")(frames[-1], velocity, 3, outval=0.0)
    np.testing.assert_allclose(outputs, np.nan_to_num(expected), atol=1e-4)


def test_lagrangian_frame_removes_advection():
    frames = _frames(9)
    frame = LagrangianFrame.of_inputs(frames[:6], 8, 5)
    inputs = frame.inputs_to_lagrangian(frames[:6])
    backward = LagrangianFrame(-frame.coarse[0].numpy(), 8, (96, 96), 3)  # targets go back
    targets = backward.outputs_from_lagrangian(frames[6:])
    assert inputs.shape == (6, 96, 96) and targets.shape == (3, 96, 96)
    np.testing.assert_array_equal(inputs[-1], frames[5].astype(np.float32))  # the reference
    # In the Lagrangian frame frames differ by growth/decay only: far closer to the last input.
    moved_in = np.nan_to_num(inputs[0])
    assert np.mean((moved_in - frames[5]) ** 2) < 0.6 * np.mean((frames[0] - frames[5]) ** 2)
    assert np.mean((targets[0] - frames[5]) ** 2) < 0.6 * np.mean((frames[6] - frames[5]) ** 2)


def test_coarse_motion_of_the_wrong_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        LagrangianFrame(np.zeros((2, 5, 5), np.float32), 8, (96, 96), 3)


@pytest.mark.parametrize("stride", [1, 8])
def test_untrained_residual_model_in_lagrangian_frame_is_extrapolation(stride):
    """Lagrangian persistence: pysteps' extrapolation to float32 transport rounding at stride 1,
    within the coarse grid's interpolation tolerance at stride 8."""
    import xarray as xr

    from nowcast.models.registry import build_model
    from nowcast.nowcasts.interface import get_method
    from nowcast.nowcasts.model import ModelNowcast

    frames = _frames(4).astype(np.float32)
    times = pd.date_range("2000-01-01", periods=4, freq="10min")
    inputs = xr.DataArray(
        frames,
        dims=("time", "y", "x"),
        coords={"time": times, "y": np.arange(96.0)[::-1] * 1000, "x": np.arange(96.0) * 1000},
        attrs={"crs_wkt": "EPSG:3035"},
    )
    model = build_model(
        "convlstm", 4, 3, patch_factor=2, hidden_channels=(4,), kernel_sizes=(3,), residual=True
    )
    method = ModelNowcast(
        model=model,
        trained_on=TrainedOn(
            Normalization("log1p", {"scale": 4.0}),
            FrameSpec(n_input=4, n_target=3, timestep=10),
            reference_frame="lagrangian",
            motion_node_spacing=stride,
        ),
    )
    forecast = method(inputs, 3)
    expected = get_method("extrapolation")(inputs, 3)
    valid = np.isfinite(expected.values)
    errors = np.abs(forecast.values[valid] - expected.values[valid])
    if stride == 1:
        assert errors.max() < 2e-3, errors.max()
    else:
        assert errors.mean() < 0.05 and errors.max() < 2.0, (errors.mean(), errors.max())
    # A motion field passed in (as evaluate shares it) gives the same forecast.
    shared = method(inputs, 3, velocity=motion_field(inputs.values))
    np.testing.assert_allclose(shared.values, forecast.values, atol=1e-5)


def test_torch_trajectories_are_pysteps_trajectories():
    """nowcast.advection.warp integrates the semi-Lagrangian displacements as pysteps does
    (float64, the
    full-resolution motion as its own coarse grid); a linear field survives any coarsening."""
    import torch

    from nowcast.advection.warp import displacements as torch_displacements
    from nowcast.advection.warp import motion_at

    frames = _frames(4)
    velocity = motion_field(frames)
    np.testing.assert_allclose(coarse_motion(velocity, 1), velocity, atol=1e-5)
    full = torch.from_numpy(velocity[None])
    rows, cols = np.indices((96, 96), dtype=np.float64)
    points = torch.from_numpy(np.stack([cols, rows], -1)[None])
    expected = reference.displacements(velocity, 3)
    for step, moved in enumerate(torch_displacements(full, 1, (96, 96), points, 3)):
        np.testing.assert_allclose(moved[0].permute(2, 0, 1).numpy(), expected[step], atol=1e-9)
    linear = np.stack([0.01 * cols + 0.5, -0.02 * rows + 0.003 * cols])
    coarse = torch.from_numpy(coarse_motion(linear, 8)[None].astype(np.float64))
    anywhere = points + torch.tensor([0.37, -0.61], dtype=torch.float64)
    inside = anywhere.clamp(0, 95)
    values = motion_at(coarse, 8, (96, 96), anywhere)[0].numpy()
    x, y = inside[0, ..., 0].numpy(), inside[0, ..., 1].numpy()
    np.testing.assert_allclose(values, np.stack([0.01 * x + 0.5, -0.02 * y + 0.003 * x]), atol=1e-5)


def test_warp_frames_is_map_coordinates_on_per_frame_boxes():
    """warp_frames (float32 grid_sample of one box per frame) reads what scipy's
    map_coordinates(order=1, mode="constant") reads on the full domain, to float32 rounding,
    at points near and beyond the domain edge too; the reference frame is the patch exactly."""
    import torch
    from scipy.ndimage import map_coordinates

    from nowcast.advection.warp import VALID_THRESHOLD, frame_boxes, warp_frames

    rng = np.random.default_rng(0)
    domain, n_frames, reference, size = (40, 50), 3, 1, 8
    rain = rng.gamma(0.5, 4.0, (2, n_frames, *domain))
    rain[rng.random(rain.shape) < 0.05] = np.nan
    rows, cols = np.indices((size, size))
    origins = np.array([[0, 42], [20, 10]])  # (row, column); the first touches two edges
    jitter = rng.uniform(-3.3, 3.3, (2, n_frames, size, size, 2))
    jitter[:, reference] = 0.0
    where = np.stack([cols, rows], -1) + origins[:, None, None, None, ::-1] + jitter
    where = torch.from_numpy(where.astype(np.float32))
    low, high = frame_boxes(where, domain)
    height, width = (high - low).amax((0, 1)).tolist()
    boxes = torch.full((2, n_frames, height, width), torch.nan)
    for k in range(2):
        for t in range(n_frames):
            (r0, c0), (r1, c1) = low[k, t].tolist(), high[k, t].tolist()
            boxes[k, t, : r1 - r0, : c1 - c0] = torch.from_numpy(rain[k, t, r0:r1, c0:c1])
    moved, valid = warp_frames(boxes, low, where, domain, reference + 1, lambda values: values)
    for k, (r0, c0) in enumerate(origins):
        patch = rain[k, reference, r0 : r0 + size, c0 : c0 + size]
        np.testing.assert_array_equal(valid[k, reference].numpy(), np.isfinite(patch))
        np.testing.assert_array_equal(moved[k, reference].numpy(), patch.astype(np.float32))
        for t in range(n_frames):
            at = where[k, t].double().numpy()[..., ::-1].reshape(-1, 2).T
            expected = map_coordinates(np.nan_to_num(rain[k, t]), at, order=1, cval=0.0)
            validity = map_coordinates(np.isfinite(rain[k, t]) * 1.0, at, order=1, cval=0.0)
            expected_valid = (validity.reshape(size, size) > VALID_THRESHOLD) & np.isfinite(patch)
            np.testing.assert_array_equal(valid[k, t].numpy(), expected_valid)
            got = moved[k, t].numpy()[expected_valid]
            np.testing.assert_allclose(got, expected.reshape(size, size)[expected_valid], atol=1e-4)


def test_frame_boxes_stay_in_the_domain_when_every_point_is_outside():
    """Trajectories that all left past the first row and column still get a one-pixel box
    inside the domain (a box ending at or before 0 would be a negative, wrapping slice)."""
    import torch

    from nowcast.advection.warp import frame_boxes

    where = torch.full((1, 2, 4, 4, 2), -5.0)  # every (x, y) left of and above the domain
    where[0, 1] = 3.0  # a second frame inside it
    low, high = frame_boxes(where, (10, 12))
    assert (low >= 0).all() and (high > low).all()
    assert (high[..., 0] <= 10).all() and (high[..., 1] <= 12).all()
    assert low[0, 0].tolist() == [0, 0] and high[0, 0].tolist() == [1, 1]


@pytest.mark.realdata
def test_pretrained_nowcast_matches_the_full_resolution_transport_on_bom(catalog):
    """The shipped model's BoM nowcast (coarse motion at the checkpoint's stride, float32 torch
    transport) against the transport it replaced (full-resolution LK motion, pysteps
    trajectories, scipy reads): within the coarse grid's interpolation tolerance, as the patch
    store's load-time warp is (tests/test_patch_store.py).

    Measured at 2020-10-31 08:50 UTC: max 9.2 mm/h (at the sharp edges of convective cells),
    99th percentile 0.61 mm/h, mean 0.037 mm/h; CSI of one against the other 0.96 at 5 and
    10 mm/h.
    """
    from nowcast.nowcasts.model import ModelNowcast
    from nowcast.predict import inputs_from_files
    from nowcast.training.checkpoint import PRETRAINED_CHECKPOINT

    frames = inputs_from_files(catalog, "bom", pd.Timestamp("2020-10-31 08:50"), 6, 10)
    rain_rate = frames.values.astype(np.float32)
    method = ModelNowcast(PRETRAINED_CHECKPOINT, device="cpu")
    assert method.reference_frame == "lagrangian" and method.motion_node_spacing == 8
    new = method.predict_values(rain_rate)

    # The replaced transport: full-resolution motion, inputs NaN at their own no-data pixels.
    clipped = np.clip(rain_rate, 0.0, None)
    velocity = motion_field(clipped)
    moved = reference.move_frames(clipped, reference.window_moves(velocity, 6, 0))
    moved[~np.isfinite(clipped)] = np.nan
    normalized = np.nan_to_num(method.normalization.forward(moved)).astype(np.float32)
    with torch.no_grad():
        output = method.model(torch.from_numpy(normalized)[None, :, None])[0, :, 0]
    lagrangian = method.normalization.inverse(output).clamp(min=0.0).numpy()
    old = reference.outputs_from_lagrangian(lagrangian, velocity)

    inside = np.isfinite(rain_rate[-1])
    errors = np.abs(new - old)[:, inside]
    assert errors.mean() < 0.1 and np.quantile(errors, 0.99) < 1.5 and errors.max() < 30.0
    for threshold in (1.0, 5.0, 10.0):
        a, b = new[:, inside] >= threshold, old[:, inside] >= threshold
        assert b.sum() > 1000  # a rainy case
        assert (a & b).sum() / (a | b).sum() > 0.9, threshold
