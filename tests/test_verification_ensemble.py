"""Streaming ensemble scores: equality with pysteps on BoM crops, merging, calibration, tables."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pysteps.postprocessing.ensemblestats import excprob
from pysteps.utils.dimension import aggregate_fields
from pysteps.utils.spectral import rapsd
from pysteps.verification import ensscores, probscores

from nowcast.sources.cube import open_cube
from nowcast.verification import sum_starts
from nowcast.verification.bootstrap import bootstrap_ci
from nowcast.verification.brier import (
    brier_accum,
    brier_accum_probability,
    brier_compute,
    brier_init,
    brier_skill_score,
)
from nowcast.verification.detcont import continuous_accum, continuous_compute, continuous_init
from nowcast.verification.ensemble import (
    crps_accum,
    crps_compute,
    crps_init,
    crps_pooled_accum,
    crps_pooled_compute,
    crps_pooled_init,
    spread_skill_accum,
    spread_skill_compute,
    spread_skill_init,
)
from nowcast.verification.interface import (
    CURVE_COLUMNS,
    INIT_ARGUMENTS,
    SCORE_COLUMNS,
    ensemble_curves,
    get_method,
    score_ensemble,
    scores_to_frame,
)
from nowcast.verification.probabilistic import (
    reldiag_accum,
    reldiag_compute,
    reldiag_init,
    roc_accum,
    roc_curve,
    roc_init,
)
from nowcast.verification.rankhist import (
    rankhist_accum,
    rankhist_compute,
    rankhist_init,
    rankhist_merge,
)
from nowcast.verification.spectra import rapsd_accum, rapsd_compute, rapsd_init

LEAD_TIMES = (10.0, 20.0, 30.0)
THRESHOLDS = (1.0, 5.0, 10.0)
SCALES = (1, 4, 16)
N_MEMBERS = 6
#: (first frame, row, column) of the 128 x 128 crops: a wet and a mostly dry scene of the BoM day.
CROPS = ((54, 128, 320), (60, 64, 256))
CROP = 128


def _quiet(function, *args, **kwargs):
    """Call pysteps with its 0/0 warnings silenced."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return function(*args, **kwargs)


@pytest.fixture(scope="module")
def windows(bom_cube):
    """Two windows of real BoM frames with a synthetic ensemble, and some no-data pixels.

    Returns (forecast, observation) shaped (2, N_MEMBERS, 3, 128, 128) and (2, 3, 128, 128),
    float32. Each member is the last input frame, shifted by up to 6 pixels and scaled, so dry
    members and a dry observation tie, as in real nowcasts.
    """
    rain = open_cube(bom_cube)["rain_rate"]
    rng = np.random.default_rng(22)
    forecasts, observations = [], []
    for start, row, column in CROPS:
        frames = rain.isel(time=slice(start, start + 4)).values
        observation = frames[1:, row : row + CROP, column : column + CROP].copy()
        members = []
        for _ in range(N_MEMBERS):
            dy, dx = rng.integers(-6, 7, size=2)
            scale = rng.lognormal(0.0, 0.3, size=(len(LEAD_TIMES), 1, 1))
            shifted = frames[0, row + dy : row + dy + CROP, column + dx : column + dx + CROP]
            members.append((shifted * scale).astype(np.float32))
        forecasts.append(np.stack(members))
        observations.append(observation)
    forecast, observation = np.stack(forecasts), np.stack(observations)
    observation[0, :, :5, :20] = np.nan
    forecast[1, 2, 1, 40:44, 60:70] = np.nan
    assert (observation[np.isfinite(observation)] >= 10).any()
    assert (observation[np.isfinite(observation)] == 0).mean() > 0.1
    return forecast, observation


def _each_window_and_lead(forecast, observation):
    """(lead, members, observed) in the order of the windows, then of the lead times."""
    for window in range(forecast.shape[0]):
        for lead in range(forecast.shape[2]):
            yield lead, forecast[window, :, lead], observation[window, lead]


