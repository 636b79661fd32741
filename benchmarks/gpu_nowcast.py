"""The ``nowcast`` section of ``benchmarks.bench_gpu``: the shipped model's full-domain nowcast.

The same nowcast as ``benchmarks/bench_evaluate.py`` (the pretrained Lagrangian ConvLSTM, 6 BoM
frames in, 6 lead times out, its LK motion and frame transport included) on the device, eager
and through ``torch.compile`` (``ModelNowcast(compile=True)``; the first call compiles and is
reported apart), beside pysteps LK + extrapolation on the CPU of the same machine.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.bench_evaluate import N_LEAD, bom_inputs
from nowcast.nowcasts.interface import get_method
from nowcast.nowcasts.model import ModelNowcast
from nowcast.training.checkpoint import PRETRAINED_CHECKPOINT


def _timed_runs(call, runs: int, device: torch.device) -> dict:
    """First call and the median of ``runs`` more, synchronising the device around each."""
    times = []
    for _ in range(runs + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "median_s": statistics.median(times[1:]), "min_s": min(times[1:])}


def bench_nowcast(args, device: torch.device, report: dict) -> None:
    """Record ``report["nowcast"]``: eager and compiled latency of the pretrained nowcast."""
    runs = 3 if args.quick else 10
    inputs = bom_inputs()
    section = report["nowcast"] = {
        "model": f"pretrained {PRETRAINED_CHECKPOINT.name}",
        "grid": list(inputs.shape[1:]),
        "n_leadtimes": N_LEAD,
        "runs": runs,
    }
    extrapolation = get_method("extrapolation")
    section["pysteps_lk_cpu"] = _timed_runs(
        lambda: extrapolation(inputs, N_LEAD), runs, torch.device("cpu")
    )
    modes = {"eager": False} if args.no_compile else {"eager": False, "compiled": True}
    for mode, compiled in modes.items():
        print(f"[nowcast] {mode} ...", flush=True)
        try:
            method = ModelNowcast(PRETRAINED_CHECKPOINT, device=device, compile=compiled)
            row = _timed_runs(lambda m=method: m(inputs, N_LEAD), runs, device)
            row["over_pysteps_lk"] = row["median_s"] / section["pysteps_lk_cpu"]["median_s"]
            section[mode] = row
        except Exception as err:  # a failed compile is recorded, never fatal
            section[mode] = {"error": f"{type(err).__name__}: {err}"}
