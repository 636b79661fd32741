"""Lagrangian frame: persistence there is pysteps extrapolation; it removes the advection."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pysteps import extrapolation

from nowcast.io.synthetic import SyntheticParams, synthetic_frame
from nowcast.lagrangian import (
    coarse_motion,
    displacements,
    inputs_to_lagrangian,
    motion_field,
    outputs_from_lagrangian,
    targets_to_lagrangian,
)


def _frames(n: int) -> np.ndarray:
    params = SyntheticParams(shape=(96, 96), motion=(2.0, -1.0), seed=4, n_cells=16)
    start = pd.Timestamp("2000-01-01")
    return np.nan_to_num(
        np.stack(
            [synthetic_frame(start + pd.Timedelta(minutes=10 * k), params, 10) for k in range(n)]
        )
    )


def test_lagrangian_persistence_is_pysteps_extrapolation():
    frames = _frames(4)
    velocity = motion_field(frames)
    outputs = outputs_from_lagrangian(np.repeat(frames[-1:], 3, axis=0), velocity)
    expected = extrapolation.get_method("semilagrangian")(frames[-1], velocity, 3, outval=0.0)
    np.testing.assert_allclose(outputs, np.nan_to_num(expected), atol=1e-10)


def test_lagrangian_frame_removes_advection():
    frames = _frames(9)
    velocity = motion_field(frames[:6])
    inputs = inputs_to_lagrangian(frames[:6], velocity)
    targets = targets_to_lagrangian(frames[6:], velocity)
    assert inputs.shape == (6, 96, 96) and targets.shape == (3, 96, 96)
    np.testing.assert_array_equal(inputs[-1], frames[5])  # the reference frame stays put
    # In the Lagrangian frame frames differ by growth/decay only: far closer to the last input.
    assert np.mean((inputs[0] - frames[5]) ** 2) < 0.6 * np.mean((frames[0] - frames[5]) ** 2)
    assert np.mean((targets[0] - frames[5]) ** 2) < 0.6 * np.mean((frames[6] - frames[5]) ** 2)


def test_untrained_residual_model_in_lagrangian_frame_is_extrapolation():
    import xarray as xr

    from nowcast.models import build_model
    from nowcast.nowcasts import get_method
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
        normalization={"method": "log1p", "params": {"scale": 4.0}},
        n_input_frames=4,
        timestep_minutes=10,
        frame="lagrangian",
    )
    forecast = method(inputs, 3)
    reference = get_method("extrapolation")(inputs, 3)
    valid = np.isfinite(reference.values)
    np.testing.assert_allclose(forecast.values[valid], reference.values[valid], atol=1e-4)
    # A motion field passed in (as evaluate shares it) gives the same forecast.
    shared = method(inputs, 3, velocity=motion_field(inputs.values))
    np.testing.assert_array_equal(shared.values, forecast.values)


def test_torch_trajectories_are_pysteps_trajectories():
    """nowcast.warp integrates the semi-Lagrangian displacements as pysteps does (float64, the
    full-resolution motion as its own coarse grid); a linear field survives any coarsening."""
    import torch

    from nowcast.warp import displacements as torch_displacements
    from nowcast.warp import motion_at

    frames = _frames(4)
    velocity = motion_field(frames)
    np.testing.assert_allclose(coarse_motion(velocity, 1), velocity, atol=1e-5)
    full = torch.from_numpy(velocity[None])
    rows, cols = np.indices((96, 96), dtype=np.float64)
    points = torch.from_numpy(np.stack([cols, rows], -1)[None])
    expected = displacements(velocity, 3)
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

    from nowcast.warp import VALID_THRESHOLD, frame_boxes, warp_frames

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

    from nowcast.warp import frame_boxes

    where = torch.full((1, 2, 4, 4, 2), -5.0)  # every (x, y) left of and above the domain
    where[0, 1] = 3.0  # a second frame inside it
    low, high = frame_boxes(where, (10, 12))
    assert (low >= 0).all() and (high > low).all()
    assert (high[..., 0] <= 10).all() and (high[..., 1] <= 12).all()
    assert low[0, 0].tolist() == [0, 0] and high[0, 0].tolist() == [1, 1]
