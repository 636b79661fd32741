"""model_steps: the deterministic model's forecast perturbed with STEPS noise (pysteps blending).

Runs on 128 x 128 crops of the real BoM day with the packaged checkpoint, 4 members and 3 lead
times.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

from nowcast.advection.motion import motion_field
from nowcast.config import ConfigError
from nowcast.evaluate.setup import MEMBER_KWARGS
from nowcast.nowcasts import model_steps
from nowcast.nowcasts.forecast import ENSEMBLE_DIMS, ensemble_size
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import get_method, uses_motion
from nowcast.nowcasts.runner import ForecastRun, forecast_inputs, forecast_window, model_method
from nowcast.nowcasts.seeds import window_seed
from nowcast.nowcasts.steps import FAILED_ATTR
from nowcast.sources.cube import open_cube

CHECKPOINT = str(Path(model_steps.__file__).parents[1] / "pretrained/bom_lagrangian_convlstm.pt")
N_MEMBERS = 4
N_LEADS = 3
N_INPUTS = 6
CROP = 128
REFERENCE = "2020-10-31T11:00"
#: The crop: rows and columns of a rainy block of the grid (about 90 % wet at REFERENCE).
ROWS, COLS = slice(0, CROP), slice(3 * CROP, 4 * CROP)
#: A no-data block put into the inputs (rows, columns of the crop).
NO_DATA = (slice(40, 60), slice(40, 60))


@pytest.fixture(scope="module")
def cube(bom_cube) -> xr.Dataset:
    return open_cube(bom_cube)


@pytest.fixture(scope="module")
def model():
    return model_method(CHECKPOINT, "cpu")


@pytest.fixture(scope="module")
def wet_inputs(cube) -> xr.DataArray:
    inputs = cube_inputs(cube, REFERENCE, N_INPUTS).isel(y=ROWS, x=COLS).copy()
    inputs.values[:, NO_DATA[0], NO_DATA[1]] = np.nan
    return inputs


@pytest.fixture(scope="module")
def velocity(wet_inputs) -> np.ndarray:
    return motion_field(wet_inputs.values)


@pytest.fixture(scope="module")
def skill_dirs() -> list[Path]:
    """The folders pysteps' skill files were written to (recorded while they existed)."""
    return []


@pytest.fixture(scope="module")
def ensemble(wet_inputs, velocity, model, skill_dirs) -> xr.DataArray:
    clim = model_steps.blending_steps.blending.clim
    save_skill = clim.save_skill

    def recording_save_skill(*args, outdir_path, **kwargs):
        save_skill(*args, outdir_path=outdir_path, **kwargs)
        assert any(Path(outdir_path).iterdir())
        skill_dirs.append(Path(outdir_path))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clim, "save_skill", recording_save_skill)
        return model_steps.forecast(
            wet_inputs, N_LEADS, model, n_ens_members=N_MEMBERS, seed=0, velocity=velocity
        )


def test_members_layout_values_and_no_data(wet_inputs, ensemble):
    assert ensemble.dims == ENSEMBLE_DIMS
    assert ensemble.shape == (N_MEMBERS, N_LEADS, CROP, CROP)
    assert ensemble.attrs["units"] == "mm h-1"
    assert ensemble.attrs["method"] == "model_steps"
    assert ensemble.attrs["window_seed"] == window_seed(0, "bom", wet_inputs["time"].values[-1])
    assert ensemble.attrs["model_checkpoint"] == CHECKPOINT
    assert FAILED_ATTR not in ensemble.attrs
    np.testing.assert_array_equal(
        ensemble["lead_time"].values, np.array([10, 20, 30], dtype="timedelta64[m]")
    )
    values = ensemble.values
    # NaN exactly on the last input frame's no-data area, in every member and lead time.
    no_data = np.zeros((CROP, CROP), dtype=bool)
    no_data[NO_DATA] = True
    np.testing.assert_array_equal(np.isnan(values), np.broadcast_to(no_data, values.shape))
    assert (values[..., ~no_data] >= 0).all()
    assert (values >= 1.0).any()
    for i in range(N_MEMBERS):
        for j in range(i + 1, N_MEMBERS):
            assert not np.array_equal(values[i], values[j], equal_nan=True)


