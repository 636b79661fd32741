"""One pipeline stage in a fresh process, for :mod:`benchmarks.bench_scale`.

``python benchmarks/scale_stage.py STAGE TARGET [SCHEDULER] [--catalog PATH]`` runs ``ingest``
(TARGET ``source@cube_dir``, the source read from the catalog at ``PATH``), ``patches_eulerian`` /
``patches_lagrangian`` or ``evaluate`` (TARGET an experiment config) through the stage's library
entry point and prints one line, ``SCALE_STAGE_RESULT {json}``, with the seconds of the call and
the output path. It imports nothing from ``benchmarks`` and is run as a script, so the
``nowcast`` package comes from ``PYTHONPATH``: the benchmark can measure a snapshot of a commit
while others edit the working tree.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

#: Marker of the one JSON line printed with the stage's own measurements.
MARKER = "SCALE_STAGE_RESULT "


def _call(fn, *args, **kwargs):
    """Call a stage entry point with the keyword arguments it accepts.

    The stages are being rewritten; dropping an option an entry point no longer takes (e.g.
    ``progress``) keeps the harness working across those changes.
    """
    accepted = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})


def run_stage(stage: str, target: str, scheduler: str | None, catalog: str | None = None) -> dict:
    """Run one stage in this process.

    ``catalog`` is the catalog file ingest reads its source from (default: the packaged one).

    Returns
    -------
    dict
        ``call_s`` (seconds of the library call), ``output`` (path written) and, for evaluate,
        ``n_windows`` (forecast start times scored).
    """
    start = time.perf_counter()
    if stage == "ingest":
        from nowcast.sources.catalog import load_catalog
        from nowcast.sources.ingest import ingest

        source, cube_dir = target.split("@", 1)
        result = _call(
            ingest,
            source,
            cube_dir,
            catalog=load_catalog(catalog),
            scheduler=scheduler,
            force=True,
            progress=False,
        )
        return {"call_s": time.perf_counter() - start, "output": result.path}
    if stage in ("patches_eulerian", "patches_lagrangian"):
        from nowcast.patches.build import build_patches

        path = _call(build_patches, target, scheduler=scheduler, force=True, progress=False)
        return {"call_s": time.perf_counter() - start, "output": str(path)}
    if stage == "evaluate":
        from nowcast.evaluate.stage import evaluate

        outputs = _call(evaluate, target, scheduler=scheduler, progress=False)
        seconds = time.perf_counter() - start
        summary = json.loads(Path(outputs["metrics_json"]).read_text())
        n_windows = sum(s["n_windows"] for s in summary["sources"].values())
        return {"call_s": seconds, "output": outputs["folder"], "n_windows": n_windows}
    raise SystemExit(f"unknown stage '{stage}'")


def main(argv: list[str]) -> int:
    """``STAGE TARGET [SCHEDULER] [--catalog PATH]``: run the stage and print its result line."""
    parser = argparse.ArgumentParser(prog="scale_stage.py")
    parser.add_argument("stage")
    parser.add_argument("target")
    parser.add_argument("scheduler", nargs="?")
    parser.add_argument("--catalog", help="catalog file of the ingest source")
    args = parser.parse_args(argv)
    result = run_stage(args.stage, args.target, args.scheduler, args.catalog)
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
