"""The members' critical success index: each member's CSI, then the median over members.

An ensemble's exceedance probability smooths heavy rain away, while each member keeps its
intensity; this score asks how well a typical member places the events. Per member, the four
contingency-table cells are counted with the deterministic convention of
:mod:`~nowcast.verification.detcat` (its :func:`~nowcast.verification.detcat.contingency_counts`:
an event is ``value > threshold``, strictly, compared in the data's dtype) and summed over windows,
so partial results merge by addition and start times can be bootstrapped. Only
:func:`member_csi_compute` turns the pooled cells into each member's CSI (pysteps'
``det_cat_fct_compute``) and takes the median over members, per lead time and threshold.

Pixels: where the observation and every member are finite, the pixels of the other ensemble
families (:func:`~nowcast.verification.ensemble.valid_pixels`). A one-member forecast's
``MEMBER_CSI`` is therefore its deterministic CSI on the same pixels.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np

from nowcast.verification._accumulator import (
    ScoreAccumulator,
    add_into,
    as_coordinate,
    leading_shape,
    merge,
)
from nowcast.verification.detcat import (
    ContingencyTable,
    contingency_compute,
    contingency_counts,
)
from nowcast.verification.ensemble import as_ensemble, check_scores
from nowcast.verification.probabilistic import DEFAULT_THRESHOLDS


@dataclasses.dataclass(eq=False)
class MemberContingency(ScoreAccumulator):
    """Contingency-table cells of every member per lead time and threshold.

    Attributes
    ----------
    lead_times : numpy.ndarray
        Lead times (minutes), shape (n_leadtimes,).
    thresholds : numpy.ndarray
        Event thresholds (mm/h), shape (n_thresholds,).
    members : numpy.ndarray
        Member indices 0 .. n_members - 1 (int), shape (n_members,).
    hits, misses, false_alarms, correct_negatives : numpy.ndarray
        int64 counts shaped ([n_starts,] n_leadtimes, n_thresholds, n_members).
    """

    thresholds: np.ndarray
    members: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    false_alarms: np.ndarray
    correct_negatives: np.ndarray

    dims = ("lead_time", "threshold", "member")
    coordinate_fields = ("lead_times", "thresholds", "members")
    additive_fields = ContingencyTable.additive_fields


def member_csi_init(
    lead_times: Sequence[float],
    n_members: int,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    n_starts: int | None = None,
) -> MemberContingency:
    """Initialise empty per-member contingency tables.

    Parameters
    ----------
    lead_times : sequence of float
        Lead times in minutes.
    n_members : int
        Members of the ensemble (1 for a deterministic forecast).
    thresholds : sequence of float, optional
        Event thresholds (mm/h), by default 1, 5 and 10.
    n_starts : int, optional
        Keep counts per forecast start time (for the bootstrap).

    Returns
    -------
    MemberContingency
        Zero counts shaped ([n_starts,] n_leadtimes, n_thresholds, n_members).
    """
    if int(n_members) < 1:
        raise ValueError(f"n_members must be at least 1, got {n_members}")
    lead_times = as_coordinate(lead_times)
    thresholds = as_coordinate(thresholds)
    members = np.arange(int(n_members), dtype=np.int64)
    shape = leading_shape(n_starts) + (lead_times.size, thresholds.size, members.size)
    return MemberContingency(
        lead_times,
        thresholds,
        members,
        *(np.zeros(shape, dtype=np.int64) for _ in MemberContingency.additive_fields),
    )


def member_csi_accum(table: MemberContingency, forecast, observation) -> MemberContingency:
    """Accumulate an ensemble into the per-member contingency tables (in place).

    Parameters
    ----------
    table : MemberContingency
        Tables from :func:`member_csi_init`.
    forecast : array_like
        Ensemble ([n_starts,] n_members, n_leadtimes, y, x) in mm/h; a deterministic forecast is
        a one-member ensemble.
    observation : array_like
        Observation ([n_starts,] n_leadtimes, y, x) in mm/h.

    Returns
    -------
    MemberContingency
        ``table`` itself, for chaining. A pixel where the observation or any member is not
        finite counts for no member.
    """
    forecast, observation = as_ensemble(forecast, observation, table.lead_times.size)
    n_members = forecast.shape[-4]
    if n_members != table.members.size:
        raise ValueError(
            f"the tables are for {table.members.size} members, the ensemble has {n_members}"
        )
    # A member's no-data removes the pixel for every member, as in the other ensemble families.
    every_member = np.isfinite(forecast).all(axis=-4)
    observation = np.where(every_member, observation, observation.dtype.type(np.nan))
    # One member at a time: no observation copy the size of the whole ensemble.
    per_member = [
        contingency_counts(np.take(forecast, member, axis=-4), observation, table.thresholds)
        for member in range(n_members)
    ]
    for name in MemberContingency.additive_fields:
        add_into(table, name, np.stack([counts[name] for counts in per_member], axis=-1))
    return table


def member_csi_merge(first: MemberContingency, second: MemberContingency) -> MemberContingency:
    """Merge two per-member tables with the same coordinates (members included).

    Parameters
    ----------
    first, second : MemberContingency
        Tables built on disjoint data.

    Returns
    -------
    MemberContingency
        New tables with summed counts; the inputs are unchanged.
    """
    return merge(first, second)


def member_csi(table: MemberContingency) -> np.ndarray:
    """Each member's CSI (pysteps' formula), shaped like the counts (member axis last)."""
    # contingency_compute reads only the counts, whatever axes they carry.
    cells = {name: getattr(table, name) for name in MemberContingency.additive_fields}
    counts = ContingencyTable(table.lead_times, table.thresholds, **cells)
    return contingency_compute(counts, ("CSI",))["CSI"]


def member_csi_compute(
    table: MemberContingency, scores: Sequence[str] = ("MEMBER_CSI",)
) -> dict[str, np.ndarray]:
    """The median over members of each member's CSI.

    Parameters
    ----------
    table : MemberContingency
        Accumulated tables; any leading axes (starts, bootstrap samples) are kept.
    scores : sequence of str, optional
        Only ``("MEMBER_CSI",)``.

    Returns
    -------
    dict of numpy.ndarray
        ``{"MEMBER_CSI": array}`` shaped ([...,] n_leadtimes, n_thresholds). Members whose CSI
        is undefined (no event forecast or observed) are left out of the median; NaN when no
        member's is defined.
    """
    check_scores(scores, ("MEMBER_CSI",))
    with warnings.catch_warnings():
        # All members undefined: NaN is the answer, not a problem worth a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"MEMBER_CSI": np.nanmedian(member_csi(table), axis=-1)}
