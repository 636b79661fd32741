"""Streaming verification scores: equality with pysteps, merging, bootstrap, tidy tables."""

from __future__ import annotations

import functools
import warnings

import numba
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pysteps.verification.detcatscores import det_cat_fct
from pysteps.verification.detcontscores import det_cont_fct
from pysteps.verification.spatialscores import fss_accum as pysteps_fss_accum
from pysteps.verification.spatialscores import fss_compute as pysteps_fss_compute
from pysteps.verification.spatialscores import fss_init as pysteps_fss_init

from nowcast.verification._accumulator import concat_starts, sum_starts, weighted_starts
from nowcast.verification.bootstrap import bootstrap_ci, bootstrap_difference, resampling_counts
from nowcast.verification.detcat import DEFAULT_SCORES as CAT_SCORES
from nowcast.verification.detcat import (
    contingency_accum,
    contingency_compute,
    contingency_counts,
    contingency_init,
    contingency_merge,
)
from nowcast.verification.detcont import (
    HKO7_THRESHOLDS,
    HKO7_WEIGHTS,
    ContinuousErrors,
    balanced_weights,
    continuous_accum,
    continuous_compute,
    continuous_init,
    continuous_merge,
    continuous_sums,
)
from nowcast.verification.interface import SCORE_COLUMNS, get_method, score_forecasts
from nowcast.verification.spatial import fss_accum, fss_compute, fss_init, fss_merge, fss_sums

SETTINGS = settings(max_examples=30, deadline=None)

# Values at and around the thresholds below, so that ties (value == threshold) occur often.
SPECIAL_VALUES = [0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, np.nan]
THRESHOLD_VALUES = [0.1, 0.5, 1.0, 2.0, 5.0]


def _element(dtype):
    width = 32 if dtype == np.float32 else 64
    return st.one_of(
        st.sampled_from(SPECIAL_VALUES), st.floats(0.0, 60.0, width=width), st.just(np.nan)
    )


@st.composite
def field_pairs(draw, with_starts=None):
    """Forecast/observation stacks ([n_starts,] n_leadtimes, y, x) with NaNs and ties."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if with_starts is None:
        with_starts = draw(st.booleans())
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    if with_starts:
        shape = (draw(st.integers(1, 3)),) + shape
    forecast = draw(hnp.arrays(dtype, shape, elements=_element(dtype)))
    observation = draw(hnp.arrays(dtype, shape, elements=_element(dtype)))
    return forecast, observation


thresholds_strategy = st.lists(
    st.one_of(st.sampled_from(THRESHOLD_VALUES), st.floats(0.0, 40.0)), min_size=1, max_size=4
)


def _frames(array):
    """Frames of a stack as a list, in C order of the leading axes."""
    return list(array.reshape((-1,) + array.shape[-2:]))


def _quiet(function, *args, **kwargs):
    """Call pysteps with its 0/0 and empty-mean warnings silenced."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return function(*args, **kwargs)


@SETTINGS
@given(field_pairs(with_starts=False), thresholds_strategy)
def test_contingency_scores_equal_pysteps_on_valid_pairs(pair, thresholds):
    forecast, observation = pair
    lead_times = np.arange(forecast.shape[0]) * 10.0
    table = contingency_accum(contingency_init(lead_times, thresholds), forecast, observation)
    scores = contingency_compute(table)
    for lead in range(forecast.shape[0]):
        valid = np.isfinite(forecast[lead]) & np.isfinite(observation[lead])
        for k, threshold in enumerate(thresholds):
            total = (
                table.hits[lead, k]
                + table.misses[lead, k]
                + table.false_alarms[lead, k]
                + table.correct_negatives[lead, k]
            )
            assert total == np.count_nonzero(valid)
            expected = _quiet(
                det_cat_fct,
                forecast[lead][valid],
                observation[lead][valid],
                threshold,
                scores=list(CAT_SCORES),
            )
            for name in CAT_SCORES:
                np.testing.assert_allclose(
                    scores[name][lead, k], expected[name], rtol=1e-6, equal_nan=True, err_msg=name
                )


