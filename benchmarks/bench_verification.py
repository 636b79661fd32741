"""Benchmark: vectorised streaming verification against a per-frame loop over pysteps.

Run from the project root with ``python -m benchmarks.bench_verification`` (or
``make bench ARGS=verification``); ``NOWCAST_DATA_ROOT`` defaults to ../shared/data/pysteps-data.

Uses 36 frames of the BoM Rainfields sample (radar 66, 2020-10-31 from 04:00 UTC, the rainy
part of the day) when they are found under the data root, else a synthetic field of the same
shape. The forecast is Eulerian persistence for 6 lead times from several start times; both paths
compute the same pooled contingency-table scores per lead time and threshold and ME/MSE/MAE per
lead time (and the FSS at the evaluate stage's window sizes, a separate row: it is most of the
evaluate stage's scoring time), and the numbers are checked to agree before the timings are
reported. Timing follows
issue 15: wall time at 2 threads, the median of 5 interleaved runs (loop, ours, loop, ...) on
the same inputs; the first call of ours (numba compiling or loading its cached kernels) is
reported apart.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numba
import numpy as np
import xarray as xr
from pysteps.verification import spatialscores
from pysteps.verification.detcatscores import (
    det_cat_fct_accum,
    det_cat_fct_compute,
    det_cat_fct_init,
)
from pysteps.verification.detcontscores import (
    det_cont_fct_accum,
    det_cont_fct_compute,
    det_cont_fct_init,
)

from benchmarks.common import save, table
from nowcast.verification.detcat import contingency_accum, contingency_compute, contingency_init
from nowcast.verification.detcont import continuous_accum, continuous_compute, continuous_init
from nowcast.verification.spatial import fss_accum, fss_compute, fss_init

BOM_DAY = Path("radar/bom/prcp-c10/66/2020/10/31")
FIRST_FRAME = 24  # 04:00 UTC
N_FRAMES = 36
N_LEADTIMES = 6
TIMESTEP_MINUTES = 10
START_STEP = 3
THRESHOLDS = (0.1, 1.0, 2.0, 5.0, 10.0)
CAT_SCORES = ("CSI", "POD", "FAR", "HSS", "ETS", "BIAS")
CONT_SCORES = ("ME", "MSE", "MAE")
#: FSS window sizes (pixels) of the evaluate stage's default configuration.
FSS_SCALES = (1, 5, 10, 20)
#: The issue's timing rule: wall time at 2 threads, median of 5 interleaved runs.
THREADS = 2
REPEATS = 5


def load_rain_rate(data_root: str | None) -> tuple[np.ndarray, str]:
    """Return (N_FRAMES, 512, 512) float32 rain rates in mm/h and a description of the source.

    Parameters
    ----------
    data_root : str or None
        The pysteps-data root; None or a root without the BoM files gives a synthetic field.

    Returns
    -------
    tuple
        The rain-rate stack and ``"bom"`` or ``"synthetic"``.
    """
    files = sorted((Path(data_root) / BOM_DAY).glob("*.nc")) if data_root else []
    files = files[FIRST_FRAME : FIRST_FRAME + N_FRAMES]
    if len(files) == N_FRAMES:
        frames = []
        for path in files:
            with xr.open_dataset(path) as dataset:
                frames.append(dataset["precipitation"].values)
        # mm per 10 min -> mm/h; small negative values occur in the product and mean no rain.
        rain_rate = np.clip(np.stack(frames) * (60 / TIMESTEP_MINUTES), 0.0, None)
        return rain_rate.astype(np.float32), "bom"
    rng = np.random.default_rng(0)
    shape = (N_FRAMES, 512, 512)
    rain_rate = np.where(rng.random(shape) < 0.13, rng.gamma(0.5, 4.0, shape), 0.0)
    return rain_rate.astype(np.float32), "synthetic"


def persistence_pairs(rain_rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Build persistence forecasts and their observations, both (n_starts, N_LEADTIMES, y, x)."""
    starts = np.arange(0, rain_rate.shape[0] - N_LEADTIMES, START_STEP)
    leads = np.arange(1, N_LEADTIMES + 1)
    forecast = np.broadcast_to(
        rain_rate[starts, None], (starts.size, N_LEADTIMES) + rain_rate.shape[1:]
    )
    observation = rain_rate[starts[:, None] + leads[None, :]]
    return np.ascontiguousarray(forecast), observation


