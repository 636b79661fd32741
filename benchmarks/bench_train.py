"""Benchmark: training-step throughput of the default ConvLSTM against the machine's conv limit.

Run from the project root::

    python -m benchmarks.bench_train [--compile] [--repeats N]

One training step is what :func:`nowcast.training.loop.train` does per batch:
forward, the default loss
(HKO-7 balanced MSE + MAE with the rain rate of the target), backward, gradient clipping and an
AdamW step, on the default ConvLSTM (``build_model("convlstm", 6, 6)``: 64 + 64 hidden channels,
patch factor 4) with batches of 4 sequences of 6 + 6 frames of 128 x 128 pixels. Its FLOP count
is 3 x :func:`nowcast.models.forward_flops` (the backward pass costs about twice the forward).

The practical limit is the FLOP/s of a single large ``Conv2d`` with the shape of the model's
largest gate convolution (128 -> 256 channels, 3 x 3, on the 32 x 32 patch grid) and a batch
chosen so that its forward + backward (input and weight gradients) does the same FLOPs as the
step, timed in both memory formats (the faster counts). The ratio step / limit says how much of
that the step achieves; the rest is the time of the non-convolution work (gate arithmetic,
concatenation, optimizer).

Measured on the 2-core AMD EPYC (Zen 4, AVX-512) development VM, 2 threads, quiet machine: a step
takes 0.78-0.86 s in NCHW and 0.73-0.79 s in channels_last (~5 samples/s, 160-190 GFLOP/s),
0.70-0.75 s with ``torch.compile`` (about a minute to compile); the reference conv reaches
about 165 (NCHW) and 200 (channels_last) GFLOP/s, so the ratio is 0.85-0.95. A profile of the
eager step puts 84 % of its time in the convolutions (backward 2.1 x forward) and most of the
rest in the gate arithmetic, which ``torch.compile`` fuses. Under load from other processes the
timings are several times slower and meaningless.

Variants are timed round-robin, keeping each one's fastest run, so that load from other
processes on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.common import RESULTS, save
from nowcast.models.complexity import count_parameters, forward_flops
from nowcast.models.registry import build_model
from nowcast.training import losses
from nowcast.training.step import StepParts, train_step

BATCH_SIZE = 4
N_INPUT_FRAMES = 6
N_TARGET_FRAMES = 6
PATCH_SIZE = 128
LOSS = "bmse+bmae"
GRAD_CLIP = 1.0
LOG1P_SCALE = (
    4.0  # normalised value = log1p(rain rate) / scale, as nowcast.patches.normalization' log1p
)


def synthetic_batch(generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random normalised inputs, targets and a mask with 10 % no data."""
    shape_in = (BATCH_SIZE, N_INPUT_FRAMES, 1, PATCH_SIZE, PATCH_SIZE)
    shape_out = (BATCH_SIZE, N_TARGET_FRAMES, 1, PATCH_SIZE, PATCH_SIZE)
    inputs = torch.rand(shape_in, generator=generator)
    targets = torch.rand(shape_out, generator=generator)
    mask = (torch.rand(shape_out, generator=generator) > 0.1).float()
    return inputs, targets, mask


def training_step(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], channels_last: bool, compile: bool
) -> Callable[[], None]:
    """Return a function that runs one training step of ``model`` on ``batch``.

    The step is :func:`nowcast.training.step.train_step`, the one the training loop runs.
    """
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    parts = StepParts(
        model=torch.compile(model) if compile else model,
        raw_model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=losses.get_method(LOSS),
        device=torch.device("cpu"),
        grad_clip=GRAD_CLIP,
        rain_rate=lambda targets: torch.expm1(targets * LOG1P_SCALE),
    )
    inputs, targets, mask = batch

    def step() -> None:
        train_step(parts, inputs, targets, mask)

    return step


def reference_conv(flops: float, channels_last: bool) -> tuple[Callable[[], None], float]:
    """A single Conv2d whose forward + backward does about ``flops``; returns (run, its FLOPs)."""
    in_channels, out_channels, kernel, grid = 128, 256, 3, PATCH_SIZE // 4
    forward_per_sample = 2 * out_channels * grid * grid * in_channels * kernel * kernel
    batch = max(1, round(flops / (3 * forward_per_sample)))
    conv = torch.nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    images = torch.rand(batch, in_channels, grid, grid)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    images.requires_grad_(True)

    def run() -> None:
        conv(images).sum().backward()
        conv.zero_grad(set_to_none=True)
        images.grad = None

    return run, 3.0 * forward_per_sample * batch