@SETTINGS
@given(field_pairs(with_starts=False))
# A float32 square of 1e-45 underflows to 0 in pysteps, and must here too.
@example((np.zeros((1, 1, 1), np.float32), np.full((1, 1, 1), 1e-45, np.float32)))
# pysteps' float32 mean of (0, 1e-45) rounds to 0; a pooled float64 mean keeps half of 1e-45.
@example((np.zeros((1, 1, 2), np.float32), np.array([[[0, 1e-45]]], np.float32)))
def test_continuous_scores_equal_pysteps(pair):
    forecast, observation = pair
    lead_times = np.arange(forecast.shape[0]) * 10.0
    errors = continuous_accum(continuous_init(lead_times), forecast, observation)
    scores = continuous_compute(errors)
    for lead in range(forecast.shape[0]):
        n_valid = np.count_nonzero(np.isfinite(forecast[lead] - observation[lead]))
        assert errors.n[lead] == n_valid
        expected = _quiet(
            det_cont_fct, forecast[lead], observation[lead], scores=["ME", "MSE", "MAE"]
        )
        if n_valid == 0:
            # pysteps reports 0 without data (its running means start at 0); we report NaN.
            for name in ("ME", "MSE", "MAE", "BMSE", "BMAE"):
                assert np.isnan(scores[name][lead])
            continue
        # Below the data dtype's smallest subnormal, a float64 mean and pysteps' running mean in
        # the data dtype may differ: neither value is representable in the data.
        tiny = np.finfo(forecast.dtype).smallest_subnormal
        np.testing.assert_allclose(scores["MSE"][lead], expected["MSE"], rtol=1e-6, atol=tiny)
        np.testing.assert_allclose(scores["MAE"][lead], expected["MAE"], rtol=1e-6, atol=tiny)
        # The mean error can cancel to ~0, so its tolerance scales with the absolute error.
        np.testing.assert_allclose(
            scores["ME"][lead], expected["ME"], rtol=1e-6, atol=max(1e-6 * expected["MAE"], tiny)
        )
        np.testing.assert_allclose(scores["RMSE"][lead], np.sqrt(expected["MSE"]), rtol=1e-6)


@SETTINGS
@given(field_pairs(with_starts=False))
def test_balanced_scores_equal_weighted_means_over_valid_pairs(pair):
    forecast, observation = pair
    errors = continuous_accum(continuous_init(range(forecast.shape[0])), forecast, observation)
    scores = continuous_compute(errors, ("BMSE", "BMAE"))
    for lead in range(forecast.shape[0]):
        error = (forecast[lead] - observation[lead]).astype(np.float64)
        valid = np.isfinite(error)
        if not valid.any():
            continue
        weights = balanced_weights(observation[lead][valid].astype(np.float64))
        np.testing.assert_allclose(
            scores["BMSE"][lead], np.mean(weights * error[valid] ** 2), rtol=1e-5
        )
        np.testing.assert_allclose(
            scores["BMAE"][lead], np.mean(weights * np.abs(error[valid])), rtol=1e-5
        )


@st.composite
def fss_cases(draw):
    forecast, observation = draw(field_pairs(with_starts=True))
    thresholds = draw(thresholds_strategy)
    scales = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    return forecast, observation, thresholds, scales


@SETTINGS
@given(fss_cases())
def test_fss_equals_pysteps_pooled_over_starts(case):
    forecast, observation, thresholds, scales = case
    n_starts, n_leadtimes = forecast.shape[:2]
    sums = fss_accum(fss_init(range(n_leadtimes), thresholds, scales), forecast, observation)
    result = fss_compute(sums)["FSS"]
    assert result.shape == (n_leadtimes, len(thresholds), len(scales))
    for lead in range(n_leadtimes):
        for k, threshold in enumerate(thresholds):
            for m, scale in enumerate(scales):
                expected = pysteps_fss_init(threshold, scale)
                for start in range(n_starts):
                    pysteps_fss_accum(expected, forecast[start, lead], observation[start, lead])
                np.testing.assert_allclose(
                    result[lead, k, m],
                    _quiet(pysteps_fss_compute, expected),
                    rtol=1e-6,
                    atol=1e-12,
                    equal_nan=True,
                )


