"""Full-domain nowcast latency on the 512 x 512 BoM grid: the shipped model against pysteps LK.

One 60-minute nowcast (6 input frames at 10 min, 6 lead times) from the rainy 08:50 UTC start,
as the evaluate and predict stages make it:

* the model: the shipped pretrained one (:data:`nowcast.training.checkpoint.PRETRAINED_CHECKPOINT`,
the
  Lagrangian residual ConvLSTM). Its time includes its own LK motion (on its coarse grid) and
  the Lagrangian transport of its inputs and outputs;
* the peer: pysteps LK, the Lucas-Kanade motion on the last three frames in dB, then
  semi-Lagrangian extrapolation, as the evaluate stage runs it (``get_method("extrapolation")``).

Both run on the same inputs at 2 torch threads; the median of 5 interleaved runs (model, LK,
model, LK, ...) is reported. The JSON keeps the profile of one model call (cProfile cumulative
seconds of each part) and the skill cost of the coarse motion grid: the model's scores on the
day's windows with its motion every 8 pixels against the same model with full-resolution motion.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from datetime import datetime

import numpy as np
import pandas as pd
import torch
import xarray as xr

from benchmarks.common import save, table
from nowcast.models.complexity import count_parameters
from nowcast.nowcasts.interface import get_method
from nowcast.nowcasts.model import ModelNowcast
from nowcast.predict import inputs_from_files
from nowcast.sources.catalog import load_catalog
from nowcast.training.checkpoint import PRETRAINED_CHECKPOINT
from nowcast.verification.detcat import contingency_accum, contingency_compute, contingency_init
from nowcast.verification.detcont import continuous_accum, continuous_compute, continuous_init

N_INPUT = N_LEAD = 6
REFERENCE_TIME = datetime(2020, 10, 31, 8, 50)
N_RUNS = 5
TORCH_THREADS = 2
#: Windows of the skill check: a start every 30 minutes over the rainy part of the day.
SKILL_STARTS = pd.date_range("2020-10-31 05:00", "2020-10-31 12:00", freq="30min")
SKILL_THRESHOLDS = (1.0, 5.0, 10.0)
#: Parts of one model call in the profile: (name, defining file, function).
PROFILE_PARTS = (
    ("motion (coarse LK)", "motion.py", "coarse_motion_field"),
    ("trajectories", "lagrangian.py", "__init__"),
    ("inputs to Lagrangian frame", "lagrangian.py", "inputs_to_lagrangian"),
    ("ConvLSTM forward", "convlstm.py", "forward"),
    ("outputs from Lagrangian frame", "lagrangian.py", "outputs_from_lagrangian"),
)


def bom_frames(end, n_frames: int) -> xr.DataArray:
    """The ``n_frames`` BoM frames up to ``end``, read from the raw files as ``nowcast predict
    --from-files`` reads them."""
    return inputs_from_files(load_catalog(), "bom", pd.Timestamp(end), n_frames, 10)


def bom_inputs(reference=REFERENCE_TIME) -> xr.DataArray:
    """The 6 input frames up to ``reference``."""
    return bom_frames(reference, N_INPUT)


def interleaved_medians(calls: dict, n_runs: int = N_RUNS) -> dict[str, float]:
    """Median wall time of each call over ``n_runs`` rounds, the calls taking turns."""
    times = {name: [] for name in calls}
    for _ in range(n_runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def profile_breakdown(method: ModelNowcast, inputs: xr.DataArray) -> dict[str, float]:
    """Cumulative seconds of each of :data:`PROFILE_PARTS` in one profiled model call."""
    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    method(inputs, N_LEAD)
    total = time.perf_counter() - start
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    parts = {"total (profiled)": total}
    for name, filename, function in PROFILE_PARTS:
        # The outermost of the functions of that name (a cell's forward runs inside the
        # encoder-forecaster's): the largest cumulative time.
        parts[name] = max(
            (
                cumulative
                for (path, _, func), (_, _, _, cumulative, _) in stats.items()
                if path.endswith(filename) and func == function
            ),
            default=0.0,
        )
    parts["other (normalization, masks, xarray)"] = total - sum(
        parts[name] for name, _, _ in PROFILE_PARTS
    )
    return parts


def skill_cost(method: ModelNowcast) -> dict:
    """Scores of the model with its coarse motion grid and with full-resolution motion.

    CSI at :data:`SKILL_THRESHOLDS` (per lead time, and its mean over them) and MSE over the
    :data:`SKILL_STARTS` windows; the only difference between the two is the motion grid.
    """
    end = SKILL_STARTS[-1] + pd.Timedelta(minutes=10 * N_LEAD)
    n_frames = int((end - SKILL_STARTS[0]) / pd.Timedelta(minutes=10)) + N_INPUT
    frames = bom_frames(end, n_frames)
    times = pd.DatetimeIndex(frames["time"].values)
    lead_times = np.arange(1, N_LEAD + 1) * 10
    strides = {"coarse": method.motion_node_spacing, "full_resolution": 1}
    tables = {name: contingency_init(lead_times, SKILL_THRESHOLDS) for name in strides}
    errors = {name: continuous_init(lead_times) for name in strides}
    for start in SKILL_STARTS:
        at = times.get_loc(start)
        inputs = frames.isel(time=slice(at - N_INPUT + 1, at + 1))
        observed = frames.values[at + 1 : at + 1 + N_LEAD][None]
        for name, stride in strides.items():
            method.motion_node_spacing = stride
            forecast = method(inputs, N_LEAD).values[None]
            contingency_accum(tables[name], forecast, observed)
            continuous_accum(errors[name], forecast, observed)
    method.motion_node_spacing = strides["coarse"]
    result = {"windows": len(SKILL_STARTS), "thresholds": list(SKILL_THRESHOLDS)}
    for name in strides:
        csi = contingency_compute(tables[name], ["CSI"])["CSI"]  # (lead, threshold)
        result[name] = {
            "motion_stride": strides[name],
            "csi_mean_over_leads": csi.mean(axis=0).tolist(),
            "csi_60min": csi[-1].tolist(),
            "mse_mean": float(np.mean(continuous_compute(errors[name], ["MSE"])["MSE"])),
        }
    return result


def bench() -> dict:
    torch.set_num_threads(TORCH_THREADS)
    inputs = bom_inputs()
    model = ModelNowcast(PRETRAINED_CHECKPOINT, device="cpu")
    extrapolation = get_method("extrapolation")
    model(inputs, N_LEAD)  # warm-up: first-call allocations and kernel selection
    extrapolation(inputs, N_LEAD)
    medians = interleaved_medians(
        {"model": lambda: model(inputs, N_LEAD), "lk": lambda: extrapolation(inputs, N_LEAD)}
    )
    return {
        "grid": list(inputs.shape[1:]),
        "n_input_frames": N_INPUT,
        "n_leadtimes": N_LEAD,
        "reference_time": REFERENCE_TIME.isoformat(),
        "model": f"pretrained {PRETRAINED_CHECKPOINT.name}",
        "model_parameters": count_parameters(model.model),
        "motion_stride": model.motion_node_spacing,
        "torch_threads": torch.get_num_threads(),
        "runs": N_RUNS,
        "model_s": medians["model"],
        "lk_extrapolation_s": medians["lk"],
        "model_over_lk": medians["model"] / medians["lk"],
        "model_profile_s": profile_breakdown(model, inputs),
        "skill_cost_of_coarse_motion": skill_cost(model),
        "gpu": "none on this machine (benchmarks/bench_gpu.py times the nowcast on a GPU)",
    }


def main() -> dict:
    os.environ.setdefault("NOWCAST_DATA_ROOT", "../shared/data/pysteps-data")
    results = bench()
    save("evaluate", results)
    r = results
    print(
        f"60-min nowcast, BoM {r['grid'][0]}x{r['grid'][1]}, 6 frames in, 6 out, CPU, "
        f"{r['torch_threads']} threads, median of {r['runs']} interleaved runs:"
    )
    rows = [
        (f"model ({r['model']}, its motion included)", f"{r['model_s']:.3f} s"),
        ("pysteps LK + semi-Lagrangian", f"{r['lk_extrapolation_s']:.3f} s"),
        ("model / LK", f"{r['model_over_lk']:.2f}x  (target <= 0.8x, moonshot 0.5x)"),
    ]
    rows += [(f"  {name}", f"{seconds:.3f} s") for name, seconds in r["model_profile_s"].items()]
    print(table(rows))
    skill = r["skill_cost_of_coarse_motion"]
    print(f"skill of the model, {skill['windows']} windows, motion every 8 pixels vs every pixel:")
    print(
        table(
            [
                (
                    f"{name} (stride {skill[name]['motion_stride']})",
                    "mean CSI "
                    + ", ".join(
                        f"{t:g}: {c:.3f}"
                        for t, c in zip(
                            skill["thresholds"], skill[name]["csi_mean_over_leads"], strict=True
                        )
                    )
                    + f"; MSE {skill[name]['mse_mean']:.3f}",
                )
                for name in ("coarse", "full_resolution")
            ]
        )
    )
    return results


if __name__ == "__main__":
    main()
