"""Ingest of the BoM day (144 files, 512x512), cold: each run a fresh Python process.

The measure of issue 15: ``nowcast ingest bom --force`` in a new process (imports, catalog,
everything a user waits for) against the peer, pysteps ``read_timeseries`` reading the same
files sequentially with the catalog's importer, also in a new process whose imports count
(``import pysteps`` included; the file list is made by this process and handed over, so the
peer imports nothing of nowcast). Both are timed on the same inputs, interleaved, and the
median of ``NOWCAST_BENCH_INGEST_REPEATS`` (default 3) runs is reported: the peer takes about
50 s a run on this 2-core machine.

Interleaved with them, in new processes too:

- the same ingest forced onto a new local process cluster (``--scheduler processes``), what a
  cold ingest cost before small jobs ran in-process;
- a bare ``import nowcast.sources.ingest, pysteps``: the imports alone, the floor of a cold ingest
  (the catalog's importer check imports pysteps), and ``import pysteps`` alone.

And in this process: a bare parallel decode of the files with netCDF4 on a warm process pool
(the limit), and ``nowcast ingest`` on a warm local cluster (workers already up, as on a
long-lived Dask cluster; best of 3).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import netCDF4
import numpy as np

from benchmarks.common import save, table, timed
from nowcast.parallel import dask_client, default_n_workers
from nowcast.sources.catalog import list_frames, load_catalog
from nowcast.sources.ingest import ingest

REPO = Path(__file__).resolve().parent.parent

# The peer: what a pysteps user runs to load the day (importer options from the catalog).
PYSTEPS_SCRIPT = """
import json, sys
from datetime import datetime
from pysteps.io import get_method
from pysteps.io.readers import read_timeseries
job = json.load(open(sys.argv[1]))
importer = get_method(job["importer"], "importer")
times = [datetime.fromisoformat(t) for t in job["times"]]
read_timeseries((job["paths"], times), importer, **job["importer_kwargs"])
"""


def _bare_decode(path: str) -> np.ndarray:
    with netCDF4.Dataset(path) as ds:
        return np.asarray(ds["precipitation"][:], dtype=np.float32)


def _fresh(args: list[str]) -> float:
    """Wall time of ``python ARGS`` in a new process, from start to exit."""
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    elapsed = time.perf_counter() - start
    if run.returncode:
        raise RuntimeError(f"python {' '.join(args)} failed:\n{run.stderr.decode()[-3000:]}")
    return elapsed


def _cold_runs(job_file: str, cube_dir: str, repeats: int) -> dict[str, list[float]]:
    """The fresh-process runs, interleaved so that a change of load hits them all alike."""
    ingest_cli = ["-m", "nowcast.cli", "ingest", "bom", "--cube-dir", cube_dir, "--force"]
    runs = {"pysteps": [], "ingest": [], "ingest_cluster": [], "imports": [], "import_pysteps": []}
    for _ in range(repeats):
        runs["pysteps"].append(_fresh(["-c", PYSTEPS_SCRIPT, job_file]))
        runs["ingest"].append(_fresh(ingest_cli))
        runs["ingest_cluster"].append(_fresh([*ingest_cli, "--scheduler", "processes"]))
        runs["imports"].append(_fresh(["-c", "import nowcast.sources.ingest, pysteps"]))
        runs["import_pysteps"].append(_fresh(["-c", "import pysteps"]))
    return runs


def bench(repeats: int = 3) -> dict:
    catalog = load_catalog()
    source = catalog["bom"]
    frames = list_frames(source)
    paths = [f.path for f in frames]
    n_workers = default_n_workers()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        job_file = os.path.join(tmp, "pysteps_job.json")
        job = {
            "importer": source.importer,
            "importer_kwargs": source.importer_kwargs,
            "paths": paths,
            "times": [f.time.isoformat() for f in frames],
        }
        Path(job_file).write_text(json.dumps(job))
        runs = _cold_runs(job_file, os.path.join(tmp, "cold"), repeats)

        with get_context("spawn").Pool(n_workers) as pool:
            pool.map(_bare_decode, paths[:n_workers])  # warm the workers
            t_bare, _ = timed(pool.map, _bare_decode, paths, repeat=3)
        with dask_client() as client:
            client.run(lambda: __import__("pysteps"))
            warm_dir = os.path.join(tmp, "warm")
            t_warm, _ = timed(
                ingest, "bom", warm_dir, catalog=catalog, force=True, progress=False, repeat=3
            )
    median = {name: statistics.median(times) for name, times in runs.items()}
    return {
        "files": len(paths),
        "workers": n_workers,
        "repeats": repeats,
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "runs_s": runs,
        "pysteps_sequential_s": median["pysteps"],
        "nowcast_ingest_cold_s": median["ingest"],
        "nowcast_ingest_cold_new_cluster_s": median["ingest_cluster"],
        "imports_s": median["imports"],
        "import_pysteps_s": median["import_pysteps"],
        "bare_parallel_decode_s": t_bare,
        "nowcast_ingest_warm_s": t_warm,
        "speedup_vs_pysteps_cold": median["pysteps"] / median["ingest"],
        "speedup_vs_pysteps_cold_new_cluster": median["pysteps"] / median["ingest_cluster"],
        "speedup_vs_pysteps_warm": median["pysteps"] / t_warm,
        "warm_over_bare_decode": t_warm / t_bare,
    }


def main() -> dict:
    os.environ.setdefault("NOWCAST_DATA_ROOT", str(REPO.parent / "shared/data/pysteps-data"))
    results = bench(int(os.environ.get("NOWCAST_BENCH_INGEST_REPEATS", "3")))
    save("ingest", results)
    r = results
    print(
        f"ingest, BoM day ({r['files']} files, 512x512), fresh processes, median of "
        f"{r['repeats']} interleaved runs (1-min load {r['load_average_1min'][0]:.1f} before, "
        f"{r['load_average_1min'][1]:.1f} after):"
    )
    rows = [
        ("pysteps read_timeseries, sequential", f"{r['pysteps_sequential_s']:.2f} s"),
        ("nowcast ingest (small job: in-process)", f"{r['nowcast_ingest_cold_s']:.2f} s"),
        ("nowcast ingest, new local cluster", f"{r['nowcast_ingest_cold_new_cluster_s']:.2f} s"),
        ("  of which imports (nowcast.sources.ingest, pysteps)", f"{r['imports_s']:.2f} s"),
        ("    of which import pysteps", f"{r['import_pysteps_s']:.2f} s"),
        ("bare parallel decode (netCDF4, warm pool)", f"{r['bare_parallel_decode_s']:.2f} s"),
        ("nowcast ingest, warm cluster", f"{r['nowcast_ingest_warm_s']:.2f} s"),
        (
            "speedup vs pysteps, cold",
            f"{r['speedup_vs_pysteps_cold']:.1f}x  (target >= 20x; new cluster: "
            f"{r['speedup_vs_pysteps_cold_new_cluster']:.1f}x)",
        ),
        ("speedup vs pysteps, warm cluster", f"{r['speedup_vs_pysteps_warm']:.1f}x"),
        ("warm ingest / bare decode", f"{r['warm_over_bare_decode']:.2f}  (moonshot <= 1.3)"),
    ]
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
