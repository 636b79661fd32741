"""Streaming verification of precipitation nowcasts.

Each score family follows pysteps' init / accum / merge / compute pattern on whole forecast
stacks (``[n_starts,] n_leadtimes, y, x``): accumulators are sums and counts, so partial results
from Dask workers merge by addition and start times can be bootstrapped.

- :mod:`~nowcast.verification.detcat`: contingency-table scores (CSI, POD, FAR, HSS, ETS, BIAS).
- :mod:`~nowcast.verification.detcont`: ME, MAE, MSE, RMSE and HKO-7 balanced B-MSE / B-MAE.
- :mod:`~nowcast.verification.spatial`: fractions skill score.

Ensemble forecasts (``[n_starts,] n_members, n_leadtimes, y, x``, members first):

- :mod:`~nowcast.verification.ensemble`: CRPS, CRPS of k x k block means, spread/skill ratio.
- :mod:`~nowcast.verification.rankhist`: rank histogram and its KL divergence from flat.
- :mod:`~nowcast.verification.probabilistic`: reliability diagram and ROC curve of exceedance
  probabilities.
- :mod:`~nowcast.verification.brier`: Brier score and Brier skill score.
- :mod:`~nowcast.verification.spectra`: radially averaged power spectra (RAPSD).
- :mod:`~nowcast.verification.member_csi`: median over members of each member's CSI.

Shared:

- :mod:`~nowcast.verification.bootstrap`: start-time bootstrap intervals, paired differences.
- :mod:`~nowcast.verification.interface`: ``get_method`` registry, tidy score and curve tables.
"""

from nowcast.verification._accumulator import (
    ScoreAccumulator,
    concat_starts,
    sum_starts,
    weighted_starts,
)
from nowcast.verification.bootstrap import (
    ConfidenceInterval,
    bootstrap_ci,
    bootstrap_difference,
    resampling_counts,
)
from nowcast.verification.brier import (
    BrierSums,
    brier_accum,
    brier_accum_probability,
    brier_compute,
    brier_init,
    brier_merge,
    brier_skill_score,
)
from nowcast.verification.detcat import (
    ContingencyTable,
    contingency_accum,
    contingency_compute,
    contingency_counts,
    contingency_init,
    contingency_merge,
)
from nowcast.verification.detcont import (
    HKO7_THRESHOLDS,
    HKO7_WEIGHTS,
    ContinuousErrors,
    balanced_weights,
    continuous_accum,
    continuous_compute,
    continuous_init,
    continuous_merge,
    continuous_sums,
)
from nowcast.verification.ensemble import (
    CRPSSums,
    PooledCRPSSums,
    SpreadSkillSums,
    crps_accum,
    crps_compute,
    crps_init,
    crps_merge,
    crps_pooled_accum,
    crps_pooled_compute,
    crps_pooled_init,
    spread_skill_accum,
    spread_skill_compute,
    spread_skill_init,
    spread_skill_merge,
)
from nowcast.verification.interface import (
    CURVE_COLUMNS,
    SCORE_COLUMNS,
    ScoreFamily,
    curves_to_frame,
    ensemble_accumulators,
    ensemble_curves,
    get_method,
    score_ensemble,
    score_forecasts,
    scores_to_frame,
)
from nowcast.verification.member_csi import (
    MemberContingency,
    member_csi_accum,
    member_csi_compute,
    member_csi_init,
    member_csi_merge,
)
from nowcast.verification.probabilistic import (
    ReliabilitySums,
    ROCCounts,
    reldiag_accum,
    reldiag_compute,
    reldiag_init,
    reldiag_merge,
    roc_accum,
    roc_compute,
    roc_curve,
    roc_init,
    roc_merge,
)
from nowcast.verification.rankhist import (
    RankHistogram,
    rankhist_accum,
    rankhist_compute,
    rankhist_init,
    rankhist_merge,
)
from nowcast.verification.spatial import (
    FractionsSums,
    fss_accum,
    fss_compute,
    fss_init,
    fss_merge,
    fss_sums,
)
from nowcast.verification.spectra import (
    SpectrumSums,
    rapsd_accum,
    rapsd_compute,
    rapsd_init,
    rapsd_merge,
)

__all__ = [
    "CURVE_COLUMNS",
    "HKO7_THRESHOLDS",
    "HKO7_WEIGHTS",
    "SCORE_COLUMNS",
    "BrierSums",
    "CRPSSums",
    "ConfidenceInterval",
    "ContingencyTable",
    "ContinuousErrors",
    "FractionsSums",
    "MemberContingency",
    "PooledCRPSSums",
    "ROCCounts",
    "RankHistogram",
    "ReliabilitySums",
    "ScoreAccumulator",
    "ScoreFamily",
    "SpectrumSums",
    "SpreadSkillSums",
    "balanced_weights",
    "bootstrap_ci",
    "bootstrap_difference",
    "brier_accum",
    "brier_accum_probability",
    "brier_compute",
    "brier_init",
    "brier_merge",
    "brier_skill_score",
    "concat_starts",
    "contingency_accum",
    "contingency_compute",
    "contingency_counts",
    "contingency_init",
    "contingency_merge",
    "continuous_accum",
    "continuous_compute",
    "continuous_init",
    "continuous_merge",
    "continuous_sums",
    "crps_accum",
    "crps_compute",
    "crps_init",
    "crps_merge",
    "crps_pooled_accum",
    "crps_pooled_compute",
    "crps_pooled_init",
    "curves_to_frame",
    "ensemble_accumulators",
    "ensemble_curves",
    "fss_accum",
    "fss_compute",
    "fss_init",
    "fss_merge",
    "fss_sums",
    "get_method",
    "member_csi_accum",
    "member_csi_compute",
    "member_csi_init",
    "member_csi_merge",
    "rankhist_accum",
    "rankhist_compute",
    "rankhist_init",
    "rankhist_merge",
    "rapsd_accum",
    "rapsd_compute",
    "rapsd_init",
    "rapsd_merge",
    "reldiag_accum",
    "reldiag_compute",
    "reldiag_init",
    "reldiag_merge",
    "resampling_counts",
    "roc_accum",
    "roc_compute",
    "roc_curve",
    "roc_init",
    "roc_merge",
    "score_ensemble",
    "score_forecasts",
    "scores_to_frame",
    "spread_skill_accum",
    "spread_skill_compute",
    "spread_skill_init",
    "spread_skill_merge",
    "sum_starts",
    "weighted_starts",
]
