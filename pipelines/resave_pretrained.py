"""Re-save the pretrained checkpoint with every key of :data:`CHECKPOINT_KEYS`.

The pretrained model (:data:`nowcast.training.checkpoint.PRETRAINED_CHECKPOINT`) was trained by
``make skill`` before checkpoints recorded ``motion_stride`` and ``pixel_size_m``. This script
adds them with the values its published scores use, plus a ``provenance`` note saying so, and
leaves everything else (the weights above all) as it is::

    python -m pipelines.resave_pretrained            # rewrite the packaged checkpoint in place
    python -m pipelines.resave_pretrained --check    # only say whether it is up to date

* ``motion_stride``: 8, the coarse motion grid the model has always been run with at inference
  (:data:`nowcast.advection.lagrangian.DEFAULT_MOTION_STRIDE`), so its forecasts and scores do
  not change. Its training patches carried full-resolution motion; the provenance says so.
* ``pixel_size_m``: ``{"bom": metres}``, the grid of the BoM sample it was trained on, read from
  one raw BoM file through the catalog (the BoM sample must be under ``NOWCAST_DATA_ROOT``).

Running it on an up-to-date checkpoint changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nowcast.advection.lagrangian import DEFAULT_MOTION_STRIDE
from nowcast.sources.catalog import load_catalog, plan_frames
from nowcast.sources.cube import pixel_size
from nowcast.sources.frames import source_grid
from nowcast.storage import file_sha256
from nowcast.training.checkpoint import (
    CHECKPOINT_KEYS,
    OPTIONAL_CHECKPOINT_KEYS,
    PRETRAINED_CHECKPOINT,
    save_checkpoint,
)

#: The source the pretrained model was trained on.
TRAINING_SOURCE = "bom"
PROVENANCE = (
    "Trained by `make skill` (experiment bom_lagrangian_tr) on Lagrangian patches whose motion "
    "was estimated at full resolution, before checkpoints recorded motion_stride and "
    "pixel_size_m. pipelines/resave_pretrained.py added motion_stride 8 (the coarse motion grid "
    "the model is run with at inference, which all its published scores use) and pixel_size_m "
    "(the BoM sample's grid); the weights and every other key are unchanged."
)


def bom_pixel_size() -> float:
    """Pixel size in metres of the BoM sample, from one raw file (as ingest reads it).

    Returns
    -------
    float
        Metres per pixel.
    """
    source = load_catalog()[TRAINING_SOURCE]
    plan = plan_frames(source)
    present = [frame for frame, ok in zip(plan.frames, plan.present, strict=True) if ok]
    if not present:
        raise FileNotFoundError(f"no raw {TRAINING_SOURCE} file: fetch it with `make data`")
    return float(pixel_size(source_grid(source, present[:3]).x))


def completed(checkpoint: dict, pixel_size_m: float) -> dict:
    """The checkpoint with the keys it lacks, in the order of :data:`CHECKPOINT_KEYS`.

    Parameters
    ----------
    checkpoint : dict
        The pretrained checkpoint as ``torch.load(weights_only=True)`` reads it.
    pixel_size_m : float
        Metres per pixel of the training source.

    Returns
    -------
    dict
        A new dict; the values of the keys already present are the same objects.
    """
    added = {
        "pixel_size_m": {TRAINING_SOURCE: pixel_size_m},
        "motion_stride": DEFAULT_MOTION_STRIDE,
        "provenance": PROVENANCE,
    }
    # A later stage (make skill ARGS=--unseen) may extend the provenance after this sentence.
    if str(checkpoint.get("provenance", "")).startswith(PROVENANCE):
        added["provenance"] = checkpoint["provenance"]
    for key, value in added.items():
        if key in checkpoint and checkpoint[key] != value:
            raise ValueError(f"the checkpoint already has {key}={checkpoint[key]!r}, not {value!r}")
    merged = {**checkpoint, **added}
    unknown = set(merged) - set(CHECKPOINT_KEYS) - set(OPTIONAL_CHECKPOINT_KEYS)
    missing = set(CHECKPOINT_KEYS) - set(merged)
    if unknown or missing:
        raise ValueError(f"unexpected keys {sorted(unknown)}, missing keys {sorted(missing)}")
    order = [*CHECKPOINT_KEYS, *OPTIONAL_CHECKPOINT_KEYS]
    return {key: merged[key] for key in order if key in merged}


def same_weights(old: dict, new: dict) -> bool:
    """True when both state dicts hold the same names, dtypes and bits."""
    return list(old) == list(new) and all(
        old[name].dtype == new[name].dtype and torch.equal(old[name], new[name]) for name in old
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=PRETRAINED_CHECKPOINT)
    parser.add_argument("--out", type=Path, default=None, help="default: --checkpoint")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    new = completed(checkpoint, bom_pixel_size())
    if set(new) == set(checkpoint):
        print(f"{args.checkpoint}: up to date (sha256 {file_sha256(args.checkpoint)})")
        return 0
    if args.check:
        print(f"{args.checkpoint}: lacks {sorted(set(new) - set(checkpoint))}")
        return 1
    old_sha = file_sha256(args.checkpoint)
    save_checkpoint(out, new)
    written = torch.load(out, map_location="cpu", weights_only=True)
    if not same_weights(checkpoint["model_state"], written["model_state"]):
        raise RuntimeError(f"{out}: model_state differs from {args.checkpoint}")
    print(f"{args.checkpoint} (sha256 {old_sha})")
    print(f"-> {out} (sha256 {file_sha256(out)}); model_state bit-identical")
    for key in set(new) - set(checkpoint):
        print(f"   added {key}: {new[key]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
