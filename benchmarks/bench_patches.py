"""Patch store: build time, size and PyTorch loader throughput, Eulerian and Lagrangian.

Run from the project root with ``python -m benchmarks.bench_patches`` (or
``make bench ARGS=patches``). The cube is ``$NOWCAST_BENCH_CUBE``, else ``data/cubes/bom.zarr``,
else the BoM day is ingested into a temporary folder first (``NOWCAST_DATA_ROOT`` defaults to
../shared/data/pysteps-data).

Stores are built with the ``patches`` section of ``pipelines/configs/bom.yaml`` (128-pixel
patches every 64 pixels, 6 + 6 frames) on an in-process cluster, once Eulerian and once
Lagrangian. The loader reads the train split with augmentation, batch 16, with 0 and 4 worker
processes (Lagrangian samples are warped in the loader, a batch per call); the rate is compared
with what training consumes: the CPU training step of ``benchmarks/results/train.json`` and the
H200 training step of ``benchmarks/results/gpu_nvidia_h200.json``. The storage chunk of the
frames is chosen by the random sample read time of a few candidates.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from benchmarks.common import RESULTS, save, table
from nowcast import patches as patch_store
from nowcast.config import ExperimentConfig, load_yaml
from nowcast.patches.build import build_patches
from nowcast.patches.loader import make_dataloaders
from nowcast.patches.reader import PatchStore
from nowcast.sources.cube import cube_path, open_cube

BOM_CONFIG = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "bom.yaml"
BATCH_SIZE = 16
#: Samples per cut in ``batch_read_ms`` (the training batch size of the BoM experiments).
READ_BATCH = 8
WORKERS = (0, 4)
CHUNKS = ((4, 64, 64), (6, 64, 64), (12, 64, 64), (6, 128, 128))


def _dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bench_build(cube: str, patch_dir: str, patches: dict, name: str) -> dict:
    """Build one store from scratch; its size against the cube's over the same frames."""
    source = open_cube(cube).attrs["source"]
    cube_dir = os.path.dirname(os.path.abspath(cube))
    if cube_path(cube_dir, source) != os.path.abspath(cube):
        raise ValueError(f"{cube} must be named {source}.zarr (the cube's source)")
    experiment = ExperimentConfig(
        name=name, sources=[source], cube_dir=cube_dir, patch_dir=patch_dir, patches=patches
    )
    start = time.perf_counter()
    path = build_patches(experiment, scheduler="threads", force=True, progress=False)
    seconds = time.perf_counter() - start
    store = PatchStore.open(path)
    n_windows, n_samples = sum(store.counts["windows"].values()), len(store)
    n_frames = zarr.open_group(path, mode="r")[f"frames/{source}/frames"].shape[0]
    cube_bytes = _dir_bytes(cube) * n_frames / open_cube(cube).sizes["time"]
    return {
        "path": path,
        "build_s": seconds,
        "n_windows": n_windows,
        "n_samples": n_samples,
        "n_frames_stored": n_frames,
        "samples_per_s": n_samples / seconds,
        "store_mb": _dir_bytes(path) / 2**20,
        "store_over_cube_bytes": _dir_bytes(path) / cube_bytes,
        "margin": store.margin,
    }


def bench_loader(store: str, num_workers: int, max_batches: int = 40) -> dict:
    """Train-split samples/s of ``make_dataloaders`` (augmented), after two warm-up batches."""
    loader = make_dataloaders(store, BATCH_SIZE, num_workers=num_workers, augment=True)["train"]
    n, start = 0, None
    for index, (inputs, _, _) in enumerate(loader):
        if index == 2:
            start, n = time.perf_counter(), 0
        n += inputs.shape[0]
        if index + 1 >= max_batches:
            break
    return {"samples_per_s": n / (time.perf_counter() - start), "batches": index + 1}


