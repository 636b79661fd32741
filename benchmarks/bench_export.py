"""Export benchmark: peak memory of ``export`` over N and 4N forecast windows.

Export writes each forecast's NetCDF as the runner (:mod:`nowcast.nowcasts.runner`) makes it, so
its memory must not grow with the number of windows. Run with ``python -m benchmarks export``
(or ``make bench ARGS=export``). In a temporary folder that is removed at the end:

1. A synthetic source long enough for 4N test windows, ingested, and its Eulerian patch store
   (export lists its windows from the store).
2. ``export`` of ``persistence`` forecasts (no checkpoint needed; every method goes through the
   same runner and writer) at every window of the test split, first N, then 4N of them, each
   in a fresh ``python`` process. The peak RSS of the process tree (:mod:`benchmarks.rss`) and
   the wall time are recorded.

The ratio of the peaks (4N over N) is the number to watch: at most :data:`RSS_GOAL`.

Size: ``NOWCAST_EXPORT_BENCH_WINDOWS`` (default 48) and ``NOWCAST_EXPORT_BENCH_SHAPE`` (default
256 pixels square) override the size for a quick check of the harness.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import save, table
from benchmarks.rss import run_measured

#: Peak RSS may grow by at most this factor from N to 4N windows.
RSS_GOAL = 1.2
FACTOR = 4
TIMESTEP = 10
N_FRAMES = 6
ROOT = Path(__file__).resolve().parent.parent
#: Frames of the train and of the val block: a few windows each, and the buffers around them.
OTHER_FRAMES = 30
TIMEOUT_S = 1800


def write_experiment(folder: Path, n_windows: int, shape: int) -> Path:
    """Catalog and experiment config of a synthetic archive with ``FACTOR * n_windows`` test
    windows; the ``export`` section is filled in per run."""
    # The test block holds every window with its inputs and targets, and a buffer; train and
    # val get a few windows each (a patch store needs them).
    test_frames = FACTOR * n_windows + 2 * N_FRAMES + 6
    n_frames = test_frames + 2 * OTHER_FRAMES
    source = {
        "description": f"export benchmark, {n_frames} frames",
        "importer": "synthetic",
        "importer_kwargs": {
            "shape": [shape, shape],
            "pixel_size": 1000.0,
            "motion": [2.0, -1.0],
            "seed": 0,
            "start": "2000-01-01T00:00",
            "n_frames": n_frames,
        },
        "timestep": TIMESTEP,
    }
    catalog = folder / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"sources": {"export_bench": source}}, sort_keys=False))
    other = OTHER_FRAMES / n_frames
    experiment = {
        "name": "export_bench",
        "sources": ["export_bench"],
        "catalog": str(catalog),
        "cube_dir": str(folder / "cubes"),
        "patch_dir": str(folder / "patches"),
        "run_dir": str(folder / "runs"),
        "patches": {
            "n_input_frames": N_FRAMES,
            "n_target_frames": N_FRAMES,
            "patch_size": min(128, shape // 2),
            "stride": min(64, shape // 4),
            "split_fractions": {"train": other, "val": other, "test": 1.0 - 2 * other},
            "buffer_minutes": 30,
            "normalization": "log1p",
            "dtype": "float16",
        },
        "export": {"methods": ["persistence"], "window_stride_minutes": TIMESTEP},
    }
    path = folder / "export_bench.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def prepare(config: Path) -> int:
    """Ingest the source and build the patch store; the number of test windows."""
    from nowcast.config import load_experiment
    from nowcast.patches.build import build_patches
    from nowcast.patches.reader import PatchStore
    from nowcast.sources.catalog import load_catalog
    from nowcast.sources.ingest import ingest

    experiment = load_experiment(config)
    catalog = load_catalog(experiment.catalog)
    ingest(
        "export_bench", experiment.cube_root, catalog=catalog, scheduler="threads", progress=False
    )
    build_patches(experiment, scheduler="threads", progress=False)
    return len(PatchStore.open(experiment.patch_store).windows("test"))


def measure(config: Path, n_windows: int, out_dir: Path) -> dict:
    """Export ``n_windows`` windows in a fresh process; its peak RSS, wall time and files."""
    experiment = yaml.safe_load(config.read_text())
    experiment["export"].update({"max_forecasts": n_windows, "out_dir": str(out_dir)})
    run_config = config.with_name(f"export_bench_{n_windows}.yaml")
    run_config.write_text(yaml.safe_dump(experiment, sort_keys=False))
    code = f"from nowcast.export import export; print(len(export({str(run_config)!r})))"
    measured = run_measured([sys.executable, "-c", code], cwd=str(ROOT), timeout=TIMEOUT_S)
    if measured.returncode != 0:
        raise RuntimeError(f"export of {n_windows} windows failed:\n{measured.stderr[-2000:]}")
    n_files = int(measured.stdout.strip().splitlines()[-1])
    shutil.rmtree(out_dir)
    return {
        "n_windows": n_windows,
        "n_files": n_files,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "wall_s": measured.wall_s,
    }


def bench(n_windows: int = 48, shape: int = 256) -> dict:
    """Peak RSS of export over ``n_windows`` and ``FACTOR * n_windows`` windows."""
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        folder = Path(tmp)
        config = write_experiment(folder, n_windows, shape)
        available = prepare(config)
        if available < FACTOR * n_windows:
            raise RuntimeError(f"{available} test windows, {FACTOR * n_windows} needed")
        runs = {
            f"x{factor}": measure(config, factor * n_windows, folder / f"netcdf_{factor}")
            for factor in (1, FACTOR)
        }
    ratio = runs[f"x{FACTOR}"]["peak_rss_bytes"] / runs["x1"]["peak_rss_bytes"]
    return {
        "shape": shape,
        "method": "persistence",
        "runs": runs,
        "peak_rss_ratio": ratio,
        "goal": RSS_GOAL,
        "meets_goal": ratio <= RSS_GOAL,
    }


def main() -> dict:
    n_windows = int(os.environ.get("NOWCAST_EXPORT_BENCH_WINDOWS", "48"))
    shape = int(os.environ.get("NOWCAST_EXPORT_BENCH_SHAPE", "256"))
    results = bench(n_windows, shape)
    save("export", results)
    rows = [
        (
            f"{run['n_windows']} windows",
            f"peak RSS {run['peak_rss_bytes'] / 2**20:.0f} MiB, {run['wall_s']:.1f} s, "
            f"{run['n_files']} files",
        )
        for run in results["runs"].values()
    ]
    rows.append(
        (f"peak RSS {FACTOR}x / 1x", f"{results['peak_rss_ratio']:.2f} (goal <= {RSS_GOAL})")
    )
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
