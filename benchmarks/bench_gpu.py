"""GPU check and benchmark: training-step speed, full-domain inference latency, end-to-end run.

Run from the project root on a machine with a CUDA GPU::

    python -m benchmarks.bench_gpu --out bench_gpu.json [--no-compile] [--e2e-compile]

and, to test the script itself on the CPU with tiny sizes (about a minute on 2 cores)::

    python -m benchmarks.bench_gpu --quick --out /tmp/bench_gpu_cpu.json

Without CUDA and without ``--full`` the ``--quick`` sizes are used, so that ``make bench`` stays
short on a laptop. Without ``--out`` the results go to ``benchmarks/results/gpu_<device>.json``
(``gpu_nvidia_h200.json``, or ``gpu_cpu_quick.json`` for the CPU test run).

On the lent H100/H200 machine it runs through ``benchmarks/gpu_check.sh`` (about 3 to 4
minutes, most of it compilation and the child processes' start-up). The sections run in the
order train (eager variants), inference, nowcast, end to end, compile (``--sections`` picks a
subset), each recorded in the JSON (written again after every step, so a run cut short still leaves
what it measured) and summarised in a printed table:

``environment``
    Device name and capability, torch, CUDA and cuDNN versions, bf16 support, the TF32 flags,
    and the versions of the packages that ``nowcast`` imports (to check an install).
``train_step``
    One training step as :func:`nowcast.training.loop.train` does it
    (autocast forward, loss in fp32,
    ``GradScaler`` (enabled for fp16 only), backward, gradient clipping, fused AdamW on CUDA,
    ``loss.item()``), for the model, loss, batch size, frames and patch size of
    ``pipelines/configs/bom_lagrangian_tr.yaml``, on random batches already on the device (no
    data loading). Variants: ``fp32`` (TF32 allowed, as ``train`` sets it on CUDA),
    ``fp32_channels_last``, ``amp``, ``amp_channels_last`` and
    ``amp_channels_last_compile`` (``torch.compile``, in a child process with a time limit,
    ``--compile-timeout``; skipped with ``--no-compile``). The AMP dtype is
    :func:`nowcast.training.setup.resolve_amp_dtype` of ``"auto"`` (bf16 on Hopper); on the CPU,
    where
    ``train`` runs without AMP, bf16 is used so that the code path is still exercised. Each
    variant reports the first step's time (cuDNN autotuning, compilation), the median of the
    timed steps (``torch.cuda.synchronize`` around each), samples/s, the projected compute
    time of the config's ``max_steps`` and the peak GPU memory.
``inference``
    Latency of one full-domain forecast (``n_input_frames`` in, ``n_target_frames`` out, batch
    1) under ``torch.inference_mode`` on the BoM grid (512 x 512) and the OPERA grid
    (2200 x 1900), in fp32, AMP, and AMP with channels_last; median of a few runs.
``nowcast``
    The shipped pretrained model's full-domain BoM nowcast, its motion and frame transport
    included (as ``bench_evaluate`` times it on the CPU), eager and with ``torch.compile``
    (``benchmarks/gpu_nowcast.py``), beside pysteps LK on the CPU.
``end_to_end``
    The project's own code path in child processes (``python -m nowcast.cli``): ``ingest
    synthetic``, ``patches`` and ``train`` of a copy of ``pipelines/configs/synthetic.yaml``
    whose folders are in a temporary directory, ``max_steps`` 50 (device auto-detected: CUDA,
    AMP and channels_last when there is a GPU), then ``train --resume`` with ``max_steps`` 60.
    Checks: both exit 0, the summaries' device/amp/steps, the checkpoint's step, and that the
    training log continues the first run. ``--e2e-compile`` adds a short run with
    ``compile: true``. A failure is recorded with the tail of its output, never fatal. With
    ``--quick``: 4 then 6 steps of a one-layer ConvLSTM with 8 hidden channels, batch 4.

The exit status is 1 when a section failed or an end-to-end check did not pass.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from benchmarks.common import RESULTS
from benchmarks.gpu_nowcast import bench_nowcast
from nowcast.models.complexity import count_parameters, forward_flops
from nowcast.models.registry import build_model
from nowcast.patches.normalization import Normalization
from nowcast.training.config import TrainConfig
from nowcast.training.device import resolve_device
from nowcast.training.setup import (
    build_optimizer,
    configure_backends,
    resolve_amp_dtype,
    seed_everything,
)
from nowcast.training.step import StepParts, train_step

REPO = Path(__file__).resolve().parent.parent
TRAIN_CONFIG = REPO / "pipelines" / "configs" / "bom_lagrangian_tr.yaml"
E2E_CONFIG = REPO / "pipelines" / "configs" / "synthetic.yaml"
#: Full-domain grids (height, width) of the inference section; --quick uses a tenth.
GRIDS = {"bom_512x512": (512, 512), "opera_2200x1900": (2200, 1900)}
#: Normalisation of the random batches: log1p with about the BoM store's scale.
LOG1P = Normalization("log1p", {"scale": 4.0, "percentile": 99.9})
PACKAGES = (
    "numpy",
    "xarray",
    "pydantic",
    "zarr",
    "numcodecs",
    "dask",
    "distributed",
    "pyproj",
    "pysteps",
    "typer",
)


@dataclass(frozen=True)
class Variant:
    """One way of running the training step."""

    amp: bool
    channels_last: bool
    compile: bool = False


VARIANTS = {
    "fp32": Variant(amp=False, channels_last=False),
    "fp32_channels_last": Variant(amp=False, channels_last=True),
    "amp": Variant(amp=True, channels_last=False),
    "amp_channels_last": Variant(amp=True, channels_last=True),
    "amp_channels_last_compile": Variant(amp=True, channels_last=True, compile=True),
}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetitions (full, or tiny with --quick)."""

    batch_size: int
    patch_size: int
    warmup_steps: int
    timed_steps: int
    grids: dict[str, tuple[int, int]]
    inference_runs: int
    e2e_steps: int
    e2e_resume_steps: int


