"""Wall time of a fresh ``nowcast predict`` process against its own work.

``nowcast predict --source bom --at 2020-10-31T08:50`` (the shipped pretrained model, the BoM
cube, the rainy 08:50 UTC start) runs as a new process ``N_RUNS`` times. Each run reports its
stage timings (``--timings-json``: load_model, read_inputs, model, netcdf, map; their sum is the
work) and its start-up (process start to the start of the work); the benchmark measures the
process's wall time from outside, exit included. Overhead is wall minus work: interpreter
start-up, imports, configuration and exit. The median over the runs is reported, with the
process's CPU seconds (steadier than wall time on a shared machine), and the cumulative import
seconds of the heavy packages from one extra run under ``python -X importtime``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import save, table

SOURCE = "bom"
REFERENCE_TIME = "2020-10-31T08:50"
N_RUNS = 5
REPO = Path(__file__).resolve().parents[1]
#: Packages whose cumulative import time is recorded (the first import of each).
IMPORT_PROFILE = (
    "torch",
    "pysteps",
    "jsonschema",
    "scipy.stats",
    "matplotlib.pyplot",
    "xarray",
    "zarr",
    "cartopy",
    "distributed",
    "nowcast.training.checkpoint",
    "nowcast.predict",
)
_IMPORTTIME_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def predict_command(out_dir: Path, timings_json: Path, cube_dir: Path) -> list[str]:
    """The ``nowcast predict`` command line of one run (raw files if there is no cube)."""
    command = [sys.executable, "-m", "nowcast.cli", "predict", "--source", SOURCE]
    command += ["--at", REFERENCE_TIME, "--out-dir", str(out_dir)]
    command += ["--timings-json", str(timings_json)]
    if (cube_dir / f"{SOURCE}.zarr").exists():
        return command + ["--cube-dir", str(cube_dir)]
    return command + ["--from-files"]


def run_once(command: list[str], timings_json: Path) -> dict:
    """One fresh process: its outside wall and CPU seconds and the timings it reported."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    reported = json.loads(timings_json.read_text())
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "work_s": reported["work_s"],
        "stages_s": reported["stages_s"],
        "startup_s": reported["startup_s"],
        # After the work: writing the summary, then the interpreter's exit.
        "exit_s": wall - reported["wall_s"],
    }


def import_profile(command: list[str]) -> dict:
    """:func:`parse_importtime` of one run of ``command`` under ``python -X importtime``."""
    traced = [command[0], "-X", "importtime", *command[1:]]
    stderr = subprocess.run(traced, cwd=REPO, check=True, capture_output=True, text=True).stderr
    return parse_importtime(stderr)


def parse_importtime(stderr: str) -> dict:
    """Cumulative seconds of the first import of each :data:`IMPORT_PROFILE` package, and of
    all imports (``all``: the sum over the top-level ones)."""
    seconds, total = {}, 0.0
    for match in _IMPORTTIME_LINE.finditer(stderr):
        cumulative, indent, name = int(match.group(2)) / 1e6, match.group(3), match.group(4)
        if indent == " ":  # a top-level import: its cumulative time holds its children's
            total += cumulative
        if name in IMPORT_PROFILE and name not in seconds:
            seconds[name] = cumulative
    return {"all": total, **seconds}


def summarize(runs: list[dict]) -> dict:
    """Medians over the runs; ``wall_over_work`` is the median of each run's ratio."""

    def median(key):
        return statistics.median(run[key] for run in runs)

    stages = {
        name: statistics.median(run["stages_s"][name] for run in runs)
        for name in runs[0]["stages_s"]
    }
    return {
        "wall_s": median("wall_s"),
        "work_s": median("work_s"),
        "overhead_s": statistics.median(run["wall_s"] - run["work_s"] for run in runs),
        "wall_over_work": statistics.median(run["wall_s"] / run["work_s"] for run in runs),
        "startup_s": median("startup_s"),
        "exit_s": median("exit_s"),
        "cpu_s": median("cpu_s"),
        "work_stages_s": stages,
    }


def bench(n_runs: int = N_RUNS) -> dict:
    cube_dir = REPO / "data" / "cubes"
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        timings_json = Path(tmp) / "timings.json"
        command = predict_command(Path(tmp) / "out", timings_json, cube_dir)
        runs = [run_once(command, timings_json) for _ in range(n_runs)]
        imports = import_profile(command)
    return {
        "source": SOURCE,
        "reference_time": REFERENCE_TIME,
        "inputs": "files" if "--from-files" in command else "cube",
        "runs": n_runs,
        "load_average_1min": os.getloadavg()[0],
        **summarize(runs),
        "import_s_under_importtime": imports,
        "each_run": runs,
    }


def main() -> dict:
    os.environ.setdefault("NOWCAST_DATA_ROOT", str(REPO.parent / "shared/data/pysteps-data"))
    results = bench()
    save("predict", results)
    r = results
    print(
        f"fresh `nowcast predict --source {r['source']} --at {r['reference_time']}` "
        f"({r['inputs']}), median of {r['runs']} runs, load average {r['load_average_1min']:.1f}:"
    )
    rows = [
        ("wall (process start to exit)", f"{r['wall_s']:.2f} s  (CPU {r['cpu_s']:.2f} s)"),
        ("work (sum of the stages)", f"{r['work_s']:.2f} s"),
    ]
    rows += [(f"  {name}", f"{seconds:.2f} s") for name, seconds in r["work_stages_s"].items()]
    rows += [
        ("overhead (wall - work)", f"{r['overhead_s']:.2f} s"),
        ("  start-up (interpreter, imports, config)", f"{r['startup_s']:.2f} s"),
        ("  exit", f"{r['exit_s']:.2f} s"),
        ("wall / work", f"{r['wall_over_work']:.2f}x  (target <= 1.3x)"),
        ("imports (cumulative, -X importtime)", ""),
    ]
    rows += [(f"  {name}", f"{s:.2f} s") for name, s in r["import_s_under_importtime"].items()]
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
