"""Compiled per-frame reductions behind the contingency and continuous accumulators.

Why numba: numpy needs one pass (and one temporary) per comparison, threshold and sum. These
kernels read each pixel once and keep their working set in the L1 cache. The FSS kernel counts
the events in each window from a summed-area table instead of running
``scipy.ndimage.uniform_filter`` per threshold and scale. The speed-ups are measured by
``benchmarks/bench_verification.py`` (docs/performance.md).

Each kernel walks a range of frames, so :func:`run_over_frames` splits the frames between
threads (the kernels release the GIL). Every frame is reduced by one thread in a fixed order,
so results do not depend on the number of threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

#: Pixels per block: two input slices and three 512-pixel buffers stay in the L1 cache, and a
#: float32 count of at most 512 ones is exact; much larger blocks fall out of the cache.
BLOCK_PIXELS = 512
#: Below this many pixels per thread, starting a thread costs more than it saves.
MIN_PIXELS_PER_THREAD = 1 << 17

# reassoc lets LLVM split the sums into SIMD lanes; nnan / ninf are not given, since the
# kernels test for NaN and infinity themselves.
_FASTMATH = {"reassoc", "nsz"}


def kernel_dtype(dtype: np.dtype) -> np.dtype:
    """Return the dtype the kernels compute in for floating data of ``dtype``.

    float16 and float32 data are computed in float32, which holds every float16 exactly
    (thresholds are rounded to float16 first, so events stay the same); float64 in float64, and
    a wider long double is rounded to float64.
    """
    return np.dtype(np.float32) if dtype.itemsize <= 4 else np.dtype(np.float64)


def as_frames(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Return a stack (..., y, x) as a C-contiguous (n_frames, y * x) array of ``dtype``."""
    frames = np.ascontiguousarray(array, dtype=dtype)
    return frames.reshape(-1, array.shape[-2] * array.shape[-1])


def in_kernel_dtype(values, data_dtype: np.dtype) -> np.ndarray:
    """Return thresholds rounded to the data's dtype, as an array of its :func:`kernel_dtype`.

    A Python float is compared in the data's dtype (numpy's weak scalars), as pysteps does;
    rounding first keeps this, where float64 thresholds would split ties differently.
    """
    rounded = np.asarray(values, dtype=np.float64).astype(data_dtype)
    return rounded.astype(kernel_dtype(data_dtype))