@pytest.mark.realdata
def test_crps_and_pooled_crps_equal_pysteps(windows):
    forecast, observation = windows
    crps = crps_compute(crps_accum(crps_init(LEAD_TIMES), forecast, observation))["CRPS"]
    pooled = crps_pooled_compute(
        crps_pooled_accum(crps_pooled_init(LEAD_TIMES, SCALES), forecast, observation)
    )["CRPS_POOLED"]

    expected = [probscores.CRPS_init() for _ in LEAD_TIMES]
    expected_pooled = [[probscores.CRPS_init() for _ in SCALES] for _ in LEAD_TIMES]
    for lead, members, observed in _each_window_and_lead(forecast, observation):
        probscores.CRPS_accum(expected[lead], members, observed)
        for k, size in enumerate(SCALES):
            probscores.CRPS_accum(
                expected_pooled[lead][k],
                aggregate_fields(members, size, axis=(1, 2), trim=True),
                aggregate_fields(observed, size, axis=(0, 1), trim=True),
            )
    np.testing.assert_allclose(crps, [probscores.CRPS_compute(c) for c in expected], rtol=1e-9)
    np.testing.assert_allclose(
        pooled,
        [[probscores.CRPS_compute(c) for c in row] for row in expected_pooled],
        rtol=1e-6,
    )
    # 1 x 1 blocks are the pixels; coarser blocks lose the displacement errors.
    np.testing.assert_allclose(pooled[:, 0], crps, rtol=1e-12)
    assert (pooled[:, 2] < pooled[:, 0]).all()


@pytest.mark.realdata
def test_rank_histogram_equals_pysteps_with_the_same_seed(windows):
    forecast, observation = windows
    np.random.seed(5)  # noqa: NPY002  (pysteps breaks ties with the global np.random)
    histogram = rankhist_accum(rankhist_init(LEAD_TIMES, N_MEMBERS), forecast, observation)

    np.random.seed(5)  # noqa: NPY002
    expected = [ensscores.rankhist_init(N_MEMBERS, 0.1) for _ in LEAD_TIMES]
    for lead, members, observed in _each_window_and_lead(forecast, observation):
        ensscores.rankhist_accum(expected[lead], members, observed)
    np.testing.assert_array_equal(histogram.counts, [h["n"] for h in expected])

    frequencies = np.array([ensscores.rankhist_compute(h) for h in expected])
    uniform = 1.0 / (N_MEMBERS + 1)
    divergence = np.sum(
        np.where(frequencies > 0, frequencies * np.log(frequencies / uniform), 0.0), axis=1
    )
    np.testing.assert_allclose(rankhist_compute(histogram)["RANK_KL"], divergence, rtol=1e-12)


@pytest.mark.realdata
def test_reliability_and_roc_equal_pysteps(windows):
    forecast, observation = windows
    reliability = reldiag_compute(
        reldiag_accum(reldiag_init(LEAD_TIMES, THRESHOLDS), forecast, observation)
    )
    pofd, pod, area = roc_curve(
        roc_accum(roc_init(LEAD_TIMES, N_MEMBERS, THRESHOLDS), forecast, observation)
    )

    diagrams = [[probscores.reldiag_init(t) for t in THRESHOLDS] for _ in LEAD_TIMES]
    curves = [[probscores.ROC_curve_init(t, N_MEMBERS + 1) for t in THRESHOLDS] for _ in LEAD_TIMES]
    for lead, members, observed in _each_window_and_lead(forecast, observation):
        probabilities = excprob(members, list(THRESHOLDS))
        for k in range(len(THRESHOLDS)):
            probscores.reldiag_accum(diagrams[lead][k], probabilities[k], observed)
            probscores.ROC_curve_accum(curves[lead][k], probabilities[k], observed)
    for lead in range(len(LEAD_TIMES)):
        for k in range(len(THRESHOLDS)):
            forecast_probability, observed_frequency = _quiet(
                probscores.reldiag_compute, diagrams[lead][k]
            )
            np.testing.assert_allclose(
                reliability["FORECAST_PROBABILITY"][lead, k], forecast_probability, rtol=1e-12
            )
            np.testing.assert_allclose(
                reliability["OBSERVED_FREQUENCY"][lead, k], observed_frequency, rtol=1e-12
            )
            expected_pofd, expected_pod, expected_area = _quiet(
                probscores.ROC_curve_compute, curves[lead][k], compute_area=True
            )
            np.testing.assert_allclose(pofd[lead, k], expected_pofd, rtol=1e-12)
            np.testing.assert_allclose(pod[lead, k], expected_pod, rtol=1e-12)
            np.testing.assert_allclose(area[lead, k], expected_area, rtol=1e-12)
    # min_count per frame left bins out somewhere, and the forecasts have skill.
    assert np.isnan(reliability["OBSERVED_FREQUENCY"]).any()
    assert (area > 0.5).all()