def bench_sample_read(store: str, n_reads: int = 200, batch: int = 1) -> float:
    """Mean milliseconds per sample of random sample cuts (``PatchStore.cut`` of ``batch``
    indices at a time)."""
    patch = PatchStore.open(store)
    order = np.random.default_rng(0).integers(0, len(patch), (n_reads // batch, batch))
    patch.cut([0])
    start = time.perf_counter()
    for indices in order:
        patch.cut(indices)
    return (time.perf_counter() - start) / order.size * 1e3


def bench_chunks(cube: str, patch_dir: str, patches: dict) -> dict:
    """Sample read time and store size per candidate frame chunk (Eulerian store)."""
    results, default = {}, patch_store.FRAME_CHUNK
    try:
        for chunk in CHUNKS:
            patch_store.FRAME_CHUNK = chunk
            built = bench_build(cube, patch_dir, patches, "bench_chunk")
            results["x".join(map(str, chunk))] = {
                "sample_read_ms": bench_sample_read(built["path"]),
                "store_mb": built["store_mb"],
            }
    finally:
        patch_store.FRAME_CHUNK = default
    return results


def training_rates() -> dict:
    """Samples/s that training consumes: CPU (train.json) and the H200 (gpu_nvidia_h200.json)."""
    rates = {}
    cpu = json.loads((RESULTS / "train.json").read_text())["results"]
    rates["cpu"] = cpu["variants"][cpu["best"]]["samples_per_s"]
    gpu = json.loads((RESULTS / "gpu_nvidia_h200.json").read_text())["train_step"]
    rates["h200_batch_size"] = gpu["batch_size"]
    rates["h200"] = {name: v["samples_per_s"] for name, v in gpu["variants"].items()}
    return rates


def bench(cube: str, patches: dict | None = None) -> dict:
    """Benchmark building and reading Eulerian and Lagrangian stores from ``cube``.

    Returns
    -------
    dict
        ``training`` rates, ``frame_chunks``, and per frame (``eulerian``, ``lagrangian``):
        ``build``, ``sample_read_ms`` (one sample a cut), ``batch_read_ms`` (per sample, cuts of
        ``READ_BATCH``), ``loader_workers_<n>`` with ``samples_per_s``,
        ``over_cpu_training`` and, for 4 workers, ``over_h200_training``.
    """
    patches = patches if patches is not None else load_yaml(BOM_CONFIG)["patches"]
    # One intra-op thread: the loader's work is measured, not torch threads fighting the
    # worker processes for the cores.
    torch.set_num_threads(1)
    rates = training_rates()
    fastest_gpu = max(rates["h200"].values())
    results = {"cube": cube, "patches": patches, "torch_threads": 1, "training": rates}
    with tempfile.TemporaryDirectory() as patch_dir:
        results["frame_chunks"] = bench_chunks(cube, patch_dir, dict(patches, frame="eulerian"))
        for frame in ("eulerian", "lagrangian"):
            built = bench_build(cube, patch_dir, dict(patches, frame=frame), f"bench_{frame}")
            entry = {
                "build": built,
                "sample_read_ms": bench_sample_read(built["path"]),
                "batch_read_ms": bench_sample_read(built["path"], batch=READ_BATCH),
            }
            for workers in WORKERS:
                loader = bench_loader(built["path"], workers)
                loader["over_cpu_training"] = loader["samples_per_s"] / rates["cpu"]
                if workers == max(WORKERS):
                    loader["over_h200_training"] = loader["samples_per_s"] / fastest_gpu
                entry[f"loader_workers_{workers}"] = loader
            results[frame] = entry
    return results


def _cube_for_bench(tmp: str) -> str:
    explicit = os.environ.get("NOWCAST_BENCH_CUBE")
    if explicit:
        return explicit
    if os.path.isdir("data/cubes/bom.zarr"):
        return "data/cubes/bom.zarr"
    from nowcast.sources.ingest import ingest

    return ingest("bom", tmp, progress=False).path


def main() -> dict:
    """Run the benchmark, save ``benchmarks/results/patches.json`` and print a table."""
    os.environ.setdefault("NOWCAST_DATA_ROOT", "../shared/data/pysteps-data")
    with tempfile.TemporaryDirectory() as tmp:
        results = bench(_cube_for_bench(tmp))
    save("patches", results)
    rates = results["training"]
    rows = [
        (f"frame chunk {name}", f"{r['sample_read_ms']:.1f} ms/sample, {r['store_mb']:.1f} MiB")
        for name, r in results["frame_chunks"].items()
    ]
    for frame in ("eulerian", "lagrangian"):
        entry = results[frame]
        built = entry["build"]
        rows.append(
            (
                f"{frame}: build",
                f"{built['build_s']:.1f} s, {built['n_samples']} samples, "
                f"{built['store_mb']:.1f} MiB = {built['store_over_cube_bytes']:.2f} x cube",
            )
        )
        rows.append((f"{frame}: one sample", f"{entry['sample_read_ms']:.1f} ms"))
        if "batch_read_ms" in entry:
            rows.append(
                (
                    f"{frame}: a sample in a batch of {READ_BATCH}",
                    f"{entry['batch_read_ms']:.1f} ms",
                )
            )
        for workers in WORKERS:
            loader = entry[f"loader_workers_{workers}"]
            text = (
                f"{loader['samples_per_s']:.0f} samples/s = "
                f"{loader['over_cpu_training']:.0f} x CPU training ({rates['cpu']:.1f}/s)"
            )
            if "over_h200_training" in loader:
                text += f", {loader['over_h200_training']:.2f} x H200 training"
            rows.append((f"{frame}: loader, {workers} workers", text))
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
