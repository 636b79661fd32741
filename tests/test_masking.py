"""STEPS' incremental mask (nowcast.nowcasts.masking) against pysteps, and on the members."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import ndimage as scipy_ndimage

from nowcast import import_pysteps
from nowcast.nowcasts.masking import (
    RIM,
    WET_THRESHOLD,
    apply_incremental_mask,
    incremental_mask,
    mask_radius,
)

nowcast_utils = import_pysteps("pysteps.nowcasts.utils")


def pysteps_mask(wet: np.ndarray, radius: int, rim: int = RIM) -> np.ndarray:
    """The mask as pysteps' STEPS builds it (``steps.py``, ``mask_method="incremental"``)."""
    structure = scipy_ndimage.iterate_structure(
        scipy_ndimage.generate_binary_structure(2, 1), radius
    )
    return nowcast_utils.compute_dilated_mask(wet, structure, rim)


def test_radius_is_pysteps_rule():
    # pysteps: int((mask_f * timestep / kmperpixel - 1) / 2).
    assert mask_radius(10, 0.5) == 9  # BoM at the model's 10-min step
    assert mask_radius(5, 1.0) == 2  # FMI at 5 min
    assert mask_radius(10, 1.0) == 4
    assert mask_radius(5, 8.0) == 0  # a step shorter than a pixel: no buffer, only the rim


def test_mask_equals_pysteps_on_a_real_frame(bom_cube):
    rain = xr.open_zarr(bom_cube)["rain_rate"]
    for time in (50, 60):  # two wet frames of the day, about 50 % and 20 % wet
        frame = np.nan_to_num(rain.isel(time=time).values)
        wet = frame >= WET_THRESHOLD
        assert 0 < wet.mean() < 1
        for radius in (9, 2):
            np.testing.assert_allclose(
                incremental_mask(wet, radius), pysteps_mask(wet, radius), rtol=0, atol=1e-6
            )


def test_a_dry_field_masks_everything():
    assert not incremental_mask(np.zeros((8, 9), bool), 3).any()


def test_members_cannot_rain_far_from_rain():
    last = np.zeros((80, 80), np.float32)
    last[10:14, 10:14] = 5.0  # one observed cell in a corner
    member = np.full((3, 80, 80), 2.0, np.float32)  # a member raining everywhere
    masked = apply_incremental_mask(member.copy(), last, structure_radius=4, rim=2)
    for lead in range(3):
        # Step k can reach (k + 1) * (radius + rim) pixels beyond the observed cell.
        reach = (lead + 1) * 6
        wet = masked[lead] > 0
        rows, cols = np.nonzero(wet)
        assert rows.max() <= 13 + reach and cols.max() <= 13 + reach
        assert wet[12, 12] and masked[lead, 12, 12] == 2.0  # untouched where it rained
    assert (masked[2] > 0).sum() > (masked[0] > 0).sum()  # the mask grows with the lead
    assert not apply_incremental_mask(member.copy(), np.zeros_like(last), 4).any()
