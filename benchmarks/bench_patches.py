"""Patch store: build throughput on the BoM day cube, and PyTorch loader throughput.

Run from the project root with ``python -m benchmarks.bench_patches`` (or
``make bench ARGS=patches``). The cube is ``$NOWCAST_BENCH_CUBE``, else ``data/cubes/bom.zarr``,
else the BoM day is ingested into a temporary folder first (``NOWCAST_DATA_ROOT`` defaults to
../shared/data/pysteps-data).

The store is built with the ``patches`` section of ``pipelines/configs/bom.yaml`` (128-pixel
patches every 64 pixels, 6 + 6 frames) on an in-process cluster and on a local process cluster
(both include starting the cluster). The loader reads the train split with augmentation, batch
16, with 0 and 2 worker processes; the second epoch is the steady state (workers persist).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import save, table
from nowcast.config import load_yaml
from nowcast.dataset import PatchDataset, make_dataloaders, store_info
from nowcast.experiment import ExperimentConfig
from nowcast.io.cube import cube_path, open_cube
from nowcast.patches import build_patches

BOM_CONFIG = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "bom.yaml"
BATCH_SIZE = 16


def _store_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bench_build(cube: str, patch_dir: str, patches: dict, scheduler: str | None) -> dict:
    """Build the store once from scratch; windows/s counts the full-domain windows listed."""
    source = open_cube(cube).attrs["source"]
    cube_dir = os.path.dirname(os.path.abspath(cube))
    if cube_path(cube_dir, source) != os.path.abspath(cube):
        raise ValueError(f"{cube} must be named {source}.zarr (the cube's source)")
    experiment = ExperimentConfig(
        name="bench_patches",
        sources=[source],
        cube_dir=cube_dir,
        patch_dir=patch_dir,
        patches=patches,
    )
    start = time.perf_counter()
    path = build_patches(experiment, scheduler=scheduler, force=True, progress=False)
    seconds = time.perf_counter() - start
    counts = store_info(path)["counts"]
    n_windows, n_samples = sum(counts["windows"].values()), sum(counts["samples"].values())
    return {
        "path": path,
        "build_s": seconds,
        "n_windows": n_windows,
        "n_samples": n_samples,
        "windows_per_s": n_windows / seconds,
        "samples_per_s": n_samples / seconds,
        "store_mb": _store_bytes(path) / 2**20,
    }


def bench_loader(store: str, num_workers: int, n_epochs: int = 2) -> dict:
    """Train-split throughput of ``make_dataloaders`` (augmented) per epoch."""
    loader = make_dataloaders(store, BATCH_SIZE, num_workers=num_workers, augment=True)["train"]
    epochs = []
    for _ in range(n_epochs):
        start, n = time.perf_counter(), 0
        for inputs, _, _ in loader:
            n += inputs.shape[0]
        epochs.append(n / (time.perf_counter() - start))
    return {"first_epoch_samples_per_s": epochs[0], "samples_per_s": epochs[-1]}


def bench_sample_read(store: str, n_reads: int = 200) -> float:
    """Mean milliseconds of one random ``PatchDataset`` item (one chunk per array)."""
    dataset = PatchDataset(store, "train")
    order = np.random.default_rng(0).integers(0, len(dataset), n_reads)
    dataset[0]
    start = time.perf_counter()
    for index in order:
        dataset[int(index)]
    return (time.perf_counter() - start) / n_reads * 1e3


def bench(cube: str, patches: dict | None = None) -> dict:
    """Benchmark building and reading a patch store from ``cube``.

    Parameters
    ----------
    cube : str
        Cube path, named ``<source>.zarr``.
    patches : dict, optional
        ``patches`` section; default that of ``pipelines/configs/bom.yaml``.

    Returns
    -------
    dict
        ``build_threads`` and ``build_processes`` (``build_s``, ``windows_per_s``,
        ``samples_per_s``, ...), ``loader_workers_0`` and ``loader_workers_2``
        (``samples_per_s``), ``sample_read_ms``.
    """
    patches = patches if patches is not None else load_yaml(BOM_CONFIG)["patches"]
    # The loader's collate runs in the main process; one intra-op thread measures the loader
    # rather than the contention of torch threads for the cores the workers use.
    torch.set_num_threads(1)
    results = {"cube": cube, "patches": patches, "torch_threads": 1}
    with tempfile.TemporaryDirectory() as patch_dir:
        results["build_threads"] = bench_build(cube, patch_dir, patches, "threads")
        results["build_processes"] = bench_build(cube, patch_dir, patches, "processes")
        store = results["build_processes"]["path"]
        results["sample_read_ms"] = bench_sample_read(store)
        for workers in (0, 2):
            results[f"loader_workers_{workers}"] = bench_loader(store, workers)
    return results


def _cube_for_bench(tmp: str) -> str:
    explicit = os.environ.get("NOWCAST_BENCH_CUBE")
    if explicit:
        return explicit
    if os.path.isdir("data/cubes/bom.zarr"):
        return "data/cubes/bom.zarr"
    from nowcast.ingest import ingest

    return ingest("bom", tmp, progress=False).path


def main() -> dict:
    """Run the benchmark, save ``benchmarks/results/patches.json`` and print a table."""
    os.environ.setdefault("NOWCAST_DATA_ROOT", "../shared/data/pysteps-data")
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(_cube_for_bench(tmp))
    save("patches", results)
    threads, processes = results["build_threads"], results["build_processes"]
    print(
        f"patches, {results['cube']}: {processes['n_windows']} windows, "
        f"{processes['n_samples']} patch samples, {processes['store_mb']:.0f} MiB store"
    )
    rows = [
        (
            "build, in-process cluster",
            f"{threads['build_s']:.1f} s  ({threads['windows_per_s']:.1f} windows/s, "
            f"{threads['samples_per_s']:.0f} samples/s)",
        ),
        (
            "build, process cluster",
            f"{processes['build_s']:.1f} s  ({processes['windows_per_s']:.1f} windows/s, "
            f"{processes['samples_per_s']:.0f} samples/s)",
        ),
        ("one sample read", f"{results['sample_read_ms']:.1f} ms"),
    ]
    for workers in (0, 2):
        loader = results[f"loader_workers_{workers}"]
        rows.append(
            (
                f"loader, {workers} workers, batch {BATCH_SIZE}",
                f"{loader['samples_per_s']:.0f} samples/s "
                f"(first epoch {loader['first_epoch_samples_per_s']:.0f})",
            )
        )
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