def fastest_times(functions: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Warm each function up once, then time them round-robin; keep each one's fastest run."""
    for function in functions.values():
        function()
    best = dict.fromkeys(functions, float("inf"))
    for _ in range(repeats):
        for name, function in functions.items():
            tic = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - tic)
    return best


def bench(repeats: int = 5, compile: bool = False) -> dict:
    """Time a training step of the default ConvLSTM and the reference conv, in this process.

    Parameters
    ----------
    repeats : int, optional
        Timed runs of each variant (after one warm-up), by default 5.
    compile : bool, optional
        Also time the step under ``torch.compile`` (compilation takes about a minute on 2 CPU
        cores), by default False.

    Returns
    -------
    dict
        ``device``, ``threads``, ``parameters``, ``step_flops``, ``limits`` (reference conv
        FLOP/s in each memory format), ``limit_flops_per_s`` (the larger), ``variants`` (for
        ``"fp32"``, ``"fp32_channels_last"`` and optionally ``"fp32_channels_last_compile"``:
        ``step_s``, ``samples_per_s``, ``step_flops_per_s``, ``ratio`` = step / limit) and
        ``best`` (the fastest variant).
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(generator)
    template = build_model("convlstm", N_INPUT_FRAMES, N_TARGET_FRAMES)
    step_flops = 3.0 * forward_flops(template, batch[0].shape)

    variants = {"fp32": (False, False), "fp32_channels_last": (True, False)}
    if compile:
        variants["fp32_channels_last_compile"] = (True, True)
    functions, limit_flops = {}, {}
    for name, (channels_last, compiled) in variants.items():
        model = build_model("convlstm", N_INPUT_FRAMES, N_TARGET_FRAMES)
        model.load_state_dict(template.state_dict())
        functions[name] = training_step(model, batch, channels_last, compiled)
        limit_name = "limit_channels_last" if channels_last else "limit"
        if limit_name not in functions:
            functions[limit_name], limit_flops[limit_name] = reference_conv(
                step_flops, channels_last
            )
    times = fastest_times(functions, repeats)

    limits = {name: limit_flops[name] / times[name] for name in limit_flops}
    limit = max(limits.values())
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "parameters": count_parameters(template),
        "batch_size": BATCH_SIZE,
        "frames": f"{N_INPUT_FRAMES}+{N_TARGET_FRAMES}",
        "patch_size": PATCH_SIZE,
        "step_flops": step_flops,
        "repeats": repeats,
        "limit_flops_per_s": limit,
        "limits": limits,
        "variants": {},
    }
    for name in variants:
        achieved = step_flops / times[name]
        result["variants"][name] = {
            "step_s": times[name],
            "samples_per_s": BATCH_SIZE / times[name],
            "step_flops_per_s": achieved,
            "ratio": achieved / limit,
        }
    result["best"] = max(result["variants"], key=lambda v: result["variants"][v]["samples_per_s"])
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, save ``benchmarks/results/train.json`` and print a short table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args(argv or [])
    result = bench(repeats=args.repeats, compile=args.compile)
    best_samples_per_s = result["variants"][result["best"]]["samples_per_s"]
    patches = RESULTS / "patches.json"
    if patches.exists():
        # The patch-store benchmark measured the loader on the BoM store (128x128, 6+6 frames,
        # the same sample shape as here); data must outpace training by far.
        loader = json.loads(patches.read_text())["results"]["loader_workers_0"]["samples_per_s"]
        result["loader_samples_per_s"] = loader
        result["loader_over_training"] = loader / best_samples_per_s
    save("train", result)
    print(
        f"default ConvLSTM ({result['parameters']:,} parameters), batch {result['batch_size']}, "
        f"{result['frames']} frames of {result['patch_size']}x{result['patch_size']}, "
        f"{result['step_flops'] / 1e9:.1f} GFLOP per step; {result['threads']} threads, "
        f"mkldnn {result['mkldnn']}"
    )
    limits = ", ".join(f"{name} {value / 1e9:.1f}" for name, value in result["limits"].items())
    print(f"reference conv GFLOP/s: {limits}; the limit is the larger")
    print(f"{'variant':<28}{'step s':>8}{'samples/s':>11}{'GFLOP/s':>9}{'ratio':>7}")
    for name, row in result["variants"].items():
        print(
            f"{name:<28}{row['step_s']:>8.3f}{row['samples_per_s']:>11.2f}"
            f"{row['step_flops_per_s'] / 1e9:>9.1f}{row['ratio']:>7.2f}"
        )
    print(f"fastest: {result['best']}")
    if "loader_over_training" in result:
        print(
            f"loader (0 workers) {result['loader_samples_per_s']:.0f} samples/s = "
            f"{result['loader_over_training']:.0f}x training consumption (target >= 10x)"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
