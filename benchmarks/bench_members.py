"""Ensemble benchmark: peak memory of a 1- and a 20-member learned-ensemble nowcast on a large grid.

A 20-member, 6-lead forecast of a 2200 x 1900 composite is 2 GB in float32, plus the network's
states; the ensemble method (:meth:`nowcast.nowcasts.model.ModelNowcast.predict_members`) holds
the output once and one member batch of network state, so it must fit in 8 GiB. Run with
``python -m benchmarks members`` (or ``make bench ARGS=members``). In a temporary folder that is
removed at the end:

1. A checkpoint of the stochastic Lagrangian ConvLSTM with ``bom_lagrangian_crps``'s
   architecture (untrained, head perturbed so the noise reaches the output; memory and time do
   not depend on the weights).
2. Synthetic frames (moving Gaussian cells, 6 inputs at 10 min) of the grid, and the ensemble of
   1, then 20 members in member batches of 4, each in a fresh ``python`` process: peak RSS of the
   process (:mod:`benchmarks.rss`) and wall time.

``NOWCAST_MEMBERS_BENCH_SHAPE`` (default ``2200x1900``) overrides the grid for a quick check of
the harness. The synthetic and tiled frames stand in for OPERA, whose 15-minute data the
10-minute model refuses.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import save, table
from benchmarks.rss import run_measured

#: The 20-member run must peak below this many bytes.
RSS_GOAL_BYTES = 8 * 1024**3
MEMBERS = (1, 20)
MEMBER_BATCH = 4
N_FRAMES = 6
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 3600
MODEL_KWARGS = {
    "patch_factor": 4,
    "hidden_channels": [32, 32],
    "kernel_sizes": [3, 3],
    "residual": True,
    "noise_channels": 4,
    "noise_scale_pixels": 16,
}

CHILD = """
import json, sys, time
import numpy as np
from nowcast.nowcasts.model import ModelNowcast
checkpoint, ny, nx, members, batch = sys.argv[1], *map(int, sys.argv[2:6])
yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
frames = np.zeros((6, ny, nx), np.float32)
rng = np.random.default_rng(0)
cells = rng.uniform([0, 0, 20, 2], [ny, nx, 120, 40], size=(40, 4))
for t in range(6):
    for cy, cx, width, peak in cells:
        frames[t] += peak * np.exp(-((yy - cy - 3 * t) ** 2 + (xx - cx - 2 * t) ** 2) / width**2)
method = ModelNowcast(checkpoint, device="cpu")
tic = time.perf_counter()
values = method.predict_members(frames, members, member_batch=batch, seed=0, pixel_size_km=1.0)
print(json.dumps({"seconds": time.perf_counter() - tic, "bytes": int(values.nbytes)}))
"""


def write_checkpoint(path: Path) -> str:
    """The stochastic checkpoint the runs load (head perturbed so members differ)."""
    import torch

    from nowcast.models.registry import build_model
    from nowcast.patches.normalization import Normalization
    from nowcast.training.checkpoint import TrainedOn, make_checkpoint, save_checkpoint
    from nowcast.windows import FrameSpec

    torch.manual_seed(0)
    model = build_model("stochastic_convlstm", N_FRAMES, N_FRAMES, **MODEL_KWARGS)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape))
    checkpoint = make_checkpoint(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        scheduler_state={},
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        config={},
        experiment="members_bench",
        model_name="stochastic_convlstm",
        model_kwargs=MODEL_KWARGS,
        trained_on=TrainedOn(
            Normalization("log1p", {"scale": 4.0}),
            FrameSpec(N_FRAMES, N_FRAMES, 10),
            reference_frame="lagrangian",
        ),
        step=0,
        epoch=0,
        batch_index=0,
        best_metric=float("inf"),
    )
    save_checkpoint(path, checkpoint)
    return str(path)


def measure(checkpoint: str, shape: tuple[int, int], members: int) -> dict:
    """One ensemble nowcast in a fresh process: peak RSS, wall and forecast seconds."""
    import json

    argv = [sys.executable, "-c", CHILD, checkpoint, *map(str, shape), str(members)]
    measured = run_measured([*argv, str(MEMBER_BATCH)], cwd=str(ROOT), timeout=TIMEOUT_S)
    if measured.returncode != 0:
        raise RuntimeError(f"{members} members failed:\n{measured.stderr[-2000:]}")
    child = json.loads(measured.stdout.strip().splitlines()[-1])
    return {
        "members": members,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "wall_s": measured.wall_s,
        "forecast_s": child["seconds"],
        "output_bytes": child["bytes"],
    }


def main() -> dict:
    spec = os.environ.get("NOWCAST_MEMBERS_BENCH_SHAPE", "2200x1900")
    shape = tuple(int(n) for n in spec.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="nowcast-members-bench-") as folder:
        checkpoint = write_checkpoint(Path(folder) / "stochastic.pt")
        runs = [measure(checkpoint, shape, members) for members in MEMBERS]
    one, many = runs
    results = {
        "shape": list(shape),
        "member_batch": MEMBER_BATCH,
        "runs": {str(run["members"]): run for run in runs},
        "rss_many_over_one": many["peak_rss_bytes"] / one["peak_rss_bytes"],
        "peak_rss_many_gib": many["peak_rss_bytes"] / 1024**3,
        "fits_goal": many["peak_rss_bytes"] <= RSS_GOAL_BYTES,
        "seconds_per_member": many["forecast_s"] / many["members"],
    }
    save("members", results)
    gib = 1024**3
    print(
        table(
            [
                ("grid", f"{shape[0]} x {shape[1]}, member batches of {MEMBER_BATCH}"),
                *[
                    (
                        f"{run['members']} member(s)",
                        f"peak RSS {run['peak_rss_bytes'] / gib:.2f} GiB, output "
                        f"{run['output_bytes'] / gib:.2f} GiB, forecast {run['forecast_s']:.0f} s",
                    )
                    for run in runs
                ],
                ("20 / 1 members, peak RSS", f"{results['rss_many_over_one']:.2f}x"),
                ("20 members within 8 GiB", "yes" if results["fits_goal"] else "NO"),
            ]
        )
    )
    return results


if __name__ == "__main__":
    main()
