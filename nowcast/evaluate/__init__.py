"""Evaluate stage: every forecast method on the same full-domain windows, scored with bootstrap CIs.

For each evaluation window of a split (listed by the patch store on its ``window`` dimension, or
derived from the cubes with the experiment's ``patches`` settings when there is no store yet),
the input frames and the observations are read from the cube and every method
(:mod:`nowcast.nowcasts`) forecasts from the same inputs. All methods of a window are scored on
one mask: the pixels where the observation and every forecast are finite. The scores are
streamed through the accumulators of :mod:`nowcast.verification`, one set per window (forecast
start), so that the pooled scores get percentile-bootstrap confidence intervals over start times
and the difference between two methods a paired interval.

Windows are independent: a Dask ``client.map`` scores them in parallel, each task returning
small accumulators (sums and counts) that are stacked along a start axis afterwards. A trained
model is loaded once per worker process and runs inside the tasks (on CUDA when the worker sees
a GPU). Map panels and the animation are drawn in the main process for a few chosen windows.

Outputs go to ``<run_dir>/evaluation/``, written in a temporary folder renamed into place when
complete: ``metrics.csv`` and ``metrics.json`` (tidy scores, see :data:`METRIC_COLUMNS`),
``differences.csv`` (one method minus each other, :data:`DIFFERENCE_COLUMNS`), ``report.md`` and
``figures/``. With ``score_patches`` also ``patch_metrics.csv``: the same scores on the store's
patches of the split (each patch one start).

When a method is an ensemble (STEPS, the learned ensemble) or a probability forecast
(``lagrangian_probability``), ensembles enter the tables above as their ensemble mean and the
probabilistic scores go to ``ensemble_metrics.csv`` and ``ensemble_curves.csv``
(:mod:`~nowcast.evaluate.ensemble`).

The package: :mod:`~nowcast.evaluate.setup` (the ``evaluate:`` section and the window records),
:mod:`~nowcast.evaluate.scoring` (windows, forecasts and accumulators of one window),
:mod:`~nowcast.evaluate.tables` (stacked accumulators, bootstrap tables),
:mod:`~nowcast.evaluate.ensemble` (probabilistic accumulators and tables),
:mod:`~nowcast.evaluate.report` (Markdown, shared with ``pipelines/skill.py``),
:mod:`~nowcast.evaluate.figures` and :mod:`~nowcast.evaluate.stage` (the stage itself).
"""

from nowcast.evaluate.ensemble import (
    ENSEMBLE_CURVE_COLUMNS,
    ProbabilisticTables,
    ensemble_curves_table,
    ensemble_metrics_table,
    probabilistic_tables,
)
from nowcast.evaluate.figures import draw_figures, map_windows
from nowcast.evaluate.report import markdown_table, report_text
from nowcast.evaluate.scoring import (
    accumulate_scores,
    cube_windows,
    plan_windows,
    score_store_patches,
    score_window,
    store_windows,
)
from nowcast.evaluate.setup import (
    ALL_SOURCES,
    EVALUATION_DIR,
    MAP_RAIN_THRESHOLD,
    SPLITS,
    EvaluateConfig,
    ForecastSetup,
    Window,
    WindowScores,
)
from nowcast.evaluate.stage import (
    EvaluationPlan,
    evaluate,
    plan_evaluation,
    resolve_methods,
    score_and_write,
)
from nowcast.evaluate.tables import (
    DIFFERENCE_COLUMNS,
    DRY_RAIN,
    FALSE_ALARM_RAIN,
    FAMILY_SCORES,
    MASKED_FAMILIES,
    METRIC_COLUMNS,
    differences_table,
    metrics_table,
    stack_starts,
)
from nowcast.windows import select_windows

__all__ = [
    "ALL_SOURCES",
    "DIFFERENCE_COLUMNS",
    "DRY_RAIN",
    "ENSEMBLE_CURVE_COLUMNS",
    "EVALUATION_DIR",
    "FALSE_ALARM_RAIN",
    "FAMILY_SCORES",
    "MAP_RAIN_THRESHOLD",
    "MASKED_FAMILIES",
    "METRIC_COLUMNS",
    "SPLITS",
    "EvaluateConfig",
    "EvaluationPlan",
    "ForecastSetup",
    "ProbabilisticTables",
    "Window",
    "WindowScores",
    "accumulate_scores",
    "cube_windows",
    "differences_table",
    "draw_figures",
    "ensemble_curves_table",
    "ensemble_metrics_table",
    "evaluate",
    "map_windows",
    "markdown_table",
    "metrics_table",
    "plan_evaluation",
    "plan_windows",
    "probabilistic_tables",
    "report_text",
    "resolve_methods",
    "score_and_write",
    "score_store_patches",
    "score_window",
    "select_windows",
    "stack_starts",
    "store_windows",
]
