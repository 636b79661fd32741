"""What every ``make skill`` experiment shares: a fresh training and the hardware it ran on."""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path

import torch

from nowcast.config import ExperimentConfig
from nowcast.patches.build import build_patches
from nowcast.sources.ingest import ingest
from nowcast.training.loop import train


def hardware() -> str:
    """The device a run trained on, as the skill document names it."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_from_scratch(experiment: ExperimentConfig) -> tuple[dict, float]:
    """Ingest, patches and a training that starts fresh (earlier checkpoints and logs removed).

    Returns
    -------
    summary : dict
        What :func:`nowcast.training.loop.train` returns.
    seconds : float
        Wall time of the training.
    """
    for source in experiment.sources:
        ingest(source, experiment.cube_root, progress=False)
    build_patches(experiment, progress=False)
    checkpoints = Path(experiment.run_path) / "checkpoints"
    if checkpoints.exists():
        shutil.rmtree(checkpoints)  # a skill run trains from scratch
    for stale in ("train_log.csv", "tensorboard"):
        path = Path(experiment.run_path) / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    start = time.perf_counter()
    summary = train(experiment, progress=False)
    return summary, time.perf_counter() - start
