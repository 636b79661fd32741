"""Training losses on normalised frames, with no-data pixels masked out.

Every loss has the signature ``loss(prediction, target, mask, target_rain_rate=None)`` and returns
the mean over the valid pixels only (``mask > 0``), so the radar's no-data area neither adds
error nor dilutes the mean. Masking uses :func:`torch.where`, not a product with the mask, so a
NaN or inf under the mask cannot leak into the loss or its gradient.

=========== ================================================================================
name        loss
=========== ================================================================================
mse         mean squared error of the normalised values
mae         mean absolute error of the normalised values
mse+mae     their sum
bmse+bmae   HKO-7 balanced MSE + MAE (Shi et al., 2017): each pixel's squared and absolute
            errors weighted by :func:`balanced_weights` of the target rain rate in mm/h (needs
            ``target_rain_rate``), as the B-MSE / B-MAE of :mod:`nowcast.verification.detcont`
mse+bias    MSE plus a wet-area term: the squared difference between the forecast's soft wet
            fraction and the observed wet fraction of each frame, at the rain thresholds of
            :data:`WET_AREA_THRESHOLDS` (needs ``wet_thresholds``, the thresholds normalised;
            see :func:`mse_wet_area`). It penalises the frequency bias that plain MSE training
            builds up at long lead times, where blurring spreads light rain.
pinball     quantile loss of the normalised values (``loss_kwargs: {quantile: q}``, default
            0.6): a forecast of the q-quantile instead of the mean, see :func:`pinball`
crps        fair CRPS of an ensemble of m >= 2 members of the normalised values, see
            :func:`fair_crps`: the prediction has a member axis, (batch, m, ...), the target not
crps_rain   the same in rain rate (mm/h), see :func:`fair_crps_rain`
=========== ================================================================================

References
----------
Shi, X., Gao, Z., Lausen, L., Wang, H., Yeung, D.-Y., Wong, W.-K. and Woo, W.-C. (2017). Deep
learning for precipitation nowcasting: a benchmark and a new model. NeurIPS 30.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "HKO7_THRESHOLDS",
    "HKO7_WEIGHTS",
    "MEMBER_LOSSES",
    "RAIN_RATE_LOSSES",
    "balanced_mse_mae",
    "balanced_weights",
    "fair_crps",
    "fair_crps_rain",
    "get_method",
    "masked_mae",
    "masked_mse",
    "masked_mse_mae",
    "mse_wet_area",
    "pinball",
    "registered_losses",
]

Loss = Callable[..., torch.Tensor]

# The same bins and weights as nowcast.verification.detcont (the tests check it), so that training
# optimises what is reported. Not imported from there: that package imports pysteps, which costs
# seconds at start-up in every training process (each DDP rank).
#: Rain-rate bin edges (mm/h) of the HKO-7 balanced loss; a bin includes its lower edge.
HKO7_THRESHOLDS = (0.5, 2.0, 5.0, 10.0, 30.0)
#: Weight of each bin: below 0.5, [0.5, 2), [2, 5), [5, 10), [10, 30) and from 30 mm/h up.
HKO7_WEIGHTS = (1.0, 1.0, 2.0, 5.0, 10.0, 30.0)

#: Losses of an ensemble: the prediction has a member axis after the batch axis.
MEMBER_LOSSES = ("crps", "crps_rain")
#: Losses that need the target rain rate (mm/h) as well as the normalised target.
RAIN_RATE_LOSSES = ("bmse+bmae", "crps_rain")
#: Losses that need ``wet_thresholds``: :data:`WET_AREA_THRESHOLDS` in normalised units.
THRESHOLD_LOSSES = ("mse+bias",)
#: Rain rates (mm/h) at which ``mse+bias`` matches wet areas: the evaluation's CSI thresholds.
WET_AREA_THRESHOLDS = (0.5, 1.0, 5.0)


def balanced_weights(rain_rate: torch.Tensor) -> torch.Tensor:
    """Return the HKO-7 weight of each rain rate.

    Parameters
    ----------
    rain_rate : torch.Tensor
        Rain rate in mm/h.

    Returns
    -------
    torch.Tensor
        Weights from :data:`HKO7_WEIGHTS` for the bins split at :data:`HKO7_THRESHOLDS`, of the
        dtype and device of ``rain_rate`` (arbitrary where it is NaN: callers mask those).
    """
    thresholds = torch.tensor(HKO7_THRESHOLDS, dtype=rain_rate.dtype, device=rain_rate.device)
    weights = torch.tensor(HKO7_WEIGHTS, dtype=rain_rate.dtype, device=rain_rate.device)
    # right=True: a rain rate equal to a threshold belongs to the bin above it.
    return weights[torch.bucketize(rain_rate, thresholds, right=True)]


def _masked_error(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the error (zero off the mask), the boolean valid mask and the valid count (>= 1)."""
    valid = mask > 0
    error = torch.where(valid, prediction - target, torch.zeros((), dtype=prediction.dtype))
    # clamp: an all-no-data batch gives a zero loss instead of 0 / 0.
    n_valid = valid.sum().clamp_min(1)
    return error, valid, n_valid


