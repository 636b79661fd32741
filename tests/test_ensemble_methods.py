"""Ensemble and probability methods: STEPS, window seeds, exceedance and Lagrangian probabilities.

STEPS runs on 128 x 128 crops of the real BoM day with 4 members and 3 lead times.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from pysteps.nowcasts import lagrangian_probability as pysteps_lagrangian_probability
from pysteps.postprocessing.ensemblestats import excprob
from scipy import ndimage

from nowcast.advection.motion import motion_field
from nowcast.nowcasts import steps
from nowcast.nowcasts.forecast import ENSEMBLE_DIMS, ensemble_mean, ensemble_size, members
from nowcast.nowcasts.inputs import cube_inputs
from nowcast.nowcasts.interface import BASELINES, METHOD_NEEDS, get_method
from nowcast.nowcasts.probability import (
    PROBABILITY_DIMS,
    exceedance_probability,
    gz_slope,
    lagrangian_probability,
)
from nowcast.nowcasts.runner import ForecastRun, forecast_inputs
from nowcast.nowcasts.seeds import window_seed
from nowcast.sources.cube import open_cube

N_MEMBERS = 4
N_LEADS = 3
CROP = 128
#: A no-data block put into the wet window's inputs (rows, columns of the crop).
NO_DATA = (slice(40, 60), slice(40, 60))


def crop(cube, reference_time: str, row: int, col: int) -> xr.DataArray:
    """The 3 input frames of a window, cut to the 128 x 128 block (row, col) of the grid."""
    inputs = cube_inputs(cube, reference_time, 3)
    return inputs.isel(
        y=slice(row * CROP, (row + 1) * CROP), x=slice(col * CROP, (col + 1) * CROP)
    ).copy()


@pytest.fixture(scope="module")
def cube(bom_cube):
    return open_cube(bom_cube)


@pytest.fixture(scope="module")
def wet_inputs(cube) -> xr.DataArray:
    """A rainy window (about 90 % wet) with a static no-data block."""
    inputs = crop(cube, "2020-10-31T11:00", 0, 3)
    inputs.values[:, NO_DATA[0], NO_DATA[1]] = np.nan
    return inputs


@pytest.fixture(scope="module")
def ensemble(wet_inputs) -> xr.DataArray:
    return steps.forecast(wet_inputs, N_LEADS, n_ens_members=N_MEMBERS, seed=0)


def test_steps_members_layout_and_values(wet_inputs, ensemble):
    assert ensemble.dims == ENSEMBLE_DIMS
    assert ensemble.shape == (N_MEMBERS, N_LEADS, CROP, CROP)
    assert ensemble.dtype == np.float32
    np.testing.assert_array_equal(ensemble["realization"].values, np.arange(N_MEMBERS))
    np.testing.assert_array_equal(
        ensemble["lead_time"].values, np.array([10, 20, 30], dtype="timedelta64[m]")
    )
    assert ensemble["forecast_reference_time"].values == wet_inputs["time"].values[-1]
    np.testing.assert_array_equal(ensemble["x"].values, wet_inputs["x"].values)
    assert ensemble.attrs["method"] == "steps"
    assert ensemble.attrs["window_seed"] == window_seed(0, "bom", wet_inputs["time"].values[-1])
    assert "steps_failed" not in ensemble.attrs
    values = ensemble.values
    assert not np.isinf(values).any()
    assert (values[np.isfinite(values)] >= 0).all()
    assert (values >= 1.0).any()
    # The no-data area stays no data in every member and lead time.
    assert np.isnan(values[..., NO_DATA[0], NO_DATA[1]]).all()
    # Elsewhere NaN only where rain is advected in from outside the grid: bands on its edge.
    outside_data = np.isnan(values)
    outside_data[..., NO_DATA[0], NO_DATA[1]] = False
    for member in range(N_MEMBERS):
        for lead in range(N_LEADS):
            labels, _ = ndimage.label(outside_data[member, lead])
            border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
            assert set(np.unique(labels)) <= set(np.unique(border)) | {0}
            assert outside_data[member, lead].mean() < 0.5
    # The members differ from each other.
    for i in range(N_MEMBERS):
        for j in range(i + 1, N_MEMBERS):
            assert not np.array_equal(values[i], values[j], equal_nan=True)


def test_same_window_seed_gives_identical_members_on_any_schedule(wet_inputs, ensemble):
    again = steps.forecast(wet_inputs, N_LEADS, n_ens_members=N_MEMBERS, seed=0, num_workers=2)
    np.testing.assert_array_equal(again.values, ensemble.values)
    # The same frames at another reference time, or another run seed, draw other members.
    later = wet_inputs.assign_coords(time=wet_inputs["time"].values + np.timedelta64(10, "m"))
    shifted = steps.forecast(later, N_LEADS, n_ens_members=N_MEMBERS, seed=0)
    other_seed = steps.forecast(wet_inputs, N_LEADS, n_ens_members=N_MEMBERS, seed=1)
    for other in (shifted, other_seed):
        assert other.attrs["window_seed"] != ensemble.attrs["window_seed"]
        assert not np.array_equal(other.values, ensemble.values, equal_nan=True)


def test_window_seed_is_the_same_in_every_process():
    reference = "2020-10-31T11:00"
    seed = window_seed(7, "bom", reference)
    assert 0 <= seed < 2**32
    assert window_seed(7, "bom", pd.Timestamp(reference, tz="UTC")) == seed
    assert window_seed(7, "bom", np.datetime64(reference, "ns")) == seed
    assert len({seed, window_seed(8, "bom", reference), window_seed(7, "fmi", reference)}) == 3
    code = (
        "from nowcast.nowcasts.seeds import window_seed; "
        f"print(window_seed(7, 'bom', '{reference}'))"
    )
    # Another process, with another string hash than this one's.
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": str(hash("bom") % 1000 + 1)},
    )
    assert int(out.stdout.strip()) == seed


@pytest.mark.parametrize(
    ("reference_time", "row", "col"),
    [
        ("2020-10-31T17:00", 1, 2),  # a few wet pixels: pysteps raises
        ("2020-10-31T19:00", 2, 3),  # the second-last frame is dry, the last wet
    ],
)
def test_window_steps_cannot_forecast_gives_named_zeros(cube, reference_time, row, col):
    inputs = crop(cube, reference_time, row, col)
    wet = (inputs.values >= 0.1).sum(axis=(1, 2))
    assert 0 < wet[-1] < 0.01 * CROP * CROP
    result = steps.forecast(inputs, N_LEADS, n_ens_members=N_MEMBERS)
    assert result.attrs["steps_failed"]
    assert result.shape == (N_MEMBERS, N_LEADS, CROP, CROP)
    np.testing.assert_array_equal(result.values, 0.0)


def test_dry_window_is_a_forecast_not_a_failure(cube):
    inputs = crop(cube, "2020-10-31T09:00", 3, 0)
    assert not (inputs.values[-1] >= 0.1).any()
    result = steps.forecast(inputs, N_LEADS, n_ens_members=N_MEMBERS)
    assert "steps_failed" not in result.attrs
    np.testing.assert_array_equal(result.values, 0.0)


def test_exceedance_probability_is_pysteps_excprob(ensemble):
    thresholds = [1.0, 5.0, 10.0]
    probability = exceedance_probability(ensemble, thresholds)
    assert probability.dims == PROBABILITY_DIMS
    np.testing.assert_array_equal(probability["threshold"].values, thresholds)
    assert probability.attrs["ensemble_size"] == N_MEMBERS
    np.testing.assert_allclose(
        probability.values, excprob(ensemble.values, thresholds), rtol=0, atol=1e-7
    )
    lenient = exceedance_probability(ensemble, thresholds, ignore_nan=True)
    with np.errstate(invalid="ignore"):
        expected = excprob(ensemble.values, thresholds, ignore_nan=True)
    np.testing.assert_allclose(lenient.values, expected, rtol=0, atol=1e-7)
    # A deterministic forecast is a one-member ensemble: its events, 0 or 1.
    single = ensemble.isel(realization=0, drop=True)
    np.testing.assert_array_equal(
        exceedance_probability(single, [5.0]).values[0],
        np.where(np.isnan(single.values), np.nan, single.values >= 5.0),
    )


def test_members_and_ensemble_mean(ensemble):
    single = ensemble.isel(realization=0, drop=True)
    as_members = members(single)
    assert as_members.dims == ENSEMBLE_DIMS
    assert ensemble_size(single) == 1 and ensemble_size(ensemble) == N_MEMBERS
    np.testing.assert_array_equal(as_members["realization"].values, [0])
    np.testing.assert_array_equal(as_members.values[0], single.values)
    assert ensemble_mean(single) is single
    mean = ensemble_mean(ensemble)
    assert mean.dims == ("lead_time", "y", "x")
    np.testing.assert_allclose(mean.values, ensemble.values.mean(axis=0), rtol=1e-6)
    assert mean.attrs["ensemble_size"] == N_MEMBERS


def test_lagrangian_probability_is_pysteps_with_the_gz_slope(wet_inputs):
    velocity = motion_field(wet_inputs.values)
    result = lagrangian_probability(wet_inputs, N_LEADS, velocity=velocity)
    assert result.dims == PROBABILITY_DIMS
    assert result.shape == (3, N_LEADS, CROP, CROP)
    np.testing.assert_array_equal(result["threshold"].values, [1.0, 5.0, 10.0])
    assert result.attrs["method"] == "lagrangian_probability"
    # 1 km/min in pixels per timestep: 10 min over 0.5 km pixels.
    assert result.attrs["slope"] == gz_slope(10, 0.5) == 20.0
    values = result.values
    finite = np.isfinite(values)
    assert finite.any() and ((values[finite] >= 0) & (values[finite] <= 1)).all()
    assert np.isnan(values[..., NO_DATA[0], NO_DATA[1]]).all()
    # A higher threshold is no more likely.
    with np.errstate(invalid="ignore"):
        assert not (np.diff(values, axis=0) > 1e-6).any()
    last = np.nan_to_num(wet_inputs.values[-1].astype(np.float64), nan=0.0)
    expected = pysteps_lagrangian_probability.forecast(last, velocity, N_LEADS, 5.0, slope=20)
    expected[:, NO_DATA[0], NO_DATA[1]] = np.nan
    np.testing.assert_allclose(values[1], expected, rtol=0, atol=1e-6)


def test_registered_and_run_with_the_shared_motion(wet_inputs):
    assert get_method("steps") is steps.forecast
    assert get_method("lagrangian_probability") is lagrangian_probability
    for name in ("steps", "lagrangian_probability"):
        assert METHOD_NEEDS[name]["uses_motion"] and name in BASELINES
    run = ForecastRun(
        methods=("steps", "lagrangian_probability"),
        method_kwargs={"steps": {"n_ens_members": 2}},
        checkpoint=None,
        device=None,
        n_input_frames=3,
        n_leadtimes=N_LEADS,
        timestep_minutes=10,
    )
    window = forecast_inputs(wet_inputs, run)
    assert window.motion is not None
    assert window.forecasts["steps"].dims == ENSEMBLE_DIMS
    assert window.forecasts["lagrangian_probability"].dims == PROBABILITY_DIMS
    direct = steps.forecast(wet_inputs, N_LEADS, n_ens_members=2, velocity=window.motion)
    np.testing.assert_array_equal(window.forecasts["steps"].values, direct.values)
