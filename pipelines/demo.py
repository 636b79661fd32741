"""``make demo``: the whole pipeline on the BoM sample with no long training.

ingest -> patches -> pretrained model (committed checkpoint) -> evaluation with maps -> NetCDF
export. The evaluation adds the packaged learned ensemble (10 members) and pysteps'
``lagrangian_probability``: CRPS, rank histograms, reliability, ROC and P(>= 1, 10 mm/h) maps.
When the real data cannot be had, it runs on the synthetic source instead (with a short
training, since the pretrained model is for BoM) and says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nowcast.config import ExperimentConfig, load_experiment
from nowcast.evaluate.stage import evaluate
from nowcast.export import export
from nowcast.patches.build import build_patches
from nowcast.sources.cube import describe_cube, open_cube
from nowcast.sources.ingest import ingest
from nowcast.sources.sample_data import DataUnavailableError, fetch_sample_data
from nowcast.training.checkpoint import PRETRAINED_CHECKPOINT, PRETRAINED_ENSEMBLE_CHECKPOINT
from nowcast.training.loop import train

REPO = Path(__file__).resolve().parent.parent
PRETRAINED = PRETRAINED_CHECKPOINT
PRETRAINED_ENSEMBLE = PRETRAINED_ENSEMBLE_CHECKPOINT
DEMO_MEMBERS = 10
# The pretrained model comes from bom_lagrangian_tr, which shares the bom_lagrangian patch store.
REAL_CONFIG = REPO / "pipelines" / "configs" / "bom_lagrangian_tr.yaml"
SYNTHETIC_CONFIG = REPO / "pipelines" / "configs" / "synthetic.yaml"


def real_data_available() -> bool:
    """True when the BoM sample is present (or downloadable) and verified."""
    try:
        fetch_sample_data(["bom"], progress=False)
    except (DataUnavailableError, OSError, ValueError) as err:
        print(f"note: the BoM sample is unavailable ({err})")
        print("note: falling back to the synthetic source")
        return False
    return True


def demo_experiment(real: bool) -> ExperimentConfig:
    """The experiment the demo runs, with its outputs under runs/demo_<name>."""
    experiment = load_experiment(REAL_CONFIG if real else SYNTHETIC_CONFIG)
    run_dir = f"runs/demo_{experiment.name}"
    evaluate_section = dict(experiment.evaluate)
    evaluate_section.update(methods=["persistence", "extrapolation", "model"])
    export_section = dict(experiment.export, methods=["model"], window_stride_minutes=60)
    train_section = dict(experiment.train)
    if real:
        evaluate_section["checkpoint"] = str(PRETRAINED)
        export_section["checkpoint"] = str(PRETRAINED)
        if PRETRAINED_ENSEMBLE.exists():
            # The learned ensemble's exceedance probabilities beside pysteps' local Lagrangian
            # ones; 10 members keep the demo short (make skill scores 20 against STEPS).
            evaluate_section["methods"] += ["ensemble", "lagrangian_probability"]
            evaluate_section["members"] = DEMO_MEMBERS
            evaluate_section["method_kwargs"] = {
                **evaluate_section.get("method_kwargs", {}),
                "ensemble": {"checkpoint": str(PRETRAINED_ENSEMBLE)},
            }
    else:
        train_section.update(
            model={
                "name": "convlstm",
                "kwargs": {"hidden_channels": [16], "kernel_sizes": [3], "residual": True},
            },
            max_steps=60,
            epochs=None,
            batch_size=8,
            loss="mse",
        )
    return experiment.model_copy(
        update={
            "run_dir": run_dir,
            "evaluate": evaluate_section,
            "export": export_section,
            "train": train_section,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo")
    parser.add_argument("--synthetic", action="store_true", help="skip the real data")
    args = parser.parse_args(argv)
    real = not args.synthetic and real_data_available() and PRETRAINED.exists()
    if not args.synthetic and not PRETRAINED.exists():
        print(f"note: no pretrained model at {PRETRAINED}; running the synthetic demo")
    experiment = demo_experiment(real)

    for source in experiment.sources:
        print(f"== ingest {source}")
        result = ingest(source, experiment.cube_root)
        print(result.summary())
        print(describe_cube(open_cube(result.path)))

    print(f"== patches {experiment.name}")
    store = build_patches(experiment)
    print(f"patch store: {store}")

    if real:
        print(f"== model: pretrained {PRETRAINED.relative_to(REPO)} (reproduce: make skill)")
    else:
        print("== train (short, synthetic)")
        checkpoints = Path(experiment.run_path) / "checkpoints"
        summary = train(experiment, resume=(checkpoints / "last.pt").exists())
        print(f"trained {summary['steps']} steps, best val loss {summary['best_val_loss']:.4f}")

    print("== evaluate")
    outputs = evaluate(experiment)
    print(Path(outputs["report"]).read_text())

    print("== export")
    paths = export(experiment)
    print(f"{len(paths)} NetCDF file(s) in {Path(paths[0]).parent}")
    print(f"\nreport: {outputs['report']}\nfigures: {Path(outputs['report']).parent / 'figures'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