@pytest.mark.realdata
def test_brier_score_and_skill_score_of_exceedance_probabilities(windows):
    forecast, observation = windows
    sums = brier_accum(brier_init(LEAD_TIMES, THRESHOLDS), forecast, observation)
    probability = np.stack([excprob(forecast[w], list(THRESHOLDS)) for w in range(2)])
    events = np.stack([observation >= t for t in THRESHOLDS], axis=1).astype(np.float64)
    valid = np.isfinite(probability) & np.isfinite(observation)[:, None]
    squared = np.where(valid, (probability - events) ** 2, 0.0)
    expected = squared.sum(axis=(0, 3, 4)) / valid.sum(axis=(0, 3, 4))
    np.testing.assert_allclose(brier_compute(sums)["BRIER"], expected.T, rtol=1e-12)

    from_probability = brier_accum_probability(
        brier_init(LEAD_TIMES, THRESHOLDS), probability, observation
    )
    np.testing.assert_allclose(brier_compute(from_probability)["BRIER"], expected.T, rtol=1e-12)
    np.testing.assert_allclose(brier_skill_score(sums, from_probability), 0.0, atol=1e-12)
    # The climatological frequency of the pooled windows as the reference: skill below 1.
    frequency = np.nanmean(events, axis=(0, 3, 4), keepdims=True)
    reference = brier_accum_probability(
        brier_init(LEAD_TIMES, THRESHOLDS),
        np.broadcast_to(frequency, probability.shape).copy(),
        observation,
    )
    skill = brier_skill_score(sums, reference)
    assert skill.shape == (len(LEAD_TIMES), len(THRESHOLDS)) and (skill < 1).all()
    with pytest.raises(ValueError, match="thresholds"):
        brier_skill_score(sums, brier_init(LEAD_TIMES, (1.0,)))


@pytest.mark.realdata
def test_spread_skill_equals_its_definition(windows):
    forecast, observation = windows
    ratio = spread_skill_compute(
        spread_skill_accum(spread_skill_init(LEAD_TIMES), forecast, observation)
    )["SPREAD_SKILL"]
    values = np.moveaxis(forecast, 1, 0).astype(np.float64)  # members first
    valid = np.isfinite(values).all(axis=0) & np.isfinite(observation)
    variance = np.where(valid, values.var(axis=0, ddof=1), 0.0).sum(axis=(0, 2, 3))
    error = np.where(valid, (values.mean(axis=0) - observation) ** 2, 0.0).sum(axis=(0, 2, 3))
    factor = np.sqrt((N_MEMBERS + 1) / N_MEMBERS)
    np.testing.assert_allclose(ratio, np.sqrt(variance / error) * factor, rtol=1e-12)


