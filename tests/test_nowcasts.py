"""Tests of the forecast methods (nowcast.nowcasts)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from pysteps import motion
from pysteps import nowcasts as pysteps_nowcasts
from pysteps.utils.transformation import dB_transform

from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import get_method, registered_methods
from nowcast.nowcasts.model import ModelNowcast
from nowcast.patches.normalization import Normalization
from nowcast.sources.synthetic import SyntheticParams, synthetic_frame, synthetic_grid
from nowcast.training.checkpoint import TrainedOn
from nowcast.windows import FrameSpec

TIMESTEP = 10
MOTION = (2.0, -1.0)  # pixels per timestep, +x east, +y down


def synthetic_frames(n_frames: int, shape=(128, 128), seed: int = 3) -> xr.DataArray:
    """Frames of the synthetic source (known uniform motion) as forecast inputs."""
    params = SyntheticParams(shape=shape, motion=MOTION, seed=seed, n_frames=n_frames, n_cells=10)
    grid = synthetic_grid(params)
    times = pd.date_range(params.start, periods=n_frames, freq=f"{TIMESTEP}min")
    values = np.stack([synthetic_frame(t, params, TIMESTEP) for t in times])
    return xr.DataArray(
        values,
        dims=("time", "y", "x"),
        coords={"time": times.values, "y": grid.y, "x": grid.x},
        attrs={"crs_wkt": grid.crs_wkt},
    )


@pytest.fixture(scope="module")
def frames() -> xr.DataArray:
    """10 frames: 4 inputs, 6 observations."""
    return synthetic_frames(10)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_registry_lists_methods_for_unknown_name():
    names = [
        "ensemble",
        "extrapolation",
        "lagrangian_probability",
        "model",
        "model_steps",
        "persistence",
        "sprog",
        "steps",
    ]
    assert registered_methods() == names
    with pytest.raises(ValueError, match=", ".join(names)):
        get_method("nosuchmethod")
    assert get_method("Persistence") is get_method("persistence")


def test_persistence_repeats_last_frame_with_forecast_coordinates(frames):
    inputs = frames[:4]
    forecast = get_method("persistence")(inputs, 3)
    assert forecast.dims == ("lead_time", "y", "x")
    assert forecast.dtype == np.float32
    np.testing.assert_array_equal(
        forecast.values, np.repeat(inputs.values[-1:].astype(np.float32), 3, axis=0)
    )
    assert forecast["forecast_reference_time"].values == inputs["time"].values[-1]
    np.testing.assert_array_equal(
        forecast["lead_time"].values, np.array([10, 20, 30], dtype="timedelta64[m]")
    )
    np.testing.assert_array_equal(
        forecast["time"].values, inputs["time"].values[-1] + forecast["lead_time"].values
    )
    assert forecast.attrs["crs_wkt"] == inputs.attrs["crs_wkt"]
    assert forecast.attrs["method"] == "persistence"
    # The radar's no-data area (NaN outside range) stays no-data.
    assert np.isnan(inputs.values[-1]).any()
    np.testing.assert_array_equal(np.isnan(forecast.values[0]), np.isnan(inputs.values[-1]))


def test_single_frame_needs_timestep(frames):
    with pytest.raises(ValueError, match="timestep_minutes"):
        get_method("persistence")(frames[:1], 2)
    forecast = get_method("persistence")(frames[:1], 2, timestep_minutes=5)
    np.testing.assert_array_equal(
        forecast["lead_time"].values, np.array([5, 10], dtype="timedelta64[m]")
    )


def test_irregular_input_times_are_refused(frames):
    with pytest.raises(ValueError, match="not regular"):
        get_method("persistence")(frames.isel(time=[0, 1, 3]), 2)


def mse(forecast: np.ndarray, observed: np.ndarray) -> np.ndarray:
    valid = np.isfinite(forecast) & np.isfinite(observed)
    return np.array(
        [np.mean((f[v] - o[v]) ** 2) for f, o, v in zip(forecast, observed, valid, strict=True)]
    )


def test_extrapolation_beats_persistence_on_known_motion(frames):
    inputs, observed = frames[:4], frames.values[4:]
    extrapolated = get_method("extrapolation")(inputs, 6)
    persisted = get_method("persistence")(inputs, 6)
    lead_minutes = extrapolated["lead_time"].values / np.timedelta64(1, "m")
    later = lead_minutes >= 30
    assert np.all(
        mse(extrapolated.values, observed)[later] < mse(persisted.values, observed)[later]
    )


def test_motion_field_recovers_the_synthetic_motion(frames):
    from nowcast.advection.motion import motion_field

    velocity = motion_field(frames.values[:4])
    wet = frames.values[3] > 1.0
    estimated = np.array([np.mean(velocity[0][wet]), np.mean(velocity[1][wet])])
    # Lucas-Kanade on growing and decaying cells gets the direction right and the speed roughly.
    cosine = estimated @ MOTION / (np.linalg.norm(estimated) * np.linalg.norm(MOTION))
    assert cosine > 0.95
    assert 0.6 < np.linalg.norm(estimated) / np.linalg.norm(MOTION) < 1.4


def test_extrapolation_matches_direct_pysteps_call(frames):
    inputs = frames[:4]
    # The pysteps example recipe, written out with pysteps' own functions.
    db, _ = dB_transform(inputs.values[-3:].astype(np.float64), threshold=0.1, zerovalue=-15.0)
    db[~np.isfinite(db)] = -15.0
    velocity = motion.get_method("LK")(db)
    last = np.nan_to_num(inputs.values[-1].astype(np.float64), nan=0.0)
    expected = pysteps_nowcasts.get_method("extrapolation")(last, velocity, 6)
    expected[:, np.isnan(inputs.values[-1])] = np.nan

    forecast = get_method("extrapolation")(inputs, 6)
    np.testing.assert_allclose(forecast.values, expected.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert forecast.attrs["method"] == "extrapolation"


def test_extrapolation_needs_three_frames(frames):
    with pytest.raises(ValueError, match="3 input frames"):
        get_method("extrapolation")(frames[:2], 2)


def test_sprog_is_finite_where_the_input_is(frames):
    from nowcast.advection.motion import motion_field

    inputs = frames[:4]
    n_leadtimes = 3
    forecast = get_method("sprog")(inputs, n_leadtimes, n_cascade_levels=4)
    assert forecast.shape == (n_leadtimes,) + inputs.shape[1:]
    has_data = np.isfinite(inputs.values[-1])
    assert np.isnan(forecast.values[:, ~has_data]).all()
    # Pixels advected from outside the grid are NaN (pysteps' outval); away from the grid edge
    # the forecast is finite wherever the last input has data.
    speed = np.abs(motion_field(inputs.values)).max()
    margin = int(np.ceil(n_leadtimes * speed)) + 2
    inside = np.zeros_like(has_data)
    inside[margin:-margin, margin:-margin] = True
    assert np.isfinite(forecast.values[:, has_data & inside]).all()
    assert (forecast.values[:, has_data & inside] >= 0).all()
    # A smoothed advection of rain: it rains where the observation rains, mostly.
    observed_rain = frames.values[4] > 1.0
    assert np.mean(forecast.values[0][observed_rain] > 0.1) > 0.8


# ---- the model method ------------------------------------------------------------------------

N_INPUT, N_TARGET = 4, 3
TINY_KWARGS = {"patch_factor": 4, "hidden_channels": [4], "kernel_sizes": 3}
NORMALIZATION = Normalization("log1p", {"scale": 3.5, "percentile": 99.9})


def tiny_model(n_input_frames: int = N_INPUT, n_target_frames: int = N_TARGET):
    from nowcast.models.registry import build_model

    torch.manual_seed(0)
    return build_model("convlstm", n_input_frames, n_target_frames, **TINY_KWARGS)


def save_tiny_checkpoint(path, model, normalization: Normalization = NORMALIZATION) -> None:
    """A checkpoint of an untrained tiny ConvLSTM, written through nowcast.training.checkpoint."""
    from nowcast.training.checkpoint import make_checkpoint, save_checkpoint

    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = make_checkpoint(
        model=model,
        optimizer=optimizer,
        scheduler_state={},
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        config={},
        experiment="test",
        model_name="convlstm",
        model_kwargs=TINY_KWARGS,
        trained_on=TrainedOn(
            normalization,
            FrameSpec(model.n_input_frames, model.n_target_frames, TIMESTEP),
        ),
        step=0,
        epoch=0,
        batch_index=0,
        best_metric=float("inf"),
    )
    save_checkpoint(path, checkpoint)


def test_model_method_from_checkpoint(frames, tmp_path):
    model = tiny_model()
    path = tmp_path / "best.pt"
    save_tiny_checkpoint(path, model)
    method = get_method("model")(checkpoint=path, device="cpu")
    inputs = frames[:6]  # more frames than the model reads: it takes the last N_INPUT
    forecast = method(inputs, 2)

    assert forecast.dims == ("lead_time", "y", "x")
    assert forecast.shape == (2,) + inputs.shape[1:]
    np.testing.assert_array_equal(
        forecast["lead_time"].values, np.array([10, 20], dtype="timedelta64[m]")
    )
    assert forecast["forecast_reference_time"].values == inputs["time"].values[-1]
    no_data = np.isnan(inputs.values[-1])
    assert np.isnan(forecast.values[:, no_data]).all()
    assert np.isfinite(forecast.values[:, ~no_data]).all()
    assert (forecast.values[:, ~no_data] >= 0).all()

    # Same as normalizing by hand (NaN -> 0), running the network and transforming back.
    scale = NORMALIZATION.params["scale"]
    normalized = np.nan_to_num(np.log1p(inputs.values[-N_INPUT:]) / scale, nan=0.0)
    with torch.no_grad():
        output = model.eval()(torch.from_numpy(normalized.astype(np.float32))[None, :, None])
    expected = np.clip(np.expm1(output[0, :2, 0].numpy() * scale), 0, None)
    np.testing.assert_allclose(forecast.values[:, ~no_data], expected[:, ~no_data], rtol=1e-5)


def test_model_method_from_memory_and_its_limits(frames):
    method = ModelNowcast(
        model=tiny_model(),
        trained_on=TrainedOn(NORMALIZATION, FrameSpec(N_INPUT, N_TARGET, TIMESTEP)),
        device="cpu",
    )
    assert method(frames[:4], 3).shape == (3,) + frames.shape[1:]
    with pytest.raises(ValueError, match="predicts 3 lead times"):
        method(frames[:4], 4)
    with pytest.raises(ValueError, match="needs 4 input frames"):
        method(frames[:3], 1)
    with pytest.raises(ValueError, match="trained on 10-minute frames"):
        method(frames.isel(time=[0, 2, 4, 6]), 1)
    with pytest.raises(ValueError, match="either a checkpoint"):
        ModelNowcast()


def test_cube_inputs_reads_the_frames_before_the_reference_time(tmp_path):
    from conftest import synthetic_catalog

    from nowcast.sources.cube import open_cube
    from nowcast.sources.ingest import ingest

    catalog = synthetic_catalog(n_frames=8)
    path = ingest("synthetic", str(tmp_path), catalog=catalog, scheduler="threads", progress=False)
    cube = open_cube(path.path)
    reference = cube["time"].values[5]
    inputs = cube_inputs(cube, reference, 3)
    np.testing.assert_array_equal(inputs["time"].values, cube["time"].values[3:6])
    np.testing.assert_array_equal(inputs.values, cube["rain_rate"].values[3:6])
    assert inputs.attrs["crs_wkt"] == cube["crs"].attrs["crs_wkt"]
    forecast = get_method("persistence")(inputs, 2)
    assert forecast.attrs["radar_source"] == "synthetic"
    with pytest.raises(KeyError):
        cube_inputs(cube, cube["time"].values[-1] + np.timedelta64(10, "m"), 2)


def test_pysteps_imports_without_its_banner():
    """Importing the modules that use pysteps prints nothing; pysteps alone prints its banner."""
    import subprocess
    import sys

    modules = (
        "nowcast.advection.motion",
        "nowcast.nowcasts.extrapolation",
        "nowcast.nowcasts.persistence",
        "nowcast.nowcasts.sprog",
        "nowcast.nowcasts.variants",
        "nowcast.verification",
        "nowcast.sources.readers",
    )
    code = f"import {', '.join(modules)}, pysteps; print(pysteps.rcparams['silent_import'])"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert quiet.stdout == "False\n"  # nothing else on stdout; pysteps' own setting is untouched
    loud = subprocess.run(
        [sys.executable, "-c", "import pysteps"], capture_output=True, text=True, check=True
    )
    assert "Pysteps configuration file found" in loud.stdout  # what import_pysteps captures


def test_every_pysteps_import_goes_through_import_pysteps():
    """Whichever module imports pysteps first in a process (a Dask worker's too) is quiet."""
    import ast
    from pathlib import Path

    import nowcast

    package = Path(nowcast.__file__).parent
    direct = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            direct += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "pysteps"]
    assert direct == []
    assert nowcast.import_pysteps("pysteps.motion").get_method("LK") is not None


def test_methods_declare_whether_they_use_motion():
    from nowcast.nowcasts.interface import METHOD_NEEDS, registered_methods, uses_motion

    assert set(METHOD_NEEDS) == set(registered_methods())
    assert uses_motion("extrapolation") and uses_motion("SPROG")
    assert not uses_motion("persistence") and not uses_motion("model")

    class Lagrangian:  # a built method says so itself, as a Lagrangian-frame model does
        uses_motion = True

    assert uses_motion("model", Lagrangian())


def test_pysteps_call_never_leaves_a_closed_clients_scheduler_configured():
    """A task still inside pysteps_call when its evaluation's client closes (another thread)
    must not put the distributed scheduler back into dask's global config."""
    import dask

    from nowcast.nowcasts.pysteps_call import pysteps_call

    with dask.config.set(scheduler="dask.distributed"):  # the client's setting
        with pysteps_call():
            assert dask.config.get("scheduler") == "synchronous"
        assert dask.config.get("scheduler") == "dask.distributed"  # restored while it lives
        with pysteps_call():
            dask.config.set(scheduler=None)  # the client closes meanwhile
        assert dask.config.get("scheduler", None) is None
