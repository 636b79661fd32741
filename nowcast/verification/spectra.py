"""Radially averaged power spectra (RAPSD) of ensemble members and observations, streamed.

Each field's spectrum is pysteps' ``pysteps.utils.spectral.rapsd(field, fft_method=numpy.fft)``:
the squared modulus of the centred 2-D FFT divided by the number of pixels, averaged over rings
of equal rounded radius. The forecast's spectrum at a lead time is the mean over the members of
each member's spectrum (a blurred ensemble mean would understate the members' small-scale
power); it is set against the observation's spectrum. Sums of spectra and the number of frames
are kept per lead time, so accumulators merge by addition.

rapsd takes no NaN. Where the observation or any member is not finite, every field of the frame
(members and observation alike) is set to 0 before the FFT, so that all spectra of a frame see
the same domain. Forecasts and observations are laid out as in
:mod:`~nowcast.verification.ensemble`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nowcast import import_pysteps
from nowcast.verification._accumulator import (
    ScoreAccumulator,
    add_into,
    as_coordinate,
    leading_shape,
    merge,
)
from nowcast.verification.ensemble import as_ensemble, check_settings, member_frames

_centred_coordinates = import_pysteps("pysteps.utils.arrays").compute_centred_coord_array


@dataclasses.dataclass(eq=False)
class SpectrumSums(ScoreAccumulator):
    """Sums of radially averaged power spectra per lead time and wavelength.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    wavelengths : numpy.ndarray
        Wavelength of each ring, ``1 / frequency`` with rapsd's frequencies (``inf`` for the
        mean), in the unit of ``pixel_size``; shape (n_wavelengths,).
    sum_forecast : numpy.ndarray
        float64 sum over frames of the members' mean spectrum, shaped ([n_starts,]
        n_leadtimes, n_wavelengths).
    sum_observed : numpy.ndarray
        float64 sum over frames of the observation's spectrum, same shape.
    n : numpy.ndarray
        int64 number of frames, shaped ([n_starts,] n_leadtimes).
    shape : tuple of int
        The (y, x) shape of the fields.
    """

    wavelengths: np.ndarray
    sum_forecast: np.ndarray
    sum_observed: np.ndarray
    n: np.ndarray
    shape: tuple[int, int] = (0, 0)

    dims = ("lead_time", "wavelength")
    coordinate_fields = ("lead_times", "wavelengths")
    additive_fields = ("sum_forecast", "sum_observed", "n")


def _rings(shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Ring index of each pixel of the centred spectrum, as rapsd draws the rings.

    Returns the flat ring labels and the number of rings; pixels outside the last ring get the
    label ``n_rings`` (rapsd leaves the corners out).
    """
    n_rows, n_columns = shape
    y, x = _centred_coordinates(n_rows, n_columns)
    radius = np.sqrt(x * x + y * y).round()
    size = max(n_rows, n_columns)
    n_rings = int(size / 2) + 1 if size % 2 == 1 else int(size / 2)
    labels = np.where(radius < n_rings, radius, n_rings).astype(np.int64).ravel()
    return labels, n_rings