def test_fss_sums_equal_pysteps_for_even_zero_and_oversized_scales():
    # Even windows sit off centre, scale 0 means no smoothing, and a 60-pixel window is larger
    # than the 23 x 29 grid; NaN and inf are non-events. Window counts are exact, so the sums
    # agree with pysteps' filtered fractions to rounding.
    rng = np.random.default_rng(15)
    shape = (2, 23, 29)
    forecast = np.where(rng.random(shape) < 0.5, rng.gamma(0.6, 6.0, shape), 0.0)
    observation = np.where(rng.random(shape) < 0.5, rng.gamma(0.6, 6.0, shape), 0.0)
    forecast[0, 3:6, :4] = np.nan
    observation[1, -2:, 5] = np.inf
    thresholds, scales = [0.5, 2.0, 8.0], [0, 1, 2, 7, 10, 60]
    sums = fss_sums(forecast.astype(np.float32), observation.astype(np.float32), thresholds, scales)
    for lead in range(shape[0]):
        for k, threshold in enumerate(thresholds):
            for m, scale in enumerate(scales):
                expected = pysteps_fss_init(threshold, scale)
                pysteps_fss_accum(
                    expected,
                    forecast[lead].astype(np.float32),
                    observation[lead].astype(np.float32),
                )
                for name in ("sum_fct_sq", "sum_fct_obs", "sum_obs_sq"):
                    np.testing.assert_allclose(
                        sums[name][lead, k, m], expected[name], rtol=1e-12, atol=1e-12, err_msg=name
                    )


@st.composite
def start_splits(draw):
    """Two stacks sharing (n_leadtimes, y, x), with different numbers of starts."""
    forecast, observation = draw(field_pairs(with_starts=True))
    split = draw(st.integers(0, forecast.shape[0]))
    return forecast, observation, split


def _assert_same_sums(merged, whole, exact):
    for name in whole.additive_fields:
        if exact:
            np.testing.assert_array_equal(getattr(merged, name), getattr(whole, name))
        else:
            np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-9)


@SETTINGS
@given(start_splits(), thresholds_strategy)
def test_merge_of_two_parts_equals_accum_of_union(case, thresholds):
    forecast, observation, split = case
    lead_times = range(forecast.shape[1])
    scales = [1, 3]
    families = [
        (
            functools.partial(contingency_init, lead_times, thresholds),
            contingency_accum,
            contingency_merge,
            True,
        ),
        (functools.partial(continuous_init, lead_times), continuous_accum, continuous_merge, False),
        (functools.partial(fss_init, lead_times, thresholds, scales), fss_accum, fss_merge, False),
    ]
    for init, accum, merge, exact in families:
        whole = accum(init(), forecast, observation)
        first, second = init(), init()
        # An empty part contributes nothing, as a worker without data would.
        if split > 0:
            accum(first, forecast[:split], observation[:split])
        if split < forecast.shape[0]:
            accum(second, forecast[split:], observation[split:])
        _assert_same_sums(merge(first, second), whole, exact)