def test_members_perturb_the_models_forecast_not_an_extrapolation(
    wet_inputs, velocity, model, ensemble
):
    deterministic = model(wet_inputs, N_LEADS, velocity=velocity).values
    persistence = np.broadcast_to(wet_inputs.values[-1], deterministic.shape)
    mean = ensemble.mean("realization").values
    valid = np.isfinite(mean) & np.isfinite(persistence)
    to_model = np.abs(mean - deterministic)[valid].mean()
    to_persistence = np.abs(mean - persistence)[valid].mean()
    assert to_model < to_persistence


def test_same_window_seed_gives_identical_members(wet_inputs, velocity, model, ensemble):
    again = model_steps.forecast(
        wet_inputs, N_LEADS, model, n_ens_members=N_MEMBERS, seed=0, velocity=velocity,
        num_workers=2,
    )  # fmt: skip
    np.testing.assert_array_equal(again.values, ensemble.values)
    later = wet_inputs.assign_coords(time=wet_inputs["time"].values + np.timedelta64(10, "m"))
    shifted = model_steps.forecast(
        later, N_LEADS, model, n_ens_members=N_MEMBERS, seed=0, velocity=velocity
    )
    assert shifted.attrs["window_seed"] != ensemble.attrs["window_seed"]
    assert not np.array_equal(shifted.values, ensemble.values, equal_nan=True)


def test_skill_files_go_to_a_temporary_folder_that_is_removed(ensemble, skill_dirs):
    assert skill_dirs, "pysteps wrote no skill file"
    for folder in skill_dirs:
        assert folder.name.startswith(model_steps.SKILL_DIR_PREFIX)
        assert not folder.exists()


def test_forecast_window_runs_model_steps_with_the_shared_motion(cube, model):
    assert isinstance(get_method("model_steps")(model=model), model_steps.ModelStepsNowcast)
    assert uses_motion("model_steps") and MEMBER_KWARGS["model_steps"] == "n_ens_members"
    crop = cube.isel(y=ROWS, x=COLS)
    run = ForecastRun(
        methods=("model_steps",),
        method_kwargs={"model_steps": {"n_ens_members": N_MEMBERS, "checkpoint": CHECKPOINT}},
        checkpoint=None,
        device="cpu",
        n_input_frames=N_INPUTS,
        n_leadtimes=N_LEADS,
        timestep_minutes=10,
    )
    window = forecast_window(crop, REFERENCE, run)
    assert window.motion is not None
    forecast = window.forecasts["model_steps"]
    assert forecast.dims == ENSEMBLE_DIMS and ensemble_size(forecast) == N_MEMBERS
    direct = model_steps.forecast(
        window.inputs, N_LEADS, model, n_ens_members=N_MEMBERS, velocity=window.motion
    )
    np.testing.assert_array_equal(forecast.values, direct.values)
    # Without a checkpoint of its own it takes the run's, and without either it says so.
    without = {"model_steps": {"n_ens_members": 2}}
    default = dataclasses.replace(run, method_kwargs=without, checkpoint=CHECKPOINT)
    forecast = forecast_inputs(window.inputs, default).forecasts["model_steps"]
    assert forecast.attrs["model_checkpoint"] == CHECKPOINT and ensemble_size(forecast) == 2
    with pytest.raises(ConfigError, match="model_steps"):
        forecast_inputs(window.inputs, dataclasses.replace(run, method_kwargs=without))


def test_a_stochastic_model_is_refused():
    stochastic = SimpleNamespace(stochastic=True, checkpoint="crps.pt", model_name="stochastic")
    with pytest.raises(ConfigError, match="crps.pt"):
        model_steps.ModelStepsNowcast(model=stochastic)


def test_a_window_pysteps_cannot_forecast_gives_named_zeros(wet_inputs, velocity, model):
    def failing(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_steps.blending_steps, "forecast", failing)
        zeros = model_steps.forecast(
            wet_inputs, N_LEADS, model, n_ens_members=2, seed=0, velocity=velocity
        )
    assert zeros.dims == ENSEMBLE_DIMS and ensemble_size(zeros) == 2
    assert "LinAlgError" in zeros.attrs[FAILED_ATTR]
    values = zeros.values
    no_data = values[..., NO_DATA[0], NO_DATA[1]]
    assert np.isnan(no_data).all() and np.isfinite(values).sum() == values.size - no_data.size
    assert np.nansum(values) == 0