@pytest.mark.realdata
def test_rapsd_equals_pysteps_member_mean_with_no_data_as_zero(windows):
    forecast, observation = windows
    sums = rapsd_accum(rapsd_init(LEAD_TIMES, (CROP, CROP), pixel_size=0.5), forecast, observation)
    spectra = rapsd_compute(sums)
    expected_forecast = np.zeros_like(spectra["RAPSD_FORECAST"])
    expected_observed = np.zeros_like(spectra["RAPSD_OBSERVED"])
    for lead, members, observed in _each_window_and_lead(forecast, observation):
        missing = ~(np.isfinite(observed) & np.isfinite(members).all(axis=0))
        members, observed = members.copy(), observed.copy()
        members[:, missing], observed[missing] = 0.0, 0.0
        member_spectra = [rapsd(member, fft_method=np.fft) for member in members]
        expected_forecast[lead] += np.mean(member_spectra, axis=0) / 2
        power, frequencies = rapsd(observed, fft_method=np.fft, return_freq=True, d=0.5)
        expected_observed[lead] += power / 2
    # pysteps averages the rings in float32; the sums here are float64.
    np.testing.assert_allclose(spectra["RAPSD_FORECAST"], expected_forecast, rtol=1e-5)
    np.testing.assert_allclose(spectra["RAPSD_OBSERVED"], expected_observed, rtol=1e-5)
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(sums.wavelengths, 1.0 / frequencies)


def _init_arguments(name):
    """The init arguments after the lead times of an ensemble family, for the crops."""
    arguments = {
        "thresholds": THRESHOLDS,
        "scales": SCALES,
        "n_members": N_MEMBERS,
        "shape": (CROP, CROP),
        "pixel_size": 0.5,
    }
    return [arguments[argument] for argument in INIT_ARGUMENTS[name]]


def _accumulate(name, pieces, n_starts=None):
    """One accumulator per (forecast, observation) piece, in order, after one np.random.seed."""
    family = get_method(name)
    np.random.seed(9)  # noqa: NPY002  (the rank histogram's tie-breaking draws)
    return [
        family.accum(family.init(LEAD_TIMES, *_init_arguments(name), n_starts=n_starts), *piece)
        for piece in pieces
    ]


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name",
    ["crps", "crps_pooled", "spread_skill", "rankhist", "reldiag", "roc", "brier", "rapsd"],
)
@pytest.mark.realdata
def test_merge_of_two_windows_equals_accumulating_both(windows, name):
    forecast, observation = windows
    family = get_method(name)
    (both,) = _accumulate(name, [(forecast, observation)])
    (per_start,) = _accumulate(name, [(forecast, observation)], n_starts=2)
    halves = [(forecast[0], observation[0]), (forecast[1], observation[1])]
    first, second = _accumulate(name, halves)
    merged = family.merge(first, second)
    pooled = sum_starts(per_start)
    for field in both.additive_fields:
        np.testing.assert_allclose(getattr(merged, field), getattr(both, field), rtol=1e-12)
        np.testing.assert_allclose(getattr(pooled, field), getattr(both, field), rtol=1e-12)
    expected = family.compute(both)
    for score, values in family.compute(merged).items():
        np.testing.assert_allclose(values, expected[score], rtol=1e-12)
    assert merged is not first and np.any(getattr(first, both.additive_fields[0]))


@pytest.mark.realdata
def test_per_start_scores_bootstrap(windows):
    forecast, observation = windows
    per_start = crps_accum(crps_init(LEAD_TIMES, n_starts=2), forecast, observation)
    intervals = bootstrap_ci(per_start, crps_compute, n_boot=50)
    pooled = crps_compute(sum_starts(per_start))["CRPS"]
    np.testing.assert_allclose(intervals["CRPS"].estimate, pooled)
    assert (intervals["CRPS"].lower <= pooled + 1e-12).all()
    assert (intervals["CRPS"].upper >= pooled - 1e-12).all()
    roc_per_start = roc_accum(roc_init(LEAD_TIMES, N_MEMBERS, n_starts=2), forecast, observation)
    area = bootstrap_ci(roc_per_start, get_method("roc").compute, n_boot=20)["ROC_AREA"]
    assert area.estimate.shape == area.lower.shape == (len(LEAD_TIMES), len(THRESHOLDS))