def masked_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error over the valid pixels.

    Parameters
    ----------
    prediction, target : torch.Tensor
        Normalised frames of the same shape, e.g. (batch, n_target_frames, 1, height, width).
    mask : torch.Tensor
        1 where the target is valid, 0 for no data; same shape.
    target_rain_rate : torch.Tensor, optional
        Unused; accepted so that every loss has the same signature.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    error, _, n_valid = _masked_error(prediction, target, mask)
    return (error * error).sum() / n_valid


def masked_mae(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean absolute error over the valid pixels.

    Parameters
    ----------
    prediction, target : torch.Tensor
        Normalised frames of the same shape.
    mask : torch.Tensor
        1 where the target is valid, 0 for no data.
    target_rain_rate : torch.Tensor, optional
        Unused; accepted so that every loss has the same signature.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    error, _, n_valid = _masked_error(prediction, target, mask)
    return error.abs().sum() / n_valid


def masked_mse_mae(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of :func:`masked_mse` and :func:`masked_mae`.

    Parameters
    ----------
    prediction, target : torch.Tensor
        Normalised frames of the same shape.
    mask : torch.Tensor
        1 where the target is valid, 0 for no data.
    target_rain_rate : torch.Tensor, optional
        Unused; accepted so that every loss has the same signature.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    error, _, n_valid = _masked_error(prediction, target, mask)
    return (error * error + error.abs()).sum() / n_valid


def balanced_mse_mae(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """HKO-7 balanced MSE + balanced MAE over the valid pixels.

    ``sum(w * (e**2 + |e|)) / n_valid`` where ``e`` is the error of the normalised values and
    ``w`` the HKO-7 weight of the target rain rate (1, 1, 2, 5, 10, 30 for the bins split at
    0.5, 2, 5, 10 and 30 mm/h, lower edges included). HKO-7 sums over the pixels of a frame;
    dividing by the number of valid pixels instead only rescales the loss and keeps it
    independent of grid size and radar mask, like the verification scores.

    Parameters
    ----------
    prediction, target : torch.Tensor
        Normalised frames of the same shape.
    mask : torch.Tensor
        1 where the target is valid, 0 for no data.
    target_rain_rate : torch.Tensor
        The target as rain rate in mm/h (the inverse normalisation of ``target``).

    Returns
    -------
    torch.Tensor
        Scalar loss.

    Raises
    ------
    ValueError
        If ``target_rain_rate`` is missing.
    """
    if target_rain_rate is None:
        raise ValueError("the balanced loss needs target_rain_rate (mm/h) to weight the pixels")
    error, valid, n_valid = _masked_error(prediction, target, mask)
    weights = torch.where(valid, balanced_weights(target_rain_rate), 0.0).to(error.dtype)
    return (weights * (error * error + error.abs())).sum() / n_valid


def mse_wet_area(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
    *,
    wet_thresholds: torch.Tensor | None = None,
    area_weight: float = 1.0,
    sharpness: float = 0.02,
) -> torch.Tensor:
    """MSE plus a penalty on the difference between forecast and observed wet areas.

    For each frame of each sample and each threshold ``t`` the observed wet fraction is the
    share of valid target pixels above ``t``; the forecast's is the mean over the same pixels of
    ``sigmoid((prediction - t) / sharpness)``, a differentiable count. The penalty is the mean
    squared difference of the two fractions times ``area_weight``. A frequency bias of 2 on a
    frame that is 20 % wet costs 0.04, about the MSE of a fair normalised forecast, so the
    default weight 1 balances the two terms.

    Parameters
    ----------
    prediction, target : torch.Tensor
        Normalised frames ``(batch, n_target_frames, 1, height, width)``.
    mask : torch.Tensor
        1 where the target is valid, 0 for no data.
    target_rain_rate : torch.Tensor, optional
        Unused; accepted so that every loss has the same signature.
    wet_thresholds : torch.Tensor
        The rain thresholds in normalised units (the training loop normalises
        :data:`WET_AREA_THRESHOLDS` with the store's normalization).
    area_weight : float
        Weight of the wet-area term.
    sharpness : float
        Width of the soft threshold in normalised units.

    Returns
    -------
    torch.Tensor
        Scalar loss.

    Raises
    ------
    ValueError
        If ``wet_thresholds`` is missing.
    """
    if wet_thresholds is None:
        raise ValueError("the wet-area loss needs wet_thresholds (normalised rain thresholds)")
    error, valid, n_valid = _masked_error(prediction, target, mask)
    mse = (error * error).sum() / n_valid
    thresholds = wet_thresholds.to(prediction).reshape(-1, 1, 1, 1, 1, 1)
    pixels = (-3, -2, -1)
    n_pixels = valid.sum(dim=pixels).clamp_min(1)
    zero = torch.zeros((), dtype=prediction.dtype, device=prediction.device)
    # torch.where, as in _masked_error: NaN or inf under the mask must not reach the sums.
    soft_wet = torch.where(valid, torch.sigmoid((prediction - thresholds) / sharpness), zero)
    observed_wet = torch.where(valid & (target > thresholds), 1.0, zero)
    forecast_fraction = soft_wet.sum(dim=pixels) / n_pixels
    observed_fraction = observed_wet.sum(dim=pixels) / n_pixels
    area = ((forecast_fraction - observed_fraction) ** 2).mean()
    return mse + area_weight * area


def pinball(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
    *,
    quantile: float = 0.6,
) -> torch.Tensor:
    """Quantile (pinball) loss over the valid pixels: the network learns a quantile, not a mean.

    ``max(q * e, (q - 1) * e)`` with ``e = target - prediction``: under-forecasts cost ``q``,
    over-forecasts ``1 - q``. A quantile above 0.5 counters the damping of intense cores that
    a mean (MSE) forecast of an uncertain future builds up at long lead times.

    Parameters
    ----------
    prediction, target : torch.Tensor
        Normalised frames of the same shape.
    mask : torch.Tensor
        1 where the target is valid, 0 for no data.
    target_rain_rate : torch.Tensor, optional
        Unused; accepted so that every loss has the same signature.
    quantile : float
        The quantile ``q`` in (0, 1).

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"pinball quantile must lie in (0, 1), got {quantile}")
    error, _, n_valid = _masked_error(prediction, target, mask)
    under = -error  # target - prediction
    return torch.maximum(quantile * under, (quantile - 1.0) * under).sum() / n_valid


def fair_crps(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fair (unbiased) CRPS of an ensemble, averaged over the valid pixels.

    For the members ``x_1 ... x_m`` of a pixel and its observation ``y``::

        CRPS_fair = 1/m sum_i |x_i - y| - 1/(2 m (m - 1)) sum_{i,j} |x_i - x_j|

    (Ferro, 2014). Its expectation is smallest when the members are drawn from the distribution
    of the observation, whatever ``m``; the plain ensemble CRPS (``1/(2 m^2)`` instead) would
    reward too little spread at small ``m``. The pair sum is taken on the sorted members,
    ``sum_{i,j} |x_i - x_j| = 2 sum_k (2k - m - 1) x_(k)``, in O(m log m) memory and time.

    Parameters
    ----------
    prediction : torch.Tensor
        Normalised member frames (batch, m, n_target_frames, 1, height, width), m >= 2.
    target : torch.Tensor
        Normalised frames (batch, n_target_frames, 1, height, width).
    mask : torch.Tensor
        1 where the target is valid, 0 for no data; the shape of ``target``.
    target_rain_rate : torch.Tensor, optional
        Unused; accepted so that every loss has the same signature.

    Returns
    -------
    torch.Tensor
        Scalar loss: the sum of the pixels' fair CRPS over the valid pixels, divided by their
        number (each pixel counted once, not once per member).

    Raises
    ------
    ValueError
        If ``prediction`` has no member axis or fewer than 2 members.

    References
    ----------
    Ferro, C. A. T. (2014). Fair scores for ensemble forecasts. Q. J. R. Meteorol. Soc. 140,
    1917-1923.
    """
    if prediction.dim() != target.dim() + 1 or prediction.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"the crps loss needs members (batch, m, ...) of the target's shape "
            f"{tuple(target.shape)}, got {tuple(prediction.shape)}"
        )
    n_members = prediction.shape[1]
    if n_members < 2:
        raise ValueError(f"the fair crps needs at least 2 members per sample, got {n_members}")
    valid = (mask > 0).unsqueeze(1)
    zero = torch.zeros((), dtype=prediction.dtype, device=prediction.device)
    # torch.where before any arithmetic: NaN or inf under the mask must not reach the sums or
    # the gradient (an invalid pixel then has all members and the target at 0: a zero score).
    members = torch.where(valid, prediction, zero)
    observed = torch.where(valid, target.unsqueeze(1), zero)
    error = (members - observed).abs().mean(dim=1)
    ordered = members.sort(dim=1).values
    rank = torch.arange(1, n_members + 1, dtype=prediction.dtype, device=prediction.device)
    weights = (2 * rank - n_members - 1).reshape(1, n_members, *([1] * (target.dim() - 1)))
    pair_sum = 2 * (weights * ordered).sum(dim=1)
    crps = error - pair_sum / (2 * n_members * (n_members - 1))
    n_valid = (mask > 0).sum().clamp_min(1)
    return crps.sum() / n_valid


def fair_crps_rain(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    target_rain_rate: torch.Tensor | None = None,
    to_rain_rate=None,
) -> torch.Tensor:
    """Fair CRPS of the members in rain rate (mm/h), the unit the ensemble is verified in.

    :func:`fair_crps` in the normalised space calibrates the spread of log-like values, which
    exponentiates into a heavy upper tail in mm/h; taking the score in mm/h weighs each member's
    error as the verification does.

    Parameters
    ----------
    prediction, target, mask : torch.Tensor
        As :func:`fair_crps` (normalised members and target).
    target_rain_rate : torch.Tensor
        The target in mm/h.
    to_rain_rate : callable
        The normalisation's inverse, applied to the members (bound by the training step).

    Raises
    ------
    ValueError
        If ``target_rain_rate`` or ``to_rain_rate`` is missing.
    """
    if target_rain_rate is None or to_rain_rate is None:
        raise ValueError("crps_rain needs the target in mm/h and the normalisation's inverse")
    return fair_crps(to_rain_rate(prediction), target_rain_rate, mask)


_LOSSES: dict[str, Loss] = {
    "mse": masked_mse,
    "mae": masked_mae,
    "mse+mae": masked_mse_mae,
    "bmse+bmae": balanced_mse_mae,
    "mse+bias": mse_wet_area,
    "pinball": pinball,
}
# Ensemble losses: their prediction has a member axis, so they are listed apart.
_MEMBER_LOSSES: dict[str, Loss] = {"crps": fair_crps, "crps_rain": fair_crps_rain}


def registered_losses(members: bool = False) -> list[str]:
    """Return the names of the registered losses of one forecast, or of members.

    Parameters
    ----------
    members : bool, optional
        List the ensemble losses (:data:`MEMBER_LOSSES`, whose prediction has a member axis)
        instead of those of a forecast of the target's shape, by default False.

    Returns
    -------
    list of str
        Registered names, sorted.
    """
    return sorted(_MEMBER_LOSSES if members else _LOSSES)


def get_method(name: str) -> Loss:
    """Return the loss function registered under ``name``.

    Parameters
    ----------
    name : str
        One of :func:`registered_losses`, with or without members (case-insensitive).

    Returns
    -------
    callable
        ``loss(prediction, target, mask, target_rain_rate=None) -> scalar tensor``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the registered names.
    """
    key = name.lower() if isinstance(name, str) else name
    registered = {**_LOSSES, **_MEMBER_LOSSES}
    if key not in registered:
        raise ValueError(
            f"unknown loss {name!r}; registered losses are: {', '.join(sorted(registered))}"
        )
    return registered[key]
