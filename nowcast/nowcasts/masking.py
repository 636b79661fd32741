"""STEPS' incremental precipitation mask, for the members of a learned ensemble.

pysteps' STEPS (``mask_method="incremental"``) keeps each member from raining where its rain
cannot have come from: at every step the member's forecast, in the Lagrangian frame, is
multiplied by a mask that is 1 within ``structure_radius`` pixels of the previous step's wet
area (the last observation's at the first step) and falls to 0 over a rim of ``rim`` more
pixels. The radius is pysteps' ``int((mask_f * timestep / kmperpixel - 1) / 2)`` with
``mask_f = 1``: about half a kilometre a minute. The learned ensemble's members apply the same
mask, so their noise cannot start cells far from any rain, as STEPS' cannot.

pysteps builds the mask with ``nowcasts.utils.compute_dilated_mask``: one binary dilation by a
diamond of ``structure_radius`` and ``rim`` more by a cross, each a pass over the grid. The mask
is a function of the taxicab distance ``d`` to the nearest wet pixel,
``clip((structure_radius + rim + 1 - d) / (rim + 1), 0, 1)``, so here it is computed from one
``scipy.ndimage.distance_transform_cdt`` pass instead: the same values (tested against pysteps),
about ten times faster, which matters with a mask per member and lead time.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_cdt

__all__ = ["RIM", "WET_THRESHOLD", "apply_incremental_mask", "incremental_mask", "mask_radius"]

#: pysteps' ``mask_kwargs`` default ``mask_rim``: pixels over which the mask falls to 0.
RIM = 10
#: pysteps' ``precip_thr`` of its STEPS example, in mm/h: the wet area that the mask grows from.
WET_THRESHOLD = 0.1


def mask_radius(timestep_minutes: float, km_per_pixel: float, mask_f: float = 1.0) -> int:
    """pysteps' structuring-element radius of the incremental mask, in pixels per step.

    Parameters
    ----------
    timestep_minutes : float
        Forecast step in minutes.
    km_per_pixel : float
        Pixel size in km.
    mask_f : float, optional
        pysteps' ``mask_f``, by default 1.

    Returns
    -------
    int
        ``int((mask_f * timestep_minutes / km_per_pixel - 1) / 2)``, at least 0 (20 pixels of
        0.5 km at 10 min give 9).
    """
    return max(int((mask_f * timestep_minutes / km_per_pixel - 1) / 2.0), 0)


def incremental_mask(wet: np.ndarray, structure_radius: int, rim: int = RIM) -> np.ndarray:
    """pysteps' ``compute_dilated_mask`` of a wet area, with a diamond of ``structure_radius``.

    Parameters
    ----------
    wet : numpy.ndarray
        Boolean wet area (y, x).
    structure_radius : int
        Radius of the diamond the wet area is dilated by (:func:`mask_radius`).
    rim : int, optional
        Pixels over which the mask falls from 1 to 0 beyond that, by default :data:`RIM`.

    Returns
    -------
    numpy.ndarray
        float32 mask in [0, 1] (y, x); all 0 when nothing is wet (pysteps divides by 0 there).
    """
    wet = np.asarray(wet, dtype=bool)
    if not wet.any():
        return np.zeros(wet.shape, dtype=np.float32)
    distance = distance_transform_cdt(~wet, metric="taxicab").astype(np.float32)
    mask = (structure_radius + rim + 1 - distance) / (rim + 1)
    return np.clip(mask, 0.0, 1.0, out=mask)


def apply_incremental_mask(
    member: np.ndarray, last_observed: np.ndarray, structure_radius: int, rim: int = RIM
) -> np.ndarray:
    """Mask one member's lead times in turn, each by the previous one's dilated wet area.

    Parameters
    ----------
    member : numpy.ndarray
        Rain rate (n_leadtimes, y, x) in mm/h, >= 0, in the frame the mask is to follow (the
        Lagrangian frame of a Lagrangian model). Masked in place.
    last_observed : numpy.ndarray
        The last observed rain rate (y, x) in mm/h, in the same frame; NaN counts as dry.
    structure_radius, rim : int
        As for :func:`incremental_mask`.

    Returns
    -------
    numpy.ndarray
        ``member``, masked.
    """
    wet = np.nan_to_num(last_observed, nan=0.0) >= WET_THRESHOLD
    for lead in range(member.shape[0]):
        member[lead] *= incremental_mask(wet, structure_radius, rim)
        wet = member[lead] >= WET_THRESHOLD
    return member