@pytest.mark.realdata
def test_one_member_crps_is_the_mae(windows):
    forecast, observation = windows
    deterministic = forecast[:, 0]
    crps = crps_compute(crps_accum(crps_init(LEAD_TIMES), forecast[:, :1], observation))["CRPS"]
    errors = continuous_accum(continuous_init(LEAD_TIMES), deterministic, observation)
    np.testing.assert_allclose(crps, continuous_compute(errors, ["MAE"])["MAE"], rtol=1e-9)
    with pytest.raises(ValueError, match="at least 2 members"):
        spread_skill_accum(spread_skill_init(LEAD_TIMES), forecast[:, :1], observation)


def _synthetic_ensemble(member_noise: float, seed: int = 0):
    """Members and observation around a shared rain field (10-40 mm/h), observation noise 2 mm/h.

    With ``member_noise`` 1 the observation is one more draw from the members' distribution;
    below 1 the members are under-dispersive. Gaussian noise keeps the ratio of sums behind the
    spread/skill ratio close to its expectation on a few thousand pixels.
    """
    rng = np.random.default_rng(seed)
    n_members, shape = 10, (3, 64, 64)
    signal = rng.uniform(10.0, 40.0, size=shape)
    members = signal + 2.0 * member_noise * rng.normal(size=(n_members,) + shape)
    observation = signal + 2.0 * rng.normal(size=shape)
    return members, observation


def test_calibrated_ensemble_is_flat_and_underdispersive_is_u_shaped():
    scores = {}
    for label, noise in (("calibrated", 1.0), ("underdispersive", 0.3)):
        members, observation = _synthetic_ensemble(noise)
        histogram = rankhist_accum(rankhist_init(LEAD_TIMES, 10), members, observation)
        ratio = spread_skill_accum(spread_skill_init(LEAD_TIMES), members, observation)
        frequencies = histogram.counts / histogram.counts.sum(axis=1, keepdims=True)
        scores[label] = (
            frequencies,
            rankhist_compute(histogram)["RANK_KL"],
            spread_skill_compute(ratio)["SPREAD_SKILL"],
        )
    flat, flat_kl, flat_ratio = scores["calibrated"]
    u_shape, u_kl, u_ratio = scores["underdispersive"]
    # 12288 samples in 11 ranks: sampling noise alone gives a KL of about 10 / (2 * 12288).
    assert (flat_kl < 0.005).all()
    assert np.abs(flat - 1 / 11).max() < 0.02
    assert (u_kl > 20 * flat_kl).all()
    ends = u_shape[:, [0, -1]].min(axis=1)
    assert (ends > 3 * u_shape[:, 1:-1].max(axis=1)).all()
    assert (np.abs(flat_ratio - 1.0) < 0.05).all()
    assert (u_ratio < 0.5).all()


@pytest.mark.realdata
def test_score_ensemble_returns_a_tidy_table(windows):
    forecast, observation = windows
    table = score_ensemble(
        forecast[0], observation[0], method="shifted", lead_times=LEAD_TIMES, pixel_size=0.5
    )
    assert tuple(table.columns) == SCORE_COLUMNS
    assert set(table["score"]) == {
        "CRPS",
        "CRPS_POOLED",
        "RANK_KL",
        "ROC_AREA",
        "BRIER",
        "SPREAD_SKILL",
    }
    assert (table["method"] == "shifted").all()
    per_score = table.groupby("score").size()
    assert per_score["CRPS"] == per_score["RANK_KL"] == per_score["SPREAD_SKILL"] == 3
    assert per_score["CRPS_POOLED"] == 3 * len(SCALES)
    assert per_score["BRIER"] == per_score["ROC_AREA"] == 3 * len(THRESHOLDS)
    pooled = table[table.score == "CRPS_POOLED"]
    assert set(pooled["scale"]) == set(map(float, SCALES)) and pooled["threshold"].isna().all()
    area = table[(table.score == "ROC_AREA") & (table.threshold == 5.0)].set_index("lead_time")
    direct = get_method("roc").compute(
        roc_accum(roc_init(LEAD_TIMES, N_MEMBERS), forecast[0], observation[0])
    )
    np.testing.assert_array_equal(area.loc[list(LEAD_TIMES), "value"], direct["ROC_AREA"][:, 1])

    # A deterministic method enters the CRPS table as its MAE.
    deterministic = score_ensemble(
        forecast[0, :1], observation[0], families=("crps",), lead_times=LEAD_TIMES
    )
    errors = continuous_accum(continuous_init(LEAD_TIMES), forecast[0, 0], observation[0])
    np.testing.assert_allclose(
        deterministic["value"], continuous_compute(errors, ["MAE"])["MAE"], rtol=1e-9
    )


