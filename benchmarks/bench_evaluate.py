"""Full-domain nowcast latency on the 512 x 512 BoM grid: the ConvLSTM against pysteps LK.

One 60-minute nowcast (6 input frames at 10 min, 6 lead times) from the rainy 08:50 UTC start,
as the evaluate and predict stages make it: the model method (normalize, one forward pass on the
whole grid, transform back, mask) and the pysteps baseline (Lucas-Kanade motion on the last three
frames in dB, then semi-Lagrangian extrapolation), timed in the same run. The model is the
shipped pretrained one (:data:`nowcast.checkpoint.PRETRAINED_CHECKPOINT`, the Lagrangian residual
ConvLSTM: its own LK motion and the Lagrangian transport of the frames count in its time); an
untrained narrower ConvLSTM is timed beside it for scale.
"""

from __future__ import annotations

import os
from datetime import datetime

import numpy as np
import pandas as pd
import torch
import xarray as xr

from benchmarks.common import save, table, timed
from nowcast.catalog import list_frames
from nowcast.checkpoint import PRETRAINED_CHECKPOINT
from nowcast.config import load_catalog
from nowcast.io.radar import read_frame, read_grid
from nowcast.models import DEFAULT_MODEL, build_model, count_parameters
from nowcast.motion import motion_field
from nowcast.nowcasts import ModelNowcast, get_method

N_INPUT = N_LEAD = 6
REFERENCE_TIME = datetime(2020, 10, 31, 8, 50)
# Typical fitted log1p scale of the BoM training split; the value does not affect the latency.
NORMALIZATION = {"method": "log1p", "params": {"scale": 4.0}}
#: A narrower ConvLSTM (about a quarter of the default's multiply-adds), for scale.
NARROW_KWARGS = {"hidden_channels": [32, 32]}


def bom_inputs() -> xr.DataArray:
    """The 6 input frames up to :data:`REFERENCE_TIME`, read through the catalog's decoder."""
    source = load_catalog()["bom"]
    start = REFERENCE_TIME - pd.Timedelta(minutes=10 * (N_INPUT - 1))
    frames = list_frames(source, start=start, end=REFERENCE_TIME)
    grid = read_grid(source, frames[0].path)
    values = np.stack([read_frame(source, frame.path, grid) for frame in frames])
    return xr.DataArray(
        values,
        dims=("time", "y", "x"),
        coords={"time": [np.datetime64(f.time, "ns") for f in frames], "y": grid.y, "x": grid.x},
        attrs={"crs_wkt": grid.crs_wkt},
    )


def untrained_method(**kwargs) -> ModelNowcast:
    """The model method around an untrained registry ConvLSTM."""
    torch.manual_seed(0)
    return ModelNowcast(
        model=build_model(DEFAULT_MODEL, N_INPUT, N_LEAD, **kwargs),
        normalization=NORMALIZATION,
        n_input_frames=N_INPUT,
        timestep_minutes=10,
        device="cpu",
    )


def model_method() -> tuple[ModelNowcast, str]:
    """The shipped pretrained model, as `nowcast predict` runs it."""
    return ModelNowcast(
        PRETRAINED_CHECKPOINT, device="cpu"
    ), f"pretrained {PRETRAINED_CHECKPOINT.name}"


def bench() -> dict:
    inputs = bom_inputs()
    model, model_source = model_method()
    extrapolation = get_method("extrapolation")

    model(inputs, N_LEAD)  # warm-up: first-call allocations and kernel selection
    extrapolation(inputs, N_LEAD)
    t_model, forecast = timed(model, inputs, N_LEAD, repeat=3)
    narrow = untrained_method(**NARROW_KWARGS)
    narrow(inputs, N_LEAD)
    t_narrow, _ = timed(narrow, inputs, N_LEAD, repeat=3)
    t_lk, _ = timed(extrapolation, inputs, N_LEAD, repeat=3)
    t_motion, velocity = timed(motion_field, inputs.values, repeat=3)
    t_advect, _ = timed(extrapolation, inputs, N_LEAD, velocity=velocity, repeat=3)
    return {
        "grid": list(inputs.shape[1:]),
        "n_input_frames": N_INPUT,
        "n_leadtimes": N_LEAD,
        "reference_time": REFERENCE_TIME.isoformat(),
        "model": model_source,
        "model_parameters": count_parameters(model.model),
        "torch_threads": torch.get_num_threads(),
        "model_s": t_model,
        "narrow_model_kwargs": NARROW_KWARGS,
        "narrow_model_parameters": count_parameters(narrow.model),
        "narrow_model_s": t_narrow,
        "lk_extrapolation_s": t_lk,
        "lk_motion_s": t_motion,
        "extrapolation_only_s": t_advect,
        "model_over_lk": t_model / t_lk,
        "narrow_model_over_lk": t_narrow / t_lk,
        "forecast_shape": list(forecast.shape),
    }


def main() -> dict:
    os.environ.setdefault("NOWCAST_DATA_ROOT", "../shared/data/pysteps-data")
    results = bench()
    save("evaluate", results)
    print(f"60-min nowcast, BoM {results['grid'][0]}x{results['grid'][1]}, 6 frames in, 6 out:")
    print(
        table(
            [
                (
                    f"model ({results['model']}, CPU, {results['torch_threads']} threads)",
                    f"{results['model_s']:.2f} s",
                ),
                ("model, hidden_channels [32, 32]", f"{results['narrow_model_s']:.2f} s"),
                ("pysteps LK + semi-Lagrangian", f"{results['lk_extrapolation_s']:.2f} s"),
                ("  of which LK motion", f"{results['lk_motion_s']:.2f} s"),
                ("  of which extrapolation", f"{results['extrapolation_only_s']:.2f} s"),
                ("model / LK", f"{results['model_over_lk']:.2f}x  (target <= 0.8x, moonshot 0.5x)"),
                ("narrow model / LK", f"{results['narrow_model_over_lk']:.2f}x"),
            ]
        )
    )
    return results


if __name__ == "__main__":
    main()