def sizes_for(quick: bool, train_config: TrainConfig, patch_size: int) -> Sizes:
    """Full sizes (the config's batch and patch size), or tiny ones for a CPU test."""
    if quick:
        grids = {f"{name}/10": (h // 10, w // 10) for name, (h, w) in GRIDS.items()}
        return Sizes(2, 32, 1, 3, grids, 2, 4, 6)
    return Sizes(train_config.batch_size, patch_size, 10, 30, dict(GRIDS), 5, 50, 60)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def amp_dtype_for(device: torch.device) -> torch.dtype:
    """Autocast dtype of the AMP variants: train's "auto" on CUDA, bf16 elsewhere."""
    dtype = resolve_amp_dtype("auto", device)
    return dtype if dtype is not None else torch.bfloat16


def load_train_setup(path: Path = TRAIN_CONFIG) -> tuple[dict, TrainConfig]:
    """The raw experiment config and its validated ``train`` section (defaults filled in)."""
    raw = yaml.safe_load(path.read_text())
    return raw, TrainConfig(**raw.get("train", {}))


def make_model(raw: dict, train_config: TrainConfig) -> torch.nn.Module:
    """Build the config's model through the registry, as ``train`` does."""
    patches = raw.get("patches", {})
    return build_model(
        train_config.model.name,
        int(patches.get("n_input_frames", 6)),
        int(patches.get("n_target_frames", 6)),
        **train_config.model.kwargs,
    )


# ---- training step ---------------------------------------------------------------------------


def time_training_variant(
    name: str, raw: dict, train_config: TrainConfig, sizes: Sizes, device: torch.device
) -> dict:
    """Time the training step of one variant in this process."""
    variant = VARIANTS[name]
    configure_backends(device)
    seed_everything(train_config.seed)
    reset_memory(device)
    model = make_model(raw, train_config).to(device)
    if variant.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, train_config, device)
    amp_dtype = amp_dtype_for(device) if variant.amp else None
    # The training loop's own step (nowcast.training.step.train_step), not a copy of it.
    parts = StepParts.for_config(
        model,
        optimizer,
        train_config,
        LOG1P,
        device,
        amp_dtype,
        compiled=torch.compile(model) if variant.compile else model,
    )

    generator = torch.Generator(device="cpu").manual_seed(0)
    n_in, n_out = model.n_input_frames, model.n_target_frames
    side = sizes.patch_size
    inputs = torch.rand((sizes.batch_size, n_in, 1, side, side), generator=generator)
    targets = torch.rand((sizes.batch_size, n_out, 1, side, side), generator=generator)
    mask = (torch.rand(targets.shape, generator=generator) > 0.1).float()
    inputs, targets, mask = (t.to(device) for t in (inputs, targets, mask))

    def step() -> float:
        return train_step(parts, inputs, targets, mask)

    synchronize(device)
    tic = time.perf_counter()
    loss_value = step()
    synchronize(device)
    first_step_s = time.perf_counter() - tic
    for _ in range(sizes.warmup_steps):
        step()
    times = []
    for _ in range(sizes.timed_steps):
        synchronize(device)
        tic = time.perf_counter()
        loss_value = step()
        synchronize(device)
        times.append(time.perf_counter() - tic)
    median = statistics.median(times)
    max_steps = train_config.max_steps
    return {
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
        "channels_last": variant.channels_last,
        "compile": variant.compile,
        "first_step_s": first_step_s,
        "median_step_s": median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "timed_steps": len(times),
        "samples_per_s": sizes.batch_size / median,
        "projected_max_steps_s": median * max_steps if max_steps else None,
        "peak_memory_mib": peak_memory_mib(device),
        "last_loss": loss_value,
        "loss_finite": math.isfinite(loss_value),
    }


def compile_variant_in_child(name: str, args: argparse.Namespace) -> dict:
    """Run one (compiled) variant in a child process, killed after ``--compile-timeout`` s."""
    with tempfile.TemporaryDirectory(prefix="bench_gpu_variant_") as folder:
        out = Path(folder) / "variant.json"
        command = [sys.executable, "-m", "benchmarks.bench_gpu", "--variant", name]
        command += ["--out", str(out)] + (["--quick"] if args.quick else [])
        if args.device:
            command += ["--device", args.device]
        returncode, _, stderr, elapsed = run_child(command, args.compile_timeout)
        if returncode is None:
            return {
                "error": f"timed out after {args.compile_timeout} s (--compile-timeout)",
                "stderr_tail": tail(stderr),
            }
        if returncode != 0 or not out.exists():
            return {"error": f"child exited with {returncode}", "stderr_tail": tail(stderr)}
        result = json.loads(out.read_text())
        result["child_wall_s"] = elapsed
        return result


def train_step_section(args: argparse.Namespace, report: dict) -> dict:
    """``report["train_step"]``: the set-up shared by the variants (created on first use)."""
    if "train_step" in report:
        return report["train_step"]
    raw, train_config = load_train_setup()
    sizes = sizes_for(args.quick, train_config, int(raw["patches"]["patch_size"]))
    model = make_model(raw, train_config)
    n_in, n_out = model.n_input_frames, model.n_target_frames
    flops = 3 * forward_flops(
        model, (sizes.batch_size, n_in, 1, sizes.patch_size, sizes.patch_size)
    )
    section = report["train_step"] = {
        "config": str(TRAIN_CONFIG.relative_to(REPO)),
        "model": train_config.model.name,
        "model_kwargs": train_config.model.kwargs,
        "parameters": count_parameters(model),
        "loss": train_config.loss,
        "grad_clip": train_config.grad_clip,
        "batch_size": sizes.batch_size,
        "patch_size": sizes.patch_size,
        "n_input_frames": n_in,
        "n_target_frames": n_out,
        "max_steps": train_config.max_steps,
        "step_flops_estimate": flops,
        "warmup_steps": sizes.warmup_steps,
        "timed_steps": sizes.timed_steps,
        "variants": {},
    }
    return section


def bench_training(args: argparse.Namespace, device: torch.device, report: dict) -> None:
    section = train_step_section(args, report)
    for name, variant in VARIANTS.items():
        if variant.compile:
            # Timed last (section "compile"), so that a slow compilation delays nothing else.
            section["variants"][name] = {"skipped": "--no-compile" if args.no_compile else "later"}
            continue
        run_training_variant(name, args, device, report)


def run_training_variant(
    name: str, args: argparse.Namespace, device: torch.device, report: dict
) -> None:
    """Time one variant (compiled ones in a child process) into ``report["train_step"]``."""
    section = report["train_step"]
    print(f"[train_step] {name} ...", flush=True)
    try:
        if VARIANTS[name].compile:
            result = compile_variant_in_child(name, args)
        else:
            raw, train_config = load_train_setup()
            sizes = sizes_for(args.quick, train_config, int(raw["patches"]["patch_size"]))
            result = time_training_variant(name, raw, train_config, sizes, device)
    except Exception as err:  # one failing variant should not hide the others
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    if "median_step_s" in result:
        result["step_tflops_per_s"] = (
            section["step_flops_estimate"] / result["median_step_s"] / 1e12
        )
    section["variants"][name] = result
    save_report(args.out, report)
    reset_memory(device)


def bench_compile(args: argparse.Namespace, device: torch.device, report: dict) -> None:
    section = train_step_section(args, report)
    for name, variant in VARIANTS.items():
        if variant.compile:
            if args.no_compile:
                section["variants"][name] = {"skipped": "--no-compile"}
            else:
                run_training_variant(name, args, device, report)


# ---- inference ---------------------------------------------------------------------------------


def bench_inference(args: argparse.Namespace, device: torch.device, report: dict) -> None:
    raw, train_config = load_train_setup()
    sizes = sizes_for(args.quick, train_config, int(raw["patches"]["patch_size"]))
    configure_backends(device)
    seed_everything(0)
    model = make_model(raw, train_config).to(device).eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    amp_dtype = amp_dtype_for(device)
    modes = {
        "fp32": (model, None),
        "amp": (model, amp_dtype),
        "amp_channels_last": (model_cl, amp_dtype),
    }
    section = report["inference"] = {
        "batch": 1,
        "n_input_frames": model.n_input_frames,
        "n_target_frames": model.n_target_frames,
        "amp_dtype": str(amp_dtype).removeprefix("torch."),
        "runs": sizes.inference_runs,
        "grids": {},
    }
    for grid, (height, width) in sizes.grids.items():
        rows = section["grids"][grid] = {"height": height, "width": width}
        generator = torch.Generator(device="cpu").manual_seed(0)
        frames = torch.rand((1, model.n_input_frames, 1, height, width), generator=generator)
        frames = frames.to(device)
        for mode, (net, dtype) in modes.items():
            print(f"[inference] {grid} {mode} ...", flush=True)
            reset_memory(device)
            try:
                times = []
                with torch.inference_mode():
                    for run in range(sizes.inference_runs + 1):  # the first run is a warm-up
                        synchronize(device)
                        tic = time.perf_counter()
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                            prediction = net(frames)
                        synchronize(device)
                        if run:
                            times.append(time.perf_counter() - tic)
                        else:
                            first = time.perf_counter() - tic
                    finite = bool(torch.isfinite(prediction).all())
                rows[mode] = {
                    "first_s": first,
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                    "peak_memory_mib": peak_memory_mib(device),
                    "output_shape": list(prediction.shape),
                    "output_finite": finite,
                }
            except Exception as err:
                rows[mode] = {"error": f"{type(err).__name__}: {err}"}
            save_report(args.out, report)
    del model, model_cl
    reset_memory(device)


# ---- end to end --------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # The repository root first, so `import nowcast` works without `pip install -e .`.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def tail(text: str | bytes | None, size: int = 3000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-size:]


def run_child(command: list[str], timeout: float) -> tuple[int | None, str, str, float]:
    """Run ``command`` in its own process group; kill the group after ``timeout`` seconds.

    Returns the exit status (None on a time-out), stdout, stderr and the seconds it took.
    """
    tic = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Its own process group (same session), so that its children (compile workers) can
        # be killed with it; process_group=0 would need Python 3.11.
        preexec_fn=os.setpgrp,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        returncode = None
    return returncode, stdout, stderr, time.perf_counter() - tic


def run_step(name: str, command: list[str], timeout: float) -> dict:
    """Run one pipeline command; record exit status, time and the output's tail."""
    print(f"[end_to_end] {name}: {' '.join(command[2:])}", flush=True)
    returncode, stdout, stderr, seconds = run_child(command, timeout)
    result = {
        "ok": returncode == 0,
        "returncode": returncode,
        "seconds": seconds,
        "stdout_tail": tail(stdout),
        "stderr_tail": tail(stderr),
    }
    if returncode is None:
        result["error"] = f"timed out after {timeout} s"
    start = stdout.find("{")
    if start >= 0:
        try:
            result["summary"] = json.loads(stdout[start:])
        except json.JSONDecodeError:
            pass
    return result


def write_experiment(path: Path, folder: Path, train: dict) -> None:
    raw = yaml.safe_load(E2E_CONFIG.read_text())
    raw.update(
        cube_dir=str(folder / "cubes"),
        patch_dir=str(folder / "patches"),
        run_dir=str(folder / ("run_compile" if train.get("compile") else "run")),
        train=train,
    )
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def check(checks: dict, name: str, condition: bool, detail: object = None) -> None:
    checks[name] = {"ok": bool(condition), "detail": detail}


def bench_end_to_end(args: argparse.Namespace, device: torch.device, report: dict) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nowcast_gpu_e2e_"))
    report["end_to_end"] = {"folder": str(folder), "steps": {}, "checks": {}}
    try:
        end_to_end_steps(args, device, report, folder)
    finally:
        section = report["end_to_end"]
        steps = section["steps"]
        check(
            section["checks"],
            "all_steps_ok",
            bool(steps) and all(step["ok"] for step in steps.values()),
            [name for name, step in steps.items() if not step["ok"]],
        )
        if not args.keep_e2e:
            shutil.rmtree(folder, ignore_errors=True)


def end_to_end_steps(
    args: argparse.Namespace, device: torch.device, report: dict, folder: Path
) -> None:
    """Ingest, patches, train and resume in ``folder`` into ``report["end_to_end"]``."""
    raw, train_config = load_train_setup()
    sizes = sizes_for(args.quick, train_config, int(raw["patches"]["patch_size"]))
    cli = [sys.executable, "-m", "nowcast.cli"]
    timeout = args.step_timeout
    device_args = ["--device", args.device] if args.device else []
    section = report["end_to_end"]
    steps, checks = section["steps"], section["checks"]
    config = folder / "synthetic.yaml"
    n1, n2 = sizes.e2e_steps, sizes.e2e_resume_steps
    base = {"epochs": None, "checkpoint_every": max(1, n1 // 2), "log_every": 2}
    if args.quick:  # a smaller model and batch than the config's defaults: the same code path
        base.update(
            batch_size=4,
            model={"name": "convlstm", "kwargs": {"hidden_channels": [8], "kernel_sizes": [3]}},
        )
    write_experiment(config, folder, {**base, "max_steps": n1})
    section["config"] = yaml.safe_load(config.read_text())

    def go(name: str, command: list[str], step_timeout: float = timeout) -> bool:
        steps[name] = run_step(name, command, step_timeout)
        save_report(args.out, report)
        return steps[name]["ok"]

    cube_args = ["--cube-dir", str(folder / "cubes"), "--scheduler", "threads"]
    if not go("ingest", [*cli, "ingest", "synthetic", *cube_args]):
        return
    if not go("patches", [*cli, "patches", str(config), "--scheduler", "threads"]):
        return
    expected_device = "cuda" if device.type == "cuda" else device.type
    expected_amp = "off" if device.type != "cuda" else str(amp_dtype_for(device))
    expected_amp = expected_amp.removeprefix("torch.")
    if go("train", [*cli, "train", str(config), *device_args]):
        summary = steps["train"].get("summary", {})
        check(checks, "train_steps", summary.get("steps") == n1, summary.get("steps"))
        check(
            checks,
            "train_stop_reason",
            summary.get("stop_reason") == "max_steps",
            summary.get("stop_reason"),
        )
        check(
            checks,
            "train_device",
            str(summary.get("device", "")).startswith(expected_device),
            summary.get("device"),
        )
        check(checks, "train_amp", summary.get("amp") == expected_amp, summary.get("amp"))
        check(
            checks,
            "train_channels_last",
            summary.get("channels_last") is (device.type in ("cuda", "cpu")),
            summary.get("channels_last"),
        )
        val_loss = summary.get("best_val_loss", math.nan)
        check(checks, "train_val_loss_finite", math.isfinite(val_loss), val_loss)
        section["train_samples_per_s"] = summary.get("samples_per_s")
        write_experiment(config, folder, {**base, "max_steps": n2})
        if go("resume", [*cli, "train", str(config), "--resume", *device_args]):
            summary = steps["resume"].get("summary", {})
            check(checks, "resume_steps", summary.get("steps") == n2, summary.get("steps"))
            check(
                checks,
                "resume_stop_reason",
                summary.get("stop_reason") == "max_steps",
                summary.get("stop_reason"),
            )
            try:
                from nowcast.training.checkpoint import load_checkpoint

                last = load_checkpoint(summary["last_checkpoint"], map_location="cpu")
                check(checks, "resume_checkpoint_step", last["step"] == n2, last["step"])
                rows = list(csv.DictReader((folder / "run" / "train_log.csv").open()))
                train_steps = [int(row["step"]) for row in rows if row["split"] == "train"]
                check(
                    checks,
                    "resume_log_continues",
                    bool(train_steps)
                    and max(train_steps) == n2
                    and any(s <= n1 for s in train_steps)
                    and train_steps == sorted(train_steps),
                    train_steps,
                )
            except Exception as err:
                check(checks, "resume_checkpoint_step", False, f"{type(err).__name__}: {err}")
    if args.e2e_compile:
        compiled = folder / "synthetic_compile.yaml"
        write_experiment(compiled, folder, {**base, "max_steps": n1 // 2 or 1, "compile": True})
        if go("train_compile", [*cli, "train", str(compiled), *device_args], args.compile_timeout):
            summary = steps["train_compile"].get("summary", {})
            check(
                checks,
                "compile_steps",
                summary.get("steps") == (n1 // 2 or 1),
                summary.get("steps"),
            )


# ---- environment, report ------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "packages": {},
    }
    for package in PACKAGES:
        try:
            info["packages"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][package] = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            multiprocessors=properties.multi_processor_count,
            memory_gib=properties.total_memory / 2**30,
            bf16_supported=torch.cuda.is_bf16_supported(),
            amp_auto_dtype=str(resolve_amp_dtype("auto", device)),
        )
    else:
        info["device_name"] = platform.processor() or "cpu"
    configure_backends(device)
    info["allow_tf32"] = {
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    return info


def save_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out)


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def print_table(report: dict) -> None:
    env = report.get("environment", {})
    print(
        f"\ndevice: {env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, "
        f"CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, python {env.get('python')}"
    )
    section = report.get("train_step")
    if section:
        print(
            f"\ntrain step: {section['model']} {section['model_kwargs']}, loss {section['loss']}, "
            f"batch {section['batch_size']}, {section['n_input_frames']}+"
            f"{section['n_target_frames']} frames of {section['patch_size']}^2; "
            f"projection for max_steps={section['max_steps']}"
        )
        print(
            f"  {'variant':<27}{'step ms':>9}{'samples/s':>11}{'max_steps s':>13}"
            f"{'TFLOP/s':>9}{'1st step s':>12}{'peak MiB':>10}"
        )
        for name, row in section["variants"].items():
            if "median_step_s" not in row:
                reason = row.get("skipped") or row.get("error", "?")
                print(f"  {name:<27}{reason}")
                continue
            print(
                f"  {name:<27}{fmt(row['median_step_s'], 1e3, 2):>9}"
                f"{fmt(row['samples_per_s']):>11}{fmt(row['projected_max_steps_s']):>13}"
                f"{fmt(row.get('step_tflops_per_s'), 1, 2):>9}{fmt(row['first_step_s'], 1, 2):>12}"
                f"{fmt(row['peak_memory_mib'], 1, 0):>10}"
            )
    section = report.get("inference")
    if section:
        print(f"\ninference (batch 1, inference_mode), median of {section['runs']} runs, ms:")
        print(f"  {'grid':<22}{'fp32':>10}{'amp':>10}{'amp_cl':>10}{'peak MiB':>10}")
        for grid, rows in section["grids"].items():
            cells = [fmt(rows.get(m, {}).get("median_s"), 1e3, 2) for m in ("fp32", "amp")]
            cells.append(fmt(rows.get("amp_channels_last", {}).get("median_s"), 1e3, 2))
            peak = rows.get("fp32", {}).get("peak_memory_mib")
            print(f"  {grid:<22}{cells[0]:>10}{cells[1]:>10}{cells[2]:>10}{fmt(peak, 1, 0):>10}")
    section = report.get("nowcast")
    if section:
        print(f"\nnowcast ({section['model']}, motion and transport included), median, s:")
        for mode in ("pysteps_lk_cpu", "eager", "compiled"):
            row = section.get(mode)
            if row:
                detail = row.get("error") or (
                    f"{fmt(row.get('median_s'), 1, 3)} (first call {fmt(row.get('first_s'), 1, 2)})"
                )
                print(f"  {mode:<16}{detail}")
    section = report.get("end_to_end")
    if section:
        steps = ", ".join(
            f"{name} {'ok' if step['ok'] else 'FAILED'} {step['seconds']:.0f} s"
            for name, step in section["steps"].items()
        )
        failed = [name for name, c in section["checks"].items() if not c["ok"]]
        verdict = "PASS" if not failed and section["checks"] else "FAIL"
        print(f"\nend to end: {verdict} ({steps})")
        if failed:
            print(f"  failed checks: {', '.join(failed)}")
            for name, step in section["steps"].items():
                if not step["ok"]:
                    print(f"  --- {name} stderr tail ---\n{step['stderr_tail'][-1500:]}")
    for error in report.get("errors", []):
        print(f"\nsection {error['section']} failed: {error['error']}")
    print(f"\ntotal {report.get('elapsed_s', 0):.0f} s")


def failed(report: dict) -> bool:
    if report.get("errors"):
        return True
    variants = report.get("train_step", {}).get("variants", {})
    if any("error" in row for row in variants.values()):
        return True
    checks = report.get("end_to_end", {}).get("checks")
    return checks is not None and not all(c["ok"] for c in checks.values())


def main(argv: list[str] | None = None) -> int:
    """Run the sections, write the JSON report, print the table; 1 when something failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (default: results/gpu_<device>.json)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU test)")
    parser.add_argument("--full", action="store_true", help="full sizes even without CUDA")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: auto)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--e2e-compile", action="store_true", help="also train compiled e2e")
    parser.add_argument("--keep-e2e", action="store_true", help="keep the e2e temp folder")
    parser.add_argument("--compile-timeout", type=float, default=150.0, help="seconds")
    parser.add_argument("--step-timeout", type=float, default=240.0, help="per e2e command, s")
    parser.add_argument(
        "--sections",
        default="train,inference,nowcast,e2e,compile",
        help="comma-separated subset of train, inference, nowcast, e2e, compile (in this order)",
    )
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args(argv or [])
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type != "cuda" and not args.full and not args.quick:
        print("no CUDA device: using the --quick sizes (--full to override)")
        args.quick = True
    if args.out is None:
        # One file per kind of device, so a CPU run never overwrites a GPU's numbers.
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        args.out = RESULTS / f"gpu_{slug}{'_quick' if args.quick else ''}.json"

    if args.variant:  # child process of compile_variant_in_child
        raw, train_config = load_train_setup()
        sizes = sizes_for(args.quick, train_config, int(raw["patches"]["patch_size"]))
        result = time_training_variant(args.variant, raw, train_config, sizes, device)
        save_report(args.out, result)
        return 0

    started = time.perf_counter()
    report = {
        "benchmark": "gpu",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": argv or [],
        "quick": args.quick,
        "errors": [],
    }
    report["environment"] = environment(device)
    save_report(args.out, report)
    sections = {
        "train": bench_training,
        "inference": bench_inference,
        "e2e": bench_end_to_end,
        "compile": bench_compile,
        "nowcast": bench_nowcast,
    }
    for name in args.sections.split(","):
        try:
            sections[name.strip()](args, device, report)
        except Exception as err:
            report["errors"].append(
                {
                    "section": name,
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                }
            )
        report["elapsed_s"] = time.perf_counter() - started
        save_report(args.out, report)
    print_table(report)
    print(f"report: {args.out}")
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
