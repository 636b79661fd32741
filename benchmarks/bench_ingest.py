"""Ingest of the BoM day three ways in one run: pysteps sequential (the peer), a bare parallel
decode of the same files (the limit), and ``nowcast ingest`` (cold: new cluster; warm: workers
already up, as on a long-lived Dask cluster)."""

from __future__ import annotations

import os
import tempfile
from multiprocessing import get_context

import netCDF4
import numpy as np

from benchmarks.common import save, table, timed
from nowcast.catalog import list_frames
from nowcast.config import load_catalog
from nowcast.ingest import ingest
from nowcast.parallel import dask_client, default_n_workers


def _bare_decode(path: str) -> np.ndarray:
    with netCDF4.Dataset(path) as ds:
        return np.asarray(ds["precipitation"][:], dtype=np.float32)


def _pysteps_sequential(paths, timestamps, source):
    from pysteps.io import get_method
    from pysteps.io.readers import read_timeseries

    importer = get_method(source.importer, "importer")
    return read_timeseries((paths, timestamps), importer, **source.importer_kwargs)


def bench() -> dict:
    catalog = load_catalog()
    source = catalog["bom"]
    frames = list_frames(source)
    paths = [f.path for f in frames]
    n_workers = default_n_workers()

    t_pysteps, _ = timed(_pysteps_sequential, paths, [f.time for f in frames], source)
    with get_context("spawn").Pool(n_workers) as pool:
        pool.map(_bare_decode, paths[:n_workers])  # warm the workers
        t_bare, _ = timed(pool.map, _bare_decode, paths, repeat=3)

    with tempfile.TemporaryDirectory() as tmp:
        t_cold, _ = timed(ingest, "bom", tmp, catalog=catalog, force=True, progress=False)
        with dask_client() as client:
            client.run(lambda: __import__("pysteps"))
            t_warm, _ = timed(
                ingest, "bom", tmp, catalog=catalog, force=True, progress=False, repeat=3
            )
    return {
        "files": len(paths),
        "workers": n_workers,
        "pysteps_sequential_s": t_pysteps,
        "bare_parallel_decode_s": t_bare,
        "nowcast_ingest_cold_s": t_cold,
        "nowcast_ingest_warm_s": t_warm,
        "speedup_vs_pysteps_cold": t_pysteps / t_cold,
        "speedup_vs_pysteps_warm": t_pysteps / t_warm,
        "warm_over_bare_decode": t_warm / t_bare,
    }


def main() -> dict:
    os.environ.setdefault("NOWCAST_DATA_ROOT", "../shared/data/pysteps-data")
    results = bench()
    save("ingest", results)
    r = results
    print("ingest, BoM day (144 files, 512x512):")
    rows = [
        ("pysteps read_timeseries (sequential)", f"{r['pysteps_sequential_s']:.2f} s"),
        ("bare parallel decode (netCDF4)", f"{r['bare_parallel_decode_s']:.2f} s"),
        ("nowcast ingest, new cluster", f"{r['nowcast_ingest_cold_s']:.2f} s"),
        ("nowcast ingest, warm cluster", f"{r['nowcast_ingest_warm_s']:.2f} s"),
        (
            "speedup vs pysteps (cold / warm)",
            f"{r['speedup_vs_pysteps_cold']:.1f}x / {r['speedup_vs_pysteps_warm']:.1f}x"
            "  (target >= 1.8x)",
        ),
        ("warm ingest / bare decode", f"{r['warm_over_bare_decode']:.2f}  (target <= 1.3)"),
    ]
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
