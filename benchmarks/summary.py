"""The one table of ratios that ``make bench`` prints last: every benchmark's peer ratios.

Each row reads a key of a benchmark's ``benchmarks/results/<name>.json``; a benchmark not run in
this invocation shows its last saved result, with its date.
"""

from __future__ import annotations

import json

from benchmarks.common import RESULTS, table

#: (benchmark, label, key path in its results, format, target). Ratios only: each is measured
#: against a peer in the same run.
ROWS = (
    (
        "evaluate",
        "model nowcast / pysteps LK, BoM 512², CPU",
        "model_over_lk",
        "{:.2f}x",
        "<= 0.8x (moonshot 0.5x)",
    ),
    (
        "ensemble",
        "learned ensemble / pysteps STEPS, 20 members, BoM 512², CPU",
        "ensemble_over_steps",
        "{:.2f}x",
        "<= 0.5x (stretch 0.25x, moonshot 0.1x)",
    ),
    ("predict", "`nowcast predict` wall / its own work", "wall_over_work", "{:.2f}x", "<= 1.3x"),
    (
        "watch",
        "`predict --watch` wall / work per nowcast, steady state",
        "wall_over_work",
        "{:.2f}x",
        "<= 1.3x",
    ),
    ("watch", "`predict --watch` RSS, last / 10th nowcast", "rss_ratio", "{:.2f}x", "<= 1.1x"),
    (
        "verification",
        "verification speed-up over pysteps' loop",
        "speedup",
        "{:.1f}x",
        ">= 20x (moonshot 50x)",
    ),
    ("verification", "FSS speed-up over pysteps' loop", "fss_speedup", "{:.1f}x", ""),
    (
        "ingest",
        "ingest speed-up over pysteps, fresh process",
        "speedup_vs_pysteps_cold",
        "{:.1f}x",
        ">= 20x",
    ),
    (
        "ingest",
        "warm ingest / bare parallel decode",
        "warm_over_bare_decode",
        "{:.2f}x",
        "<= 1.3x (moonshot)",
    ),
    (
        "scale",
        "ingest peak RSS, 16x / 1x archive",
        "growth.ingest.peak_rss_ratio.x16",
        "{:.2f}",
        "<= 1.2",
    ),
    (
        "scale",
        "Eulerian patches peak RSS, 16x / 1x",
        "growth.patches_eulerian.peak_rss_ratio.x16",
        "{:.2f}",
        "<= 1.2",
    ),
    (
        "scale",
        "Lagrangian patches peak RSS, 16x / 1x",
        "growth.patches_lagrangian.peak_rss_ratio.x16",
        "{:.2f}",
        "<= 1.2",
    ),
    (
        "scale",
        "evaluate peak RSS, 16x / 1x",
        "growth.evaluate.peak_rss_ratio.x16",
        "{:.2f}",
        "<= 1.2",
    ),
    ("export", "export peak RSS, 4x / 1x windows", "peak_rss_ratio", "{:.2f}", "<= 1.2"),
    (
        "members",
        "learned ensemble peak RSS, 20 / 1 members, 2200 x 1900",
        "rss_many_over_one",
        "{:.2f}",
        "20 members <= 8 GiB",
    ),
    (
        "memory",
        "checkpointing / plain peak memory, 24 frames",
        "checkpointing_over_plain_at_24",
        "{:.2f}",
        "",
    ),
    ("train", "loader / training step throughput", "loader_over_training", "{:.1f}x", "> 1x"),
)


def _lookup(results: dict, path: str):
    value = results
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def ratio_table(run_now: set[str]) -> str:
    """The table of :data:`ROWS` from the saved results.

    Parameters
    ----------
    run_now : set of str
        Benchmarks run in this invocation (the others are marked with their date).

    Returns
    -------
    str
    """
    rows = []
    for name, label, path, fmt, target in ROWS:
        saved = RESULTS / f"{name}.json"
        if not saved.exists():
            rows.append((label, f"not measured (make bench ARGS={name})"))
            continue
        payload = json.loads(saved.read_text())
        value = _lookup(payload.get("results", {}), path)
        if value is None:
            rows.append((label, f"not in {saved.name}"))
            continue
        when = "" if name in run_now else f"  [from {payload.get('created', '?')[:10]}]"
        goal = f"  target {target}" if target else ""
        rows.append((label, fmt.format(value) + goal + when))
    return table(rows)