def run_over_frames(kernel, n_frames: int, n_pixels: int, *args) -> None:
    """Call ``kernel(*args, first, stop)`` on frame ranges covering ``range(n_frames)``.

    The ranges go to up to ``NUMBA_NUM_THREADS`` threads (by default the number of cores);
    small inputs stay on the calling thread. Python threads rather than ``numba.prange``:
    numba's workqueue threading layer, the one every install has, terminates the process when
    two threads (say, Dask workers) run parallel code at once. The count is read from
    ``numba.config`` rather than ``numba.get_num_threads()``, which would start numba's threading
    layer: that resets the OpenMP thread count torch shares, so a model run after the first
    score would run on another number of threads and round differently.
    """
    n_threads = min(
        numba.config.NUMBA_NUM_THREADS, n_frames, n_frames * n_pixels // MIN_PIXELS_PER_THREAD
    )
    if n_threads <= 1:
        kernel(*args, 0, n_frames)
        return
    bounds = np.linspace(0, n_frames, n_threads + 1).astype(np.int64)
    with ThreadPoolExecutor(n_threads) as pool:
        futures = [
            pool.submit(kernel, *args, first, stop)
            for first, stop in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        for future in futures:
            future.result()


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def count_events(forecast, observation, thresholds, infinity, counts, first, stop):
    """Count valid pairs and events per frame, in place.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        (n_frames, n_pixels) float32 or float64, C-contiguous.
    thresholds : numpy.ndarray
        (n_thresholds,) in the data's dtype; an event is ``value > threshold``.
    infinity : float
        ``inf`` in the data's dtype (keeps the comparisons in that dtype).
    counts : numpy.ndarray
        int64 (n_frames, 1 + 3 * n_thresholds), zero on entry; frame ``i`` gets
        ``[n_valid, n_forecast(t)..., n_observed(t)..., n_both(t)...]``.
    first, stop : int
        The frames to count.
    """
    n_thresholds = thresholds.size
    n_pixels = forecast.shape[1]
    forecast_block = np.empty(BLOCK_PIXELS, forecast.dtype)
    observed_block = np.empty(BLOCK_PIXELS, forecast.dtype)
    # min(forecast, observation) > t exactly when both are events: a hit.
    both_block = np.empty(BLOCK_PIXELS, forecast.dtype)
    one, zero = np.float32(1.0), np.float32(0.0)
    for frame in range(first, stop):
        n_valid = 0
        for start in range(0, n_pixels, BLOCK_PIXELS):
            size = min(BLOCK_PIXELS, n_pixels - start)
            # Slices index from 0: numba then proves indices non-negative and vectorises.
            forecast_values = forecast[frame, start : start + size]
            observed_values = observation[frame, start : start + size]
            for i in range(size):
                fct, obs = forecast_values[i], observed_values[i]
                valid = (abs(fct) < infinity) & (abs(obs) < infinity)
                n_valid += valid
                # A pair with a non-finite value becomes -inf in both: never an event.
                fct = fct if valid else -infinity
                obs = obs if valid else -infinity
                forecast_block[i], observed_block[i] = fct, obs
                both_block[i] = min(fct, obs)
            for k in range(n_thresholds):
                threshold = thresholds[k]
                # float32 counters vectorise as masked SIMD adds (int64 ones need widening).
                n_forecast, n_observed, n_both = zero, zero, zero
                for i in range(size):
                    n_forecast += one if forecast_block[i] > threshold else zero
                    n_observed += one if observed_block[i] > threshold else zero
                    n_both += one if both_block[i] > threshold else zero
                counts[frame, 1 + k] += np.int64(n_forecast)
                counts[frame, 1 + n_thresholds + k] += np.int64(n_observed)
                counts[frame, 1 + 2 * n_thresholds + k] += np.int64(n_both)
        counts[frame, 0] = n_valid


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def sum_errors(forecast, observation, base_weight, edges, steps, infinity, sums, first, stop):
    """Sum errors and HKO-7 weighted errors per frame over the valid pairs, in place.

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        (n_frames, n_pixels) float32 or float64, C-contiguous.
    base_weight : float
        Weight of the lightest rain.
    edges : tuple of float
        Rain rates (data dtype) where the weight steps up: the weight is ``base_weight +
        sum(steps[j] for observation >= edges[j])``. A tuple, so that numba unrolls the loop.
    steps : tuple of float
        The weight increase at each edge.
    infinity : float
        ``inf`` in the data's dtype.
    sums : numpy.ndarray
        float64 (n_frames, 6), filled with ``n, sum e, sum |e|, sum e^2, sum w |e|,
        sum w e^2`` where ``e = forecast - observation`` and a pair is valid when ``e`` is
        finite. ``e``, ``|e|`` and ``e^2`` are formed in the data dtype, as in ``det_cont_fct``.
    first, stop : int
        The frames to sum.
    """
    n_pixels = forecast.shape[1]
    zero = np.zeros(1, forecast.dtype)[0]  # in the data dtype, so that errors stay in it
    for frame in range(first, stop):
        forecast_values, observed_values = forecast[frame], observation[frame]
        n_valid = 0
        sum_error, sum_absolute, sum_squared = 0.0, 0.0, 0.0
        sum_weighted_absolute, sum_weighted_squared = 0.0, 0.0
        for i in range(n_pixels):
            obs = observed_values[i]
            error = forecast_values[i] - obs
            valid = abs(error) < infinity
            n_valid += valid
            error = error if valid else zero
            weight = base_weight
            for j in range(len(edges)):
                weight += steps[j] if obs >= edges[j] else 0.0
            # e^2 in the data dtype, as det_cont_fct forms it (a float32 square can underflow
            # to 0, and must, to equal pysteps); |e| is exact in any dtype. Sums are float64.
            squared = np.float64(error * error)
            error = np.float64(error)
            absolute = abs(error)
            sum_error += error
            sum_absolute += absolute
            sum_squared += squared
            sum_weighted_absolute += weight * absolute
            sum_weighted_squared += weight * squared
        sums[frame, 0] = n_valid
        sums[frame, 1] = sum_error
        sums[frame, 2] = sum_absolute
        sums[frame, 3] = sum_squared
        sums[frame, 4] = sum_weighted_absolute
        sums[frame, 5] = sum_weighted_squared


@numba.njit(nogil=True, cache=True)
def _integrate_events(values, threshold, infinity, pad_rows, pad_columns, integral, events):
    """Fill ``integral`` with the summed-area table of ``finite & value >= threshold``.

    ``integral[r, c]`` counts the events in padded rows ``< r`` and padded columns ``< c``; the
    grid sits after ``pad_rows`` rows and ``pad_columns`` columns of no events, so that windows
    that reach over the edge need no clipping. ``events`` is a buffer of one row.
    """
    n_rows, n_columns = values.shape
    for i in range(n_rows):
        row = values[i]
        for j in range(n_columns):
            events[j] = (row[j] >= threshold) & (abs(row[j]) < infinity)
        previous, current = integral[pad_rows + i], integral[pad_rows + i + 1]
        running = 0
        for j in range(n_columns):
            running += events[j]
            current[pad_columns + 1 + j] = running
        # Left padding stays zero; right padding keeps the row total.
        current[pad_columns + 1 + n_columns :] = running
        for j in range(current.size):
            current[j] += previous[j]
    for r in range(pad_rows + n_rows + 1, integral.shape[0]):
        integral[r] = integral[pad_rows + n_rows]


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _add_window_products(fct_right, fct_left, obs_right, obs_left, products):
    """Add sum(f^2), sum(f o), sum(o^2) of window counts ``right - left`` to ``products``."""
    fct_sq, fct_obs, obs_sq = 0.0, 0.0, 0.0
    for t in range(fct_right.size):
        fct = np.float64(fct_right[t] - fct_left[t])
        obs = np.float64(obs_right[t] - obs_left[t])
        fct_sq += fct * fct
        fct_obs += fct * obs
        obs_sq += obs * obs
    products[0] += fct_sq
    products[1] += fct_obs
    products[2] += obs_sq


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def fractions_products(forecast, observation, thresholds, scales, infinity, sums, first, stop):
    """FSS sums per frame, threshold and scale from window counts, in place.

    ``scipy.ndimage.uniform_filter(events, n, mode="constant")`` at pixel (i, j) is the number
    of events in rows ``i - n // 2 .. i + (n - 1) // 2`` (and the same columns) inside the grid,
    divided by ``n**2``. The counts come from a summed-area table of the events, built once per
    threshold and read at every scale (four lookups per pixel, whatever the scale).

    Parameters
    ----------
    forecast, observation : numpy.ndarray
        (n_frames, n_rows, n_columns) float32 or float64, C-contiguous.
    thresholds : numpy.ndarray
        (n_thresholds,) in the data's dtype; an event is a finite ``value >= threshold``.
    scales : numpy.ndarray
        (n_scales,) int64 window sizes; a size below 1 counts as 1 (no smoothing).
    infinity : float
        ``inf`` in the data's dtype.
    sums : numpy.ndarray
        float64 (n_frames, n_thresholds, n_scales, 3), zero on entry; gets the sums of squared
        forecast fractions, of forecast times observed fractions and of squared observed
        fractions.
    first, stop : int
        The frames to reduce.
    """
    n_rows, n_columns = forecast.shape[1], forecast.shape[2]
    largest_below = max(scales.max(), 1) // 2
    # A window reaching further than the grid counts the same as one reaching to its edge.
    pad_rows, pad_columns = min(largest_below, n_rows - 1), min(largest_below, n_columns - 1)
    shape = (n_rows + 2 * pad_rows + 1, n_columns + 2 * pad_columns + 1)
    fct_integral, obs_integral = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    events = np.empty(n_columns, np.int64)
    # Per row of windows: prefix sums, along the columns, of the counts in the window's rows.
    fct_prefix, obs_prefix = np.empty(shape[1], np.int64), np.empty(shape[1], np.int64)
    products = np.zeros(3)
    for frame in range(first, stop):
        for k in range(thresholds.size):
            for values, integral in (
                (forecast[frame], fct_integral),
                (observation[frame], obs_integral),
            ):
                _integrate_events(
                    values, thresholds[k], infinity, pad_rows, pad_columns, integral, events
                )
            for m in range(scales.size):
                size = max(scales[m], 1)
                row_below, row_above = min(size // 2, pad_rows), min((size - 1) // 2, pad_rows)
                column_below = min(size // 2, pad_columns)
                column_above = min((size - 1) // 2, pad_columns)
                left = pad_columns - column_below
                right = pad_columns + column_above + 1
                products[:] = 0.0
                for i in range(n_rows):
                    top, bottom = pad_rows + i - row_below, pad_rows + i + row_above + 1
                    for j in range(shape[1]):
                        fct_prefix[j] = fct_integral[bottom, j] - fct_integral[top, j]
                        obs_prefix[j] = obs_integral[bottom, j] - obs_integral[top, j]
                    _add_window_products(
                        fct_prefix[right : right + n_columns],
                        fct_prefix[left : left + n_columns],
                        obs_prefix[right : right + n_columns],
                        obs_prefix[left : left + n_columns],
                        products,
                    )
                scale = np.float64(size) ** 4
                sums[frame, k, m, 0] = products[0] / scale
                sums[frame, k, m, 1] = products[1] / scale
                sums[frame, k, m, 2] = products[2] / scale
