"""Probability matching: a forecast's distribution made a target's, per lead time.

pysteps matches inside its own methods (STEPS' ``probmatching_method="cdf"``, S-PROG's
``"mean"``); here the same matching is applied to any forecast: by a forecast-method variant's
``postprocess`` (:mod:`nowcast.nowcasts.variants`) and by the learned ensemble on radars it was
not trained on (:class:`nowcast.nowcasts.model.ModelNowcast`).

- ``cdf`` is pysteps' ``nonparam_match_empirical_cdf``: the forecast keeps its ranks and takes
  the target's values, so its wet area and intensities are those of the target;
- ``mean`` keeps the target's wet-area fraction and scales the forecast's conditional mean to
  the target's, as pysteps S-PROG's ``probmatching_method="mean"`` does.
"""

from __future__ import annotations

import numpy as np

from nowcast import import_pysteps

__all__ = ["MATCHING_METHODS", "MATCHING_SETTINGS", "WET_THRESHOLD", "probability_match"]

nonparam_match_empirical_cdf = import_pysteps(
    "pysteps.postprocessing.probmatching"
).nonparam_match_empirical_cdf

#: Rain rate (mm/h) above which a pixel is wet for the ``mean`` matching (the dB threshold of
#: the pysteps baselines, see :data:`nowcast.nowcasts.extrapolation.DB_THRESHOLD`).
WET_THRESHOLD = 0.1
#: The matching methods.
MATCHING_METHODS = ("cdf", "mean")
#: The settings of the learned ensemble's ``probability_matching``: its checkpoint's choice
#: off its training radars, no matching, or a matching method everywhere.
MATCHING_SETTINGS = ("auto", "none", *MATCHING_METHODS)


def probability_match(values: np.ndarray, target: np.ndarray, method: str = "cdf") -> np.ndarray:
    """Match each lead's distribution to its target on the pixels where both have data.

    Parameters
    ----------
    values : numpy.ndarray
        Forecast rain rate (n_leadtimes, ...) in mm/h, NaN for no data: every lead's values
        are matched together (an ensemble's lead, (n_leadtimes, n_members, y, x), is pooled).
    target : numpy.ndarray
        Target rain rate, broadcast to each lead's values: (y, x) for every lead or
        (n_leadtimes, y, x).
    method : {"cdf", "mean"}
        See the module docstring (:data:`MATCHING_METHODS`).

    Returns
    -------
    numpy.ndarray
        float32 forecast; pixels without target data keep their value.
    """
    values = np.array(values, dtype=np.float32)
    targets = np.broadcast_to(target, values.shape)
    for lead, (field, goal) in enumerate(zip(values, targets, strict=True)):
        both = np.isfinite(field) & np.isfinite(goal)
        if not both.any():
            continue
        matched = _match(np.clip(field[both], 0.0, None), np.clip(goal[both], 0.0, None), method)
        values[lead][both] = matched
    return values


def _match(values: np.ndarray, target: np.ndarray, method: str) -> np.ndarray:
    if method == "cdf":
        return nonparam_match_empirical_cdf(values, target).astype(np.float32)
    # "mean": pysteps implements it only inside S-PROG's loop (in dB), so it is written here
    # in rain rate: keep the target's wet fraction, then scale the wet mean to the target's.
    wet_target = target >= WET_THRESHOLD
    if not wet_target.any() or not (values > 0).any():
        return np.zeros_like(values, dtype=np.float32)
    cut = np.quantile(values, 1.0 - wet_target.mean())
    wet = (values >= cut) & (values > 0)
    scale = target[wet_target].mean() / values[wet].mean()
    return np.where(wet, values * scale, 0.0).astype(np.float32)