def rapsd_init(
    lead_times: Sequence[float],
    shape: tuple[int, int],
    pixel_size: float = 1.0,
    n_starts: int | None = None,
) -> SpectrumSums:
    """Initialise empty spectrum sums for fields of one shape.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    shape : tuple of int
        The (y, x) shape of the fields.
    pixel_size : float, optional
        Pixel spacing (rapsd's ``d``), e.g. in km for wavelengths in km; by default 1
        (wavelengths in pixels).
    n_starts : int, optional
        Keep sums per forecast start time (for the bootstrap).

    Returns
    -------
    SpectrumSums
        Zero sums shaped ([n_starts,] n_leadtimes, n_wavelengths).
    """
    shape = tuple(int(size) for size in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (y, x) with positive sizes, got {shape}")
    lead_times = as_coordinate(lead_times)
    _, n_rings = _rings(shape)
    frequencies = np.fft.fftfreq(max(shape), d=pixel_size)[:n_rings]
    with np.errstate(divide="ignore"):
        wavelengths = 1.0 / frequencies
    leading = leading_shape(n_starts) + (lead_times.size,)
    return SpectrumSums(
        lead_times,
        wavelengths,
        np.zeros(leading + (n_rings,)),
        np.zeros(leading + (n_rings,)),
        np.zeros(leading, dtype=np.int64),
        shape,
    )


def frame_spectra(members: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the members' mean spectrum and the observation's spectrum of one frame.

    Parameters
    ----------
    members : numpy.ndarray
        (n_members, y, x).
    observed : numpy.ndarray
        (y, x).

    Returns
    -------
    tuple of numpy.ndarray
        Two float64 arrays (n_rings,), each field filled with 0 wherever the observation or any
        member is not finite.
    """
    missing = ~(np.isfinite(observed) & np.isfinite(members).all(axis=0))
    labels, n_rings = _rings(observed.shape)
    ring_sizes = np.bincount(labels, minlength=n_rings + 1)[:n_rings]

    def spectrum(field: np.ndarray) -> np.ndarray:
        field = np.where(missing, 0.0, field)
        power = np.abs(np.fft.fftshift(np.fft.fft2(field))) ** 2 / field.size
        ring_sums = np.bincount(labels, weights=power.ravel(), minlength=n_rings + 1)
        return ring_sums[:n_rings] / ring_sizes

    # One member at a time: a complex spectrum of every member at once would not fit in memory
    # on a large radar grid.
    forecast = sum(spectrum(member) for member in members) / members.shape[0]
    return forecast, spectrum(observed)


def rapsd_accum(sums: SpectrumSums, forecast, observation) -> SpectrumSums:
    """Accumulate an ensemble's and its observation's spectra (in place).

    Parameters
    ----------
    sums : SpectrumSums
        Sums from :func:`rapsd_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x) of fields shaped ``sums.shape``.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x).

    Returns
    -------
    SpectrumSums
        ``sums`` itself, for chaining.
    """
    forecast, observation = as_ensemble(forecast, observation, sums.lead_times.size)
    if observation.shape[-2:] != sums.shape:
        raise ValueError(
            f"fields shaped {observation.shape[-2:]} do not match the spectra's {sums.shape}"
        )
    leading = observation.shape[:-2]
    spectra = np.zeros(leading + (2, sums.wavelengths.size))
    for index, members, observed in member_frames(forecast, observation):
        spectra[index] = frame_spectra(members, observed)
    add_into(sums, "sum_forecast", spectra[..., 0, :])
    add_into(sums, "sum_observed", spectra[..., 1, :])
    add_into(sums, "n", np.ones(leading, dtype=np.int64))
    return sums


def rapsd_merge(first: SpectrumSums, second: SpectrumSums) -> SpectrumSums:
    """Merge two spectrum accumulators with the same coordinates and field shape.

    Parameters
    ----------
    first, second : SpectrumSums
        Sums built on disjoint data.

    Returns
    -------
    SpectrumSums
        New accumulator with added sums; the inputs are unchanged.
    """
    check_settings(first, second, ("shape",))
    return merge(first, second)


def rapsd_compute(sums: SpectrumSums, scores: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Compute the mean spectra.

    Parameters
    ----------
    sums : SpectrumSums
        Accumulated sums; any leading axes are kept.
    scores : sequence of str, optional
        Ignored: spectra are curves; see :func:`rapsd_curves`.

    Returns
    -------
    dict of numpy.ndarray
        ``RAPSD_FORECAST`` (members' mean spectrum) and ``RAPSD_OBSERVED``, shaped like the
        sums; NaN for a lead time without frames.
    """
    n = sums.n[..., None].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"RAPSD_FORECAST": sums.sum_forecast / n, "RAPSD_OBSERVED": sums.sum_observed / n}


def rapsd_curves(sums: SpectrumSums) -> dict[str, dict[str, np.ndarray]]:
    """Return the forecast and observed spectra as curves for tidy tables.

    Parameters
    ----------
    sums : SpectrumSums
        A pooled accumulator.

    Returns
    -------
    dict
        ``RAPSD_FORECAST`` and ``RAPSD_OBSERVED``, each ``{"x": wavelength, "y": power, "n":
        frames}`` with arrays shaped (n_leadtimes, n_wavelengths).
    """
    spectra = rapsd_compute(sums)
    wavelengths = np.broadcast_to(sums.wavelengths, sums.sum_forecast.shape)
    frames = np.broadcast_to(sums.n[..., None], sums.sum_forecast.shape).astype(np.float64)
    return {name: {"x": wavelengths, "y": values, "n": frames} for name, values in spectra.items()}