def loop_scores(forecast: np.ndarray, observation: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled scores from pysteps, one call per frame (and per threshold)."""
    n_starts, n_leadtimes = forecast.shape[:2]
    result = {name: np.empty((n_leadtimes, len(THRESHOLDS))) for name in CAT_SCORES}
    result.update({name: np.empty(n_leadtimes) for name in CONT_SCORES})
    for lead in range(n_leadtimes):
        contabs = [det_cat_fct_init(threshold) for threshold in THRESHOLDS]
        errors = det_cont_fct_init()
        for start in range(n_starts):
            fc, ob = forecast[start, lead], observation[start, lead]
            # pysteps counts a NaN as a non-event; verify the finite pairs only, as we do.
            valid = np.isfinite(fc) & np.isfinite(ob)
            for contab in contabs:
                det_cat_fct_accum(contab, fc[valid], ob[valid])
            det_cont_fct_accum(errors, fc, ob)
        for k, contab in enumerate(contabs):
            scores = det_cat_fct_compute(contab, list(CAT_SCORES))
            for name in CAT_SCORES:
                result[name][lead, k] = scores[name]
        scores = det_cont_fct_compute(errors, list(CONT_SCORES))
        for name in CONT_SCORES:
            result[name][lead] = scores[name]
    return result


def vectorised_scores(forecast: np.ndarray, observation: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled scores from one accum call per score family over the whole stack."""
    lead_times = np.arange(1, forecast.shape[1] + 1) * TIMESTEP_MINUTES
    table = contingency_accum(contingency_init(lead_times, THRESHOLDS), forecast, observation)
    errors = continuous_accum(continuous_init(lead_times), forecast, observation)
    return contingency_compute(table, CAT_SCORES) | continuous_compute(errors, CONT_SCORES)


def loop_fss(forecast: np.ndarray, observation: np.ndarray) -> np.ndarray:
    """Pooled FSS from pysteps, one ``fss_accum`` call per frame, threshold and scale."""
    n_starts, n_leadtimes = forecast.shape[:2]
    result = np.empty((n_leadtimes, len(THRESHOLDS), len(FSS_SCALES)))
    for lead in range(n_leadtimes):
        for k, threshold in enumerate(THRESHOLDS):
            for m, scale in enumerate(FSS_SCALES):
                fss = spatialscores.fss_init(threshold, scale)
                for start in range(n_starts):
                    spatialscores.fss_accum(fss, forecast[start, lead], observation[start, lead])
                result[lead, k, m] = spatialscores.fss_compute(fss)
    return result


def vectorised_fss(forecast: np.ndarray, observation: np.ndarray) -> np.ndarray:
    """Pooled FSS from one ``fss_accum`` call over the whole stack."""
    lead_times = np.arange(1, forecast.shape[1] + 1) * TIMESTEP_MINUTES
    sums = fss_accum(fss_init(lead_times, THRESHOLDS, FSS_SCALES), forecast, observation)
    return fss_compute(sums)["FSS"]


def _interleaved_wall_times(functions: dict, args: tuple, repeats: int) -> dict[str, list]:
    """Wall times of ``repeats`` rounds, each calling every function once in turn.

    Interleaving (loop, ours, loop, ours, ...) exposes both to the same background load, so
    the ratio of their medians holds up on a shared machine.
    """
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            tic = time.perf_counter()
            function(*args)
            times[name].append(time.perf_counter() - tic)
    return times


def bench(data_root: str | None) -> dict:
    """Time the pysteps loop against the vectorised accumulators and check they agree.

    Parameters
    ----------
    data_root : str or None
        The pysteps-data root (``NOWCAST_DATA_ROOT``); synthetic data when the BoM files are
        missing.

    Returns
    -------
    dict
        ``loop_s`` and ``vectorised_s`` (medians of :data:`REPEATS` interleaved wall times,
        with every time in ``*_times_s``), ``speedup`` (their ratio), the same for the FSS
        (``fss_loop_s``, ``fss_s``, ``fss_speedup``), ``first_call_s`` (our first call:
        compiling or loading the cached kernels), ``threads``, ``load_average``, ``data``,
        ``n_frame_pairs``, ``n_thresholds``, ``fss_scales``.
    """
    rain_rate, source = load_rain_rate(data_root)
    forecast, observation = persistence_pairs(rain_rate)
    threads = min(THREADS, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    with np.errstate(divide="ignore", invalid="ignore"):
        tic = time.perf_counter()
        actual = vectorised_scores(forecast, observation)
        first_call_s = time.perf_counter() - tic
        expected = loop_scores(forecast, observation)
        for name in CAT_SCORES:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
        for name in CONT_SCORES:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, err_msg=name)
        # Our window counts are exact where the filter rounds: equal to rounding.
        np.testing.assert_allclose(
            vectorised_fss(forecast, observation), loop_fss(forecast, observation), rtol=1e-10
        )
        times = _interleaved_wall_times(
            {
                "loop": loop_scores,
                "vectorised": vectorised_scores,
                "fss_loop": loop_fss,
                "fss": vectorised_fss,
            },
            (forecast, observation),
            REPEATS,
        )
    medians = {name: float(np.median(values)) for name, values in times.items()}
    return {
        "data": source,
        "n_frame_pairs": int(forecast.shape[0] * forecast.shape[1]),
        "n_thresholds": len(THRESHOLDS),
        "fss_scales": list(FSS_SCALES),
        "threads": threads,
        "repeats": REPEATS,
        "load_average": os.getloadavg(),
        "first_call_s": first_call_s,
        **{f"{name}_times_s": values for name, values in times.items()},
        "loop_s": medians["loop"],
        "vectorised_s": medians["vectorised"],
        "speedup": medians["loop"] / medians["vectorised"],
        "fss_loop_s": medians["fss_loop"],
        "fss_s": medians["fss"],
        "fss_speedup": medians["fss_loop"] / medians["fss"],
    }


def main() -> dict:
    """Run the benchmark on ``NOWCAST_DATA_ROOT``, save the JSON result and print a table."""
    os.environ.setdefault("NOWCAST_DATA_ROOT", "../shared/data/pysteps-data")
    results = bench(os.environ["NOWCAST_DATA_ROOT"])
    save("verification", results)
    print(
        f"verification, {results['data']} data: {results['n_frame_pairs']} frame pairs "
        f"(512x512), {results['n_thresholds']} thresholds; wall time, median of "
        f"{results['repeats']} interleaved runs, {results['threads']} threads, load average "
        f"{results['load_average'][0]:.1f}:"
    )
    print(
        table(
            [
                ("pysteps det_cat + det_cont loop", f"{results['loop_s']:.3f} s"),
                ("nowcast accum, whole stack", f"{results['vectorised_s']:.4f} s"),
                ("  its first call (compile / load kernels)", f"{results['first_call_s']:.2f} s"),
                ("speedup", f"{results['speedup']:.1f}x  (target >= 20x, moonshot >= 50x)"),
                (
                    f"pysteps fss loop, scales {results['fss_scales']}",
                    f"{results['fss_loop_s']:.3f} s",
                ),
                ("nowcast fss_accum, whole stack", f"{results['fss_s']:.4f} s"),
                ("fss speedup", f"{results['fss_speedup']:.1f}x"),
            ]
        )
    )
    return results


if __name__ == "__main__":
    main()
