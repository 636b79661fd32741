"""Streaming verification of precipitation nowcasts.

Each score family follows pysteps' init / accum / merge / compute pattern on whole forecast
stacks (``[n_starts,] n_leadtimes, y, x``): accumulators are sums and counts, so partial results
from Dask workers merge by addition and start times can be bootstrapped.

- :mod:`~nowcast.verification.detcat`: contingency-table scores (CSI, POD, FAR, HSS, ETS, BIAS).
- :mod:`~nowcast.verification.detcont`: ME, MAE, MSE, RMSE and HKO-7 balanced B-MSE / B-MAE.
- :mod:`~nowcast.verification.spatial`: fractions skill score.
- :mod:`~nowcast.verification.bootstrap`: start-time bootstrap intervals, paired differences.
- :mod:`~nowcast.verification.interface`: ``get_method`` registry and tidy score tables.
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
from nowcast.verification.interface import (
    SCORE_COLUMNS,
    ScoreFamily,
    get_method,
    score_forecasts,
    scores_to_frame,
)
from nowcast.verification.spatial import (
    FractionsSums,
    fss_accum,
    fss_compute,
    fss_init,
    fss_merge,
    fss_sums,
)

__all__ = [
    "HKO7_THRESHOLDS",
    "HKO7_WEIGHTS",
    "SCORE_COLUMNS",
    "ConfidenceInterval",
    "ContingencyTable",
    "ContinuousErrors",
    "FractionsSums",
    "ScoreAccumulator",
    "ScoreFamily",
    "balanced_weights",
    "bootstrap_ci",
    "bootstrap_difference",
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
    "fss_accum",
    "fss_compute",
    "fss_init",
    "fss_merge",
    "fss_sums",
    "get_method",
    "resampling_counts",
    "score_forecasts",
    "scores_to_frame",
    "sum_starts",
    "weighted_starts",
]