@pytest.mark.realdata
def test_ensemble_curves_return_a_tidy_table(windows):
    forecast, observation = windows
    table = ensemble_curves(forecast[1], observation[1], lead_times=LEAD_TIMES, pixel_size=0.5)
    assert tuple(table.columns) == CURVE_COLUMNS
    sizes = table.groupby("curve").size()
    assert sizes["RANK_HISTOGRAM"] == 3 * (N_MEMBERS + 1)
    assert sizes["RELIABILITY"] == 3 * len(THRESHOLDS) * 10
    assert sizes["ROC"] == 3 * len(THRESHOLDS) * (N_MEMBERS + 1)
    assert sizes["RAPSD_FORECAST"] == sizes["RAPSD_OBSERVED"] == 3 * (CROP // 2)
    ranks = table[table.curve == "RANK_HISTOGRAM"]
    np.testing.assert_allclose(ranks.groupby("lead_time")["y"].sum(), 1.0)
    assert ranks["threshold"].isna().all()
    roc = table[(table.curve == "ROC") & (table.threshold == 1.0) & (table.lead_time == 20.0)]
    counts = roc_accum(roc_init(LEAD_TIMES, N_MEMBERS), forecast[1], observation[1])
    pofd, pod, _ = roc_curve(counts)
    np.testing.assert_array_equal(roc["x"], pofd[1, 0])
    np.testing.assert_array_equal(roc["y"], pod[1, 0])
    np.testing.assert_array_equal(roc["point"], np.linspace(0, 1, N_MEMBERS + 1))
    with pytest.raises(ValueError, match="no curves"):
        ensemble_curves(forecast[1], observation[1], families=("crps",), lead_times=LEAD_TIMES)


@pytest.mark.realdata
def test_scores_to_frame_keeps_rejecting_curves(windows):
    forecast, observation = windows
    histogram = rankhist_accum(rankhist_init(LEAD_TIMES, N_MEMBERS), forecast, observation)
    frame = scores_to_frame(histogram, rankhist_compute(histogram))
    assert len(frame) == 3 and frame["threshold"].isna().all()
    with pytest.raises(ValueError, match="RANKS"):
        scores_to_frame(histogram, {"RANKS": histogram.counts})


@pytest.mark.realdata
def test_bad_input_is_refused_with_a_message(windows):
    forecast, observation = windows
    with pytest.raises(ValueError, match="observation"):
        crps_accum(crps_init(LEAD_TIMES), forecast[0], observation[1, :2])
    with pytest.raises(ValueError, match="n_members"):
        crps_accum(crps_init(LEAD_TIMES), forecast[0, 0], observation[0])
    with pytest.raises(ValueError, match="6 members"):
        rankhist_accum(rankhist_init(LEAD_TIMES, N_MEMBERS), forecast[0, :3], observation[0])
    with pytest.raises(ValueError, match="x_min"):
        rankhist_merge(rankhist_init(LEAD_TIMES, 3), rankhist_init(LEAD_TIMES, 3, x_min=None))
    with pytest.raises(ValueError, match="shape"):
        rapsd_accum(rapsd_init(LEAD_TIMES, (64, 64)), forecast[0], observation[0])
    for name in ("crps", "rankhist", "rapsd", "spread_skill"):
        assert get_method(name.upper()) is get_method(name)
