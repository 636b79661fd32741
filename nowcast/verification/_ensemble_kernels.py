"""Compiled per-frame reduction behind the CRPS accumulators.

Why numba: pysteps' ``CRPS_accum`` sorts the members of every pixel and fills two
(n_pixels, n_members + 1) arrays through a dozen masked passes per member. This kernel sorts
each pixel's members in a small buffer and sums its CRPS in one pass, with the interval tests
and the arithmetic of ``CRPS_accum``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _sort_small(values):
    """Sort a short array in place (insertion sort: a few dozen members at most)."""
    for i in range(1, values.size):
        current = values[i]
        j = i - 1
        while j >= 0 and values[j] > current:
            values[j + 1] = values[j]
            j -= 1
        values[j + 1] = current


@numba.njit(nogil=True, cache=True)
def crps_sum(members, observed, below, above):
    """Sum pysteps' CRPS over the pixels where the observation and every member are finite.

    Parameters
    ----------
    members : numpy.ndarray
        (n_members, n_pixels) float32 or float64, C-contiguous.
    observed : numpy.ndarray
        (n_pixels,) in the same dtype.
    below, above : numpy.ndarray
        float64 (n_members + 1,): ``p**2`` and ``(1 - p)**2`` for ``p = i / n_members``, the
        weights of the parts of each interval below and above the observation.

    Returns
    -------
    tuple
        float64 sum of the CRPS and the number of valid pixels. As in ``CRPS_accum``, interval
        lengths are formed in the data dtype and weighted in float64, and the tests are strict:
        an interval with an end equal to the observation adds nothing.
    """
    n_members, n_pixels = members.shape
    sorted_values = np.empty(n_members, members.dtype)
    total = 0.0
    n_valid = 0
    for j in range(n_pixels):
        y = observed[j]
        valid = np.isfinite(y)
        for i in range(n_members):
            value = members[i, j]
            valid = valid and np.isfinite(value)
            sorted_values[i] = value
        if not valid:
            continue
        _sort_small(sorted_values)
        first, last = sorted_values[0], sorted_values[n_members - 1]
        score = 0.0
        if y < first:
            score += np.float64(first - y) * above[0]
        for i in range(1, n_members):
            lower, upper = sorted_values[i - 1], sorted_values[i]
            if y > upper:
                score += np.float64(upper - lower) * below[i]
            elif upper > y and y > lower:
                score += np.float64(y - lower) * below[i] + np.float64(upper - y) * above[i]
            elif y < lower:
                score += np.float64(upper - lower) * above[i]
        if last < y:
            score += np.float64(y - last) * below[n_members]
        total += score
        n_valid += 1
    return total, n_valid
