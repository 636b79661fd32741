"""A 20-member, 60-minute, full-domain BoM nowcast: the learned ensemble against pysteps STEPS.

Both forecast the rainy 08:50 UTC window of the 512 x 512 BoM grid (6 input frames at 10 min, 6
lead times, 20 members) on the same inputs, with torch on the same 2 threads:

* the learned ensemble: the ``ensemble`` method (:class:`nowcast.nowcasts.model.ModelNowcast` of
  a stochastic checkpoint with ``bom_lagrangian_crps``'s architecture, members in batches of
  4). The checkpoint is untrained (:func:`benchmarks.bench_members.write_checkpoint`): the time
  does not depend on the weights. Its time includes its own coarse LK motion, the transport and
  each member's perturbed motion;
* the peer: pysteps STEPS as the evaluate stage runs it (``get_method("steps")``, its own LK
  motion included), with ``num_workers=2``.

The median of 3 interleaved runs of each is reported; the ratio is the target (<= 0.5x,
stretch 0.25x, moonshot 0.1x). Run with ``python -m benchmarks ensemble``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.bench_evaluate import N_LEAD, TORCH_THREADS, bom_inputs, interleaved_medians
from benchmarks.bench_members import write_checkpoint
from benchmarks.common import save, table
from nowcast.nowcasts.interface import get_method

N_MEMBERS = 20
MEMBER_BATCH = 4
N_RUNS = 3


def bench() -> dict:
    """Time both ensembles on the same inputs; the medians and their ratio."""
    torch.set_num_threads(TORCH_THREADS)
    inputs = bom_inputs()
    steps = get_method("steps")
    with tempfile.TemporaryDirectory(prefix="nowcast-ensemble-bench-") as folder:
        checkpoint = write_checkpoint(Path(folder) / "stochastic.pt")
        ensemble = get_method("ensemble")(
            checkpoint=checkpoint, device="cpu", n_members=N_MEMBERS, member_batch=MEMBER_BATCH
        )
        calls = {
            "ensemble": lambda: ensemble(inputs, N_LEAD),
            "steps": lambda: steps(inputs, N_LEAD, n_ens_members=N_MEMBERS, num_workers=2),
        }
        seconds = interleaved_medians(calls, N_RUNS)
    return {
        "shape": list(inputs.shape[1:]),
        "members": N_MEMBERS,
        "lead_times": N_LEAD,
        "member_batch": MEMBER_BATCH,
        "torch_threads": torch.get_num_threads(),
        "ensemble_s": seconds["ensemble"],
        "steps_s": seconds["steps"],
        "ensemble_over_steps": seconds["ensemble"] / seconds["steps"],
    }


def main() -> dict:
    results = bench()
    save("ensemble", results)
    print(
        table(
            [
                ("grid", f"{results['shape'][0]} x {results['shape'][1]}, {N_MEMBERS} members"),
                ("learned ensemble", f"{results['ensemble_s']:.1f} s"),
                ("pysteps STEPS (num_workers=2)", f"{results['steps_s']:.1f} s"),
                ("ensemble / STEPS", f"{results['ensemble_over_steps']:.2f}x"),
            ]
        )
    )
    return results


if __name__ == "__main__":
    main()