@SETTINGS
@given(field_pairs(with_starts=False), thresholds_strategy, st.data())
def test_contingency_merge_of_spatial_tiles_equals_whole_grid(pair, thresholds, data):
    forecast, observation = pair
    column = data.draw(st.integers(1, max(1, forecast.shape[-1] - 1)))
    if column >= forecast.shape[-1]:
        column = forecast.shape[-1]
    lead_times = range(forecast.shape[0])
    whole = contingency_accum(contingency_init(lead_times, thresholds), forecast, observation)
    left = contingency_accum(
        contingency_init(lead_times, thresholds), forecast[..., :column], observation[..., :column]
    )
    parts = [left]
    if column < forecast.shape[-1]:
        parts.append(
            contingency_accum(
                contingency_init(lead_times, thresholds),
                forecast[..., column:],
                observation[..., column:],
            )
        )
    merged = functools.reduce(contingency_merge, parts)
    _assert_same_sums(merged, whole, exact=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_contingency_counts_equal_per_threshold_counts_with_ties_and_nans(dtype):
    rng = np.random.default_rng(11)
    thresholds = [0.1, 1.0, 2.0, 5.0, 10.0]
    shape = (2, 3, 40, 37)
    # A third of the values sit exactly on a threshold (0.1 is not exact in float32), a few are
    # NaN or infinite, the rest are continuous.
    values = np.array(thresholds + [0.0, np.nan, np.inf], dtype=dtype)
    forecast = np.where(
        rng.random(shape) < 0.35, rng.choice(values, shape), rng.gamma(0.6, 4.0, shape)
    )
    observation = np.where(
        rng.random(shape) < 0.35, rng.choice(values, shape), rng.gamma(0.6, 4.0, shape)
    )
    forecast, observation = forecast.astype(dtype), observation.astype(dtype)
    counts = contingency_counts(forecast, observation, thresholds)
    for index in np.ndindex(shape[:2]):
        fct, obs = forecast[index], observation[index]
        valid = np.isfinite(fct) & np.isfinite(obs)
        for k, threshold in enumerate(thresholds):
            # The Python float threshold is compared in the data dtype, as pysteps does.
            fct_event, obs_event = fct[valid] > threshold, obs[valid] > threshold
            assert counts["hits"][index + (k,)] == np.sum(fct_event & obs_event)
            assert counts["misses"][index + (k,)] == np.sum(~fct_event & obs_event)
            assert counts["false_alarms"][index + (k,)] == np.sum(fct_event & ~obs_event)
            assert counts["correct_negatives"][index + (k,)] == np.sum(~fct_event & ~obs_event)


def test_continuous_sums_of_a_large_float32_frame_match_float64_sums():
    # Errors, their absolute values and squares are formed in float32, as in det_cont_fct, and
    # summed in float64: the sums agree with float64 sums of the same float32 terms to rounding.
    rng = np.random.default_rng(12)
    shape = (2, 300, 301)
    observation = np.where(rng.random(shape) < 0.4, rng.gamma(0.6, 8.0, shape), 0.0)
    forecast = observation + rng.normal(0.0, 1.0, shape)
    forecast[0, :5, :7] = np.nan
    forecast, observation = forecast.astype(np.float32), observation.astype(np.float32)
    sums = continuous_sums(forecast, observation)
    for lead in range(shape[0]):
        error = forecast[lead] - observation[lead]
        valid = np.isfinite(error)
        error = error[valid]
        absolute, squared = np.abs(error).astype(np.float64), (error * error).astype(np.float64)
        weights = balanced_weights(observation[lead][valid].astype(np.float64))
        assert sums["n"][lead] == valid.sum()
        # The signed errors cancel, so their tolerance scales with the absolute errors.
        np.testing.assert_allclose(
            sums["sum_error"][lead],
            error.astype(np.float64).sum(),
            rtol=0,
            atol=1e-12 * absolute.sum(),
        )
        np.testing.assert_allclose(sums["sum_absolute_error"][lead], absolute.sum(), rtol=1e-12)
        np.testing.assert_allclose(sums["sum_squared_error"][lead], squared.sum(), rtol=1e-12)
        np.testing.assert_allclose(
            sums["sum_weighted_absolute_error"][lead], (weights * absolute).sum(), rtol=1e-12
        )
        np.testing.assert_allclose(
            sums["sum_weighted_squared_error"][lead], (weights * squared).sum(), rtol=1e-12
        )


@pytest.fixture
def two_numba_threads():
    """Up to two numba threads (the kernels split frames over that many); restored after."""
    before = numba.get_num_threads()
    yield min(2, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(before)


def test_scores_do_not_depend_on_the_number_of_threads(two_numba_threads):
    # Six frames of 300 x 301 pixels are split over two threads, and 90300 pixels are not a
    # multiple of the kernel's 512-pixel block.
    rng = np.random.default_rng(13)
    shape = (3, 2, 300, 301)
    observation = np.where(rng.random(shape) < 0.4, rng.gamma(0.6, 8.0, shape), 0.0)
    forecast = np.where(rng.random(shape) < 0.7, observation, rng.gamma(0.6, 8.0, shape))
    forecast[0, 1, 100:140] = np.nan
    observation[2, 0, :, -3:] = np.inf
    forecast, observation = forecast.astype(np.float32), observation.astype(np.float32)
    thresholds = [0.1, 1.0, 2.0, 5.0, 10.0]
    results = {}
    for n_threads in (1, two_numba_threads):
        numba.set_num_threads(n_threads)
        results[n_threads] = (
            contingency_counts(forecast, observation, thresholds),
            continuous_sums(forecast, observation),
            fss_sums(forecast, observation, thresholds[1:3], [1, 6]),
        )
    for one_thread, threads in zip(results[1], results[two_numba_threads], strict=True):
        for name in one_thread:
            np.testing.assert_array_equal(threads[name], one_thread[name], err_msg=name)
    counts = results[1][0]
    for index in [(0, 1), (2, 0)]:
        fct, obs = forecast[index], observation[index]
        valid = np.isfinite(fct) & np.isfinite(obs)
        for k, threshold in enumerate(thresholds):
            fct_event, obs_event = fct[valid] > threshold, obs[valid] > threshold
            assert counts["hits"][index + (k,)] == np.sum(fct_event & obs_event)
            assert counts["correct_negatives"][index + (k,)] == np.sum(~fct_event & ~obs_event)


@pytest.mark.parametrize("dtype", [np.float16, np.int16])
def test_counts_and_sums_of_float16_and_integer_fields(dtype):
    # float16 is computed in float32 and integers in float64; thresholds are still compared in
    # the data's dtype: 0.3 is 0.300048828125 in float16, so a float16 value 0.3 is no event
    # above 0.3, where a float32 comparison would make it one.
    rng = np.random.default_rng(14)
    values = np.array([0, 0.1, 0.3, 1, 2, 5, 10, 30, 40], dtype=np.float64)
    forecast = rng.choice(values, (2, 9, 11)).astype(dtype)
    observation = rng.choice(values, (2, 9, 11)).astype(dtype)
    thresholds = [0.1, 0.3, 1.0, 5.0]
    counts = contingency_counts(forecast, observation, thresholds)
    sums = continuous_sums(forecast, observation)
    for lead in range(2):
        fct, obs = forecast[lead], observation[lead]
        for k, threshold in enumerate(thresholds):
            fct_event, obs_event = fct > threshold, obs > threshold
            assert counts["hits"][lead, k] == np.sum(fct_event & obs_event)
            assert counts["misses"][lead, k] == np.sum(~fct_event & obs_event)
            assert counts["false_alarms"][lead, k] == np.sum(fct_event & ~obs_event)
        error = fct.astype(np.float64) - obs.astype(np.float64)
        weights = balanced_weights(obs.astype(np.float64))
        assert sums["n"][lead] == error.size
        np.testing.assert_allclose(sums["sum_squared_error"][lead], np.sum(error**2), rtol=1e-6)
        np.testing.assert_allclose(
            sums["sum_weighted_absolute_error"][lead], np.sum(weights * np.abs(error)), rtol=1e-6
        )


def test_frames_without_valid_pairs_count_nothing():
    forecast = np.full((2, 5, 5), np.nan, dtype=np.float32)
    forecast[1] = 3.0
    observation = np.full((2, 5, 5), 3.0, dtype=np.float32)
    observation[1, 0, :2] = [np.inf, -np.inf]
    counts = contingency_counts(forecast, observation, [1.0, 3.0])
    sums = continuous_sums(forecast, observation)
    for name in ("hits", "misses", "false_alarms", "correct_negatives"):
        np.testing.assert_array_equal(counts[name][0], [0, 0])
    # Frame 1: 23 valid pairs of 3.0 and 3.0, an event above 1 and a tie (no event) at 3.
    np.testing.assert_array_equal(counts["hits"][1], [23, 0])
    np.testing.assert_array_equal(counts["correct_negatives"][1], [0, 23])
    np.testing.assert_array_equal(sums["n"], [0, 23])
    for name in ContinuousErrors.additive_fields[1:]:
        np.testing.assert_array_equal(sums[name], [0.0, 0.0], err_msg=name)
    scores = continuous_compute(
        continuous_accum(continuous_init([10, 20]), forecast, observation), ("MSE", "BMAE")
    )
    assert np.isnan(scores["MSE"][0]) and scores["MSE"][1] == 0.0
    assert np.isnan(scores["BMAE"][0])


def test_merge_leaves_inputs_unchanged_and_rejects_other_coordinates():
    rng = np.random.default_rng(1)
    forecast, observation = rng.gamma(0.5, 2.0, (2, 2, 6, 6))
    first = contingency_accum(contingency_init([10, 20], [1.0]), forecast, observation)
    second = contingency_accum(contingency_init([10, 20], [1.0]), observation, forecast)
    hits_before = first.hits.copy()
    merged = contingency_merge(first, second)
    np.testing.assert_array_equal(first.hits, hits_before)
    np.testing.assert_array_equal(merged.hits, first.hits + second.hits)
    with pytest.raises(ValueError, match="thresholds"):
        contingency_merge(first, contingency_init([10, 20], [2.0]))
    with pytest.raises(ValueError, match="cannot merge"):
        contingency_merge(first, continuous_init([10, 20]))


def _rain_stack(rng, n_starts, n_leadtimes=2, size=12, skill=0.7):
    """Observations and forecasts that share part of their pattern (non-trivial scores)."""
    shape = (n_starts, n_leadtimes, size, size)
    observation = np.where(rng.random(shape) < 0.4, rng.gamma(0.8, 3.0, shape), 0.0)
    noise = np.where(rng.random(shape) < 0.4, rng.gamma(0.8, 3.0, shape), 0.0)
    forecast = np.where(rng.random(shape) < skill, observation, noise)
    return forecast, observation


def test_per_start_accumulators_pool_to_the_pooled_accumulator():
    rng = np.random.default_rng(2)
    forecast, observation = _rain_stack(rng, n_starts=5)
    forecast[0, 1, :3] = np.nan
    lead_times, thresholds, scales = [10, 20], [0.5, 2.0], [1, 3]
    cases = [
        (functools.partial(contingency_init, lead_times, thresholds), contingency_accum),
        (functools.partial(continuous_init, lead_times), continuous_accum),
        (functools.partial(fss_init, lead_times, thresholds, scales), fss_accum),
    ]
    for init, accum in cases:
        pooled = accum(init(), forecast, observation)
        per_start = accum(init(n_starts=5), forecast, observation)
        assert per_start.n_starts == 5 and pooled.n_starts is None
        _assert_same_sums(sum_starts(per_start), pooled, exact=False)
        one_by_one = concat_starts([accum(init(), forecast[i], observation[i]) for i in range(5)])
        _assert_same_sums(one_by_one, per_start, exact=False)
        # A one-hot weight row picks exactly one start.
        picked = weighted_starts(per_start, np.eye(5)[[3]])
        for name in per_start.additive_fields:
            np.testing.assert_array_equal(getattr(picked, name)[0], getattr(per_start, name)[3])
        with pytest.raises(ValueError, match="start"):
            accum(init(n_starts=4), forecast, observation)


def test_bootstrap_interval_contains_estimate_and_repeats_with_seed():
    rng = np.random.default_rng(3)
    forecast, observation = _rain_stack(rng, n_starts=40)
    per_start = contingency_accum(
        contingency_init([10, 20], [0.5, 2.0, 5.0], n_starts=40), forecast, observation
    )
    intervals = bootstrap_ci(per_start, contingency_compute, n_boot=500, seed=7)
    pooled_scores = contingency_compute(sum_starts(per_start))
    assert set(intervals) == set(CAT_SCORES)
    for name, interval in intervals.items():
        np.testing.assert_array_equal(interval.estimate, pooled_scores[name])
        assert np.all(interval.lower <= interval.estimate), name
        assert np.all(interval.estimate <= interval.upper), name
        assert np.all(interval.lower < interval.upper), name
    again = bootstrap_ci(per_start, contingency_compute, n_boot=500, seed=7)
    other = bootstrap_ci(per_start, contingency_compute, n_boot=500, seed=8)
    for name in intervals:
        np.testing.assert_array_equal(again[name].lower, intervals[name].lower)
        np.testing.assert_array_equal(again[name].upper, intervals[name].upper)
    assert not np.array_equal(other["CSI"].lower, intervals["CSI"].lower)


def test_bootstrap_interval_narrows_with_more_starts():
    rng = np.random.default_rng(4)
    forecast, observation = _rain_stack(rng, n_starts=160)
    per_start = continuous_accum(continuous_init([10, 20], n_starts=160), forecast, observation)
    few = concat_starts(
        [
            continuous_accum(continuous_init([10, 20]), forecast[i], observation[i])
            for i in range(10)
        ]
    )
    wide = bootstrap_ci(few, continuous_compute, n_boot=400, seed=0)
    narrow = bootstrap_ci(per_start, continuous_compute, n_boot=400, seed=0)
    for name in ("MSE", "BMSE", "MAE"):
        assert np.all(narrow[name].upper - narrow[name].lower < wide[name].upper - wide[name].lower)


def test_paired_bootstrap_uses_the_same_resampled_starts():
    rng = np.random.default_rng(5)
    forecast, observation = _rain_stack(rng, n_starts=30)
    _, other_forecast = _rain_stack(rng, n_starts=30)
    lead_times, thresholds, scales = [10, 20], [1.0], [1, 3]
    method_a = fss_accum(
        fss_init(lead_times, thresholds, scales, n_starts=30), forecast, observation
    )
    method_b = fss_accum(
        fss_init(lead_times, thresholds, scales, n_starts=30), other_forecast, observation
    )

    itself = bootstrap_difference(method_a, method_a, fss_compute, n_boot=300, seed=1)["FSS"]
    for bound in (itself.estimate, itself.lower, itself.upper):
        assert np.all(bound == 0.0)

    difference = bootstrap_difference(method_a, method_b, fss_compute, n_boot=300, seed=1)["FSS"]
    counts = resampling_counts(30, n_boot=300, seed=1)
    samples = (
        fss_compute(weighted_starts(method_a, counts))["FSS"]
        - fss_compute(weighted_starts(method_b, counts))["FSS"]
    )
    np.testing.assert_allclose(difference.lower, np.quantile(samples, 0.025, axis=0))
    np.testing.assert_allclose(difference.upper, np.quantile(samples, 0.975, axis=0))
    pooled = fss_compute(sum_starts(method_a))["FSS"] - fss_compute(sum_starts(method_b))["FSS"]
    np.testing.assert_allclose(difference.estimate, pooled)
    with pytest.raises(ValueError, match="per-start"):
        bootstrap_ci(sum_starts(method_a), fss_compute)


def test_resampling_counts_draw_n_starts_per_sample():
    counts = resampling_counts(7, n_boot=50, seed=0)
    assert counts.shape == (50, 7)
    np.testing.assert_array_equal(counts.sum(axis=1), np.full(50, 7))
    np.testing.assert_array_equal(counts, resampling_counts(7, n_boot=50, seed=0))


def test_balanced_weights_at_bin_edges():
    rain_rate = [0.0, 0.49, 0.5, 1.99, 2.0, 4.99, 5.0, 9.99, 10.0, 29.99, 30.0, 120.0, np.nan]
    expected = [1, 1, 1, 1, 2, 2, 5, 5, 10, 10, 30, 30, np.nan]
    np.testing.assert_array_equal(balanced_weights(np.array(rain_rate)), expected)
    np.testing.assert_array_equal(balanced_weights(rain_rate), expected)
    as_tensor = balanced_weights(torch.tensor(rain_rate, dtype=torch.float32))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    np.testing.assert_array_equal(as_tensor.numpy(), np.array(expected, dtype=np.float32))
    assert HKO7_THRESHOLDS == (0.5, 2.0, 5.0, 10.0, 30.0)
    assert HKO7_WEIGHTS == (1.0, 1.0, 2.0, 5.0, 10.0, 30.0)


def test_balanced_scores_by_hand():
    # errors 1, -2, 0, 3 at observed rates 0, 3 (weight 2), 40 (weight 30), NaN (dropped)
    forecast = np.array([1.0, 1.0, 40.0, 3.0]).reshape(1, 2, 2)
    observation = np.array([0.0, 3.0, 40.0, np.nan]).reshape(1, 2, 2)
    scores = continuous_compute(continuous_accum(continuous_init([10]), forecast, observation))
    np.testing.assert_allclose(scores["BMSE"], [(1 * 1 + 2 * 4 + 30 * 0) / 3])
    np.testing.assert_allclose(scores["BMAE"], [(1 * 1 + 2 * 2 + 30 * 0) / 3])
    np.testing.assert_allclose(scores["MSE"], [5 / 3])
    np.testing.assert_allclose(scores["ME"], [-1 / 3])


def test_get_method_returns_families_and_lists_names_for_unknown():
    family = get_method("DET_CAT")
    assert family.compute is contingency_compute and family.merge is contingency_merge
    assert get_method("fss").init is fss_init
    with pytest.raises(ValueError, match="det_cat, det_cont, fss"):
        get_method("nosuchscore")
    with pytest.raises(ValueError, match="CSI"):
        contingency_compute(contingency_init([10], [1.0]), ["CSII"])


def test_score_forecasts_returns_tidy_table_from_lead_time_coordinate():
    rng = np.random.default_rng(6)
    forecast, observation = _rain_stack(rng, n_starts=1, n_leadtimes=3)
    lead_time = pd.to_timedelta([10, 20, 30], unit="min").to_numpy()
    forecast_da = xr.DataArray(
        forecast[0], dims=("lead_time", "y", "x"), coords={"lead_time": lead_time}
    )
    thresholds, scales = [0.5, 2.0], [1, 5]
    table = score_forecasts(forecast_da, observation[0], thresholds, scales, method="persistence")
    assert tuple(table.columns) == SCORE_COLUMNS
    assert len(table) == 3 * 2 * len(CAT_SCORES) + 3 * 6 + 3 * 2 * 2
    assert set(table["lead_time"]) == {10.0, 20.0, 30.0}
    assert (table["method"] == "persistence").all()

    csi = table[(table.score == "CSI") & (table.threshold == 2.0)].set_index("lead_time")
    direct = contingency_compute(
        contingency_accum(contingency_init([10, 20, 30], thresholds), forecast[0], observation[0])
    )
    np.testing.assert_array_equal(csi.loc[[10.0, 20.0, 30.0], "value"], direct["CSI"][:, 1])
    assert table[table.score == "MSE"]["threshold"].isna().all()
    fss_rows = table[table.score == "FSS"]
    assert set(fss_rows["scale"]) == {1.0, 5.0}
    with pytest.raises(ValueError, match="lead_time"):
        score_forecasts(forecast[0], observation[0], thresholds, scales)
