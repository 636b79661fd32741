"""Score windows: which windows, and the accumulators of one (forecast by the runner)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from nowcast.config import ConfigError, ExperimentConfig, stage_config
from nowcast.evaluate.ensemble import (
    accumulate_ensemble_scores,
    is_probabilistic,
    probability_valid,
    rain_methods,
    split_forecasts,
    tie_generator,
    window_failures,
)
from nowcast.evaluate.setup import (
    MAP_RAIN_THRESHOLD,
    EvaluateConfig,
    ForecastSetup,
    Window,
    WindowScores,
)
from nowcast.evaluate.tables import DRY_RAIN, FALSE_ALARM_RAIN, MASKED_FAMILIES, stack_starts
from nowcast.nowcasts.forecast import ensemble_mean
from nowcast.nowcasts.runner import forecast_inputs, forecast_window
from nowcast.patches.build import PatchesConfig
from nowcast.patches.reader import PatchStore
from nowcast.sources.cube import cube_path, cube_pixel_size, open_cube
from nowcast.verification._accumulator import ScoreAccumulator
from nowcast.verification.interface import get_method as score_family
from nowcast.windows import (
    Timeline,
    frame_counts,
    input_times,
    list_windows,
    select_windows,
    split_labels,
)

# windows


def store_windows(path: str, split: str) -> tuple[pd.DataFrame, dict]:
    """Windows of a split from the patch store, and the store's frame settings.

    Returns
    -------
    tuple
        A table (source, cube_path, reference_time) and ``{"n_input_frames", "n_target_frames",
        "timestep_minutes", "normalization"}``.
    """
    store = PatchStore.open(path)
    table = store.windows(split)
    table["source"] = table["source"].astype(str)
    table["reference_time"] = table["reference_time"].astype("datetime64[ns]")
    info = {
        "n_input_frames": store.n_input_frames,
        "n_target_frames": store.n_target_frames,
        "timestep_minutes": store.timestep_minutes,
        "normalization": store.normalization,
    }
    return table[["source", "cube_path", "reference_time"]], info


def cube_windows(experiment: ExperimentConfig, split: str) -> tuple[pd.DataFrame, dict]:
    """Windows of a split derived from the cubes, as ``nowcast patches`` would list them.

    Uses the experiment's ``patches`` section (frame counts, resampling, split blocks, buffer)
    and :mod:`nowcast.windows`, which the patch builder uses too, so the windows are those the
    store would hold.
    """
    patches_config = stage_config(experiment, "patches", PatchesConfig)
    timelines = []
    for source in experiment.sources:
        path = cube_path(experiment.cube_root, source)
        timelines.append(
            Timeline.from_cube(source, path, open_cube(path), patches_config.resample_minutes)
        )
    n_input, n_target = frame_counts(
        timelines, patches_config.n_input_frames, patches_config.n_target_frames
    )
    tables = []
    for timeline in timelines:
        labels = split_labels(timeline, patches_config)
        listed = list_windows(timeline, labels, n_input, n_target)
        tables.append(listed[listed["split"] == split])
    info = {
        "n_input_frames": n_input,
        "n_target_frames": n_target,
        "timestep_minutes": int(timelines[0].timestep),
        "normalization": None,
    }
    table = pd.concat(tables, ignore_index=True)
    return table[["source", "cube_path", "reference_time"]], info


def plan_windows(table: pd.DataFrame, window_step: int, max_windows: int | None) -> list[Window]:
    """Windows to evaluate per source in time order, thinned by ``window_step``, ``max_windows``."""
    windows = []
    for source, group in table.groupby("source", sort=False):
        group = group.sort_values("reference_time")
        times = group["reference_time"].to_numpy(dtype="datetime64[ns]")
        for index in select_windows(times, window_step, max_windows):
            windows.append(Window(source, group["cube_path"].iloc[index], times[index]))
    return windows


# scores of one window


def accumulate_scores(
    forecasts: dict[str, np.ndarray],
    observed: np.ndarray,
    lead_times,
    thresholds,
    scales,
    valid: np.ndarray | None = None,
) -> dict[str, dict[str, ScoreAccumulator]]:
    """Score several forecasts of one start on their common mask.

    Parameters
    ----------
    forecasts : dict of numpy.ndarray
        Method name to forecast (n_leadtimes, y, x) in mm/h.
    observed : numpy.ndarray
        Observations (n_leadtimes, y, x).
    lead_times : sequence of float
        Lead times in minutes.
    thresholds : sequence of float
        Thresholds (mm/h) of the categorical scores and the FSS.
    scales : sequence of int
        FSS window sizes (pixels).
    valid : numpy.ndarray, optional
        A further mask (n_leadtimes, y, x) of the common pixels, e.g. where a probability
        forecast of the window has data.

    Returns
    -------
    dict
        Method name to ``{"det_cat", "det_cont", "fss"}`` pooled accumulators. Only pixels where
        the observation and every forecast are finite (and ``valid``) count (for the FSS the
        others are non-events in every field alike). Also the :data:`MASKED_FAMILIES`:
        ``*_allobs`` on every valid observation, and ``dry_area`` when ``extrapolation`` is
        among the forecasts.
    """
    observed_raw = observed
    valid = np.isfinite(observed) & (True if valid is None else valid)
    for values in forecasts.values():
        valid &= np.isfinite(values)
    observed = np.where(valid, observed, np.nan)
    coordinates = {
        "det_cat": (lead_times, thresholds),
        "det_cont": (lead_times,),
        "fss": (lead_times, thresholds, scales),
    }
    observed_all = np.where(np.isfinite(observed_raw), observed_raw, np.nan)
    dry = None
    if "extrapolation" in forecasts:
        lk = forecasts["extrapolation"]
        dry = valid & (observed_raw < DRY_RAIN) & (lk < DRY_RAIN)
    scores = {}
    for name, raw in forecasts.items():
        values = np.where(valid, raw, np.nan)
        scores[name] = {}
        for family_name, coords in coordinates.items():
            family = score_family(family_name)
            scores[name][family_name] = family.accum(family.init(*coords), values, observed)
        # pysteps' convention: no data in a forecast is no rain where there is an observation.
        filled = np.where(np.isfinite(raw), raw, 0.0)
        for key, coords in (
            ("det_cat_allobs", coordinates["det_cat"]),
            ("det_cont_allobs", coordinates["det_cont"]),
        ):
            family = score_family(MASKED_FAMILIES[key][0])
            scores[name][key] = family.accum(family.init(*coords), filled, observed_all)
        if dry is not None:
            family = score_family("det_cat")
            scores[name]["dry_area"] = family.accum(
                family.init(lead_times, (FALSE_ALARM_RAIN,)),
                np.where(dry, raw, np.nan),
                np.where(dry, observed_raw, np.nan),
            )
    return scores


def score_window(window: Window, setup: ForecastSetup) -> WindowScores:
    """Forecast and score one window with every method (a Dask task).

    Parameters
    ----------
    window : Window
        Source, cube and reference time.
    setup : ForecastSetup
        Methods, frame counts, thresholds and scales.

    Returns
    -------
    WindowScores
        Pooled accumulators per method and family (an ensemble's of its ensemble mean), the
        window's observed wet fraction and, when a forecast is an ensemble or a probability,
        the probabilistic accumulators (:mod:`nowcast.evaluate.ensemble`) and the methods that
        could not forecast the window.
    """
    cube = open_cube(window.cube_path)
    forecast = forecast_window(cube, window.reference_time, setup)
    observed = forecast.observed.values
    rain, probabilities = split_forecasts(forecast.forecasts)
    means = {name: ensemble_mean(values).values for name, values in rain.items()}
    valid = common_mask(observed, means, probabilities)
    accumulators = accumulate_scores(
        means, observed, setup.lead_times, setup.thresholds, setup.scales, valid=valid
    )
    result = WindowScores(window, accumulators, *observed_fractions(observed))
    result.failures = window_failures(forecast.forecasts)
    if is_probabilistic(rain, probabilities):
        random_states = {name: tie_generator(setup.seed, window, name) for name in rain}
        result.ensemble = accumulate_ensemble_scores(
            rain,
            probabilities,
            observed,
            valid,
            setup.lead_times,
            cube_pixel_size(cube) / 1000.0,
            random_states,
        )
    return result


def common_mask(
    observed: np.ndarray, means: dict[str, np.ndarray], probabilities: dict
) -> np.ndarray:
    """The window's one mask: where the observation, every forecast and probability have data.

    An ensemble mean has no data where any member has none, so the mask is the same for the
    deterministic tables (ensemble means) and the probabilistic families (members).
    """
    valid = np.isfinite(observed) & probability_valid(probabilities)
    for values in means.values():
        valid &= np.isfinite(values)
    return valid


def observed_fractions(observed: np.ndarray) -> tuple[float, float]:
    """The wet share of the valid observed pixels (>= :data:`MAP_RAIN_THRESHOLD`) and the
    valid share of all pixels."""
    finite = np.isfinite(observed)
    n_valid = int(finite.sum())
    wet = int(np.count_nonzero(observed[finite] >= MAP_RAIN_THRESHOLD))
    return wet / max(n_valid, 1), n_valid / observed.size


# patches


def score_store_patches(
    store: str, config: EvaluateConfig, setup: ForecastSetup
) -> dict[str, dict[str, dict[str, ScoreAccumulator]]]:
    """Per-patch accumulators of the store's patches of the split (in this process).

    Patches are transformed back to rain rate (no-data from the masks) and every method forecasts
    on the patch alone, as the network saw it in training; each patch counts as one start. At
    most ``max_patches``, evenly spread over the split's patches.
    """
    store = PatchStore.open(store)
    normalization = store.normalization

    def rain_rate(values, mask) -> np.ndarray:
        values = normalization.inverse(np.asarray(values, dtype=np.float32))
        return np.where(np.asarray(mask), values, np.nan).astype(np.float32)

    in_split = store.samples(config.split)["sample"].to_numpy()
    if in_split.size == 0:
        raise ConfigError(f"the patch store has no patches in split '{config.split}'")
    chosen = in_split[
        np.unique(np.linspace(0, in_split.size - 1, config.max_patches).round().astype(int))
    ]
    cubes = {source: open_cube(path) for source, path in store.cube_paths.items()}
    n_input = setup.n_input_frames
    results = []
    for index in chosen:
        sample = store.sample(int(index))
        cube = cubes[str(sample["source"].values)]
        size = sample.sizes["y"]
        y0, x0 = int(sample["y0"]), int(sample["x0"])
        crop = cube.isel(y=slice(y0, y0 + size), x=slice(x0, x0 + size))

        reference = np.datetime64(sample["reference_time"].values, "ns")
        inputs = xr.DataArray(
            rain_rate(sample["inputs"].values, sample["input_mask"].values),
            dims=("time", "y", "x"),
            coords={
                "time": input_times(reference, n_input, setup.timestep_minutes),
                "y": crop["y"],
                "x": crop["x"],
            },
            attrs={"crs_wkt": cube["crs"].attrs["crs_wkt"]},
        )
        observed = rain_rate(sample["targets"].values, sample["target_mask"].values)
        rain, probabilities = split_forecasts(forecast_inputs(inputs, setup).forecasts)
        means = {name: ensemble_mean(f).values for name, f in rain.items()}
        accumulators = accumulate_scores(
            means,
            observed[: setup.n_leadtimes],
            setup.lead_times,
            setup.thresholds,
            setup.scales,
            valid=probability_valid(probabilities),
        )
        source = str(sample["source"].values)
        window = Window(source, store.cube_paths[source], reference)
        fractions = observed_fractions(observed[: setup.n_leadtimes])
        results.append(WindowScores(window, accumulators, *fractions))
    return stack_starts(results, rain_methods(setup.methods))
