"""Experiment configs: one YAML file under ``pipelines/configs/`` drives patches, train, evaluate
and export for one experiment.

Top-level keys are shared by all stages; each stage validates only its own section with the
pydantic model that lives next to the stage (``PatchesConfig`` in :mod:`nowcast.patches`, ...),
so stages built by different people do not edit one giant schema.

.. code-block:: yaml

    name: bom                 # experiment name (store and run folder names)
    sources: [bom]            # catalog sources
    cube_dir: data/cubes      # where `nowcast ingest` wrote the cubes (path or fsspec URL)
    patch_dir: data/patches   # where `nowcast patches` writes <name>.zarr
    patch_store_name: null    # optional: share the store of another experiment
    run_dir: runs/bom         # checkpoints, logs, metrics, figures, NetCDF
    patches: {...}
    train: {...}
    evaluate: {...}
    export: {...}
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field

from .config import ConfigError, StrictModel, expand_env, load_yaml, parse_model

Section = TypeVar("Section", bound=BaseModel)

STAGE_SECTIONS = ("patches", "train", "evaluate", "export")


class ExperimentConfig(StrictModel):
    """Top-level keys of an experiment config (stage sections are kept raw here)."""

    name: str
    sources: list[str] = Field(min_length=1)
    cube_dir: str = "data/cubes"
    patch_dir: str = "data/patches"
    patch_store_name: str | None = None
    run_dir: str = ""
    catalog: str | None = None
    description: str = ""
    patches: dict = Field(default_factory=dict)
    train: dict = Field(default_factory=dict)
    evaluate: dict = Field(default_factory=dict)
    export: dict = Field(default_factory=dict)
    forecast_methods: dict = Field(
        default_factory=dict,
        description="named forecast-method variants (blending, probability matching), see "
        "nowcast.nowcasts.variants",
    )

    @property
    def patch_store(self) -> str:
        # Experiments that differ only in training can share one store (e.g. model comparisons).
        name = self.patch_store_name or self.name
        return f"{expand_env(self.patch_dir).rstrip('/')}/{name}.zarr"

    @property
    def run_path(self) -> str:
        return expand_env(self.run_dir or f"runs/{self.name}")

    @property
    def cube_root(self) -> str:
        return expand_env(self.cube_dir)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Load and validate the top level of an experiment config."""
    raw = load_yaml(path)
    experiment = parse_model(ExperimentConfig, raw, str(path))
    object.__setattr__(experiment, "_path", str(path))
    return experiment


def stage_config(experiment: ExperimentConfig, stage: str, model: type[Section]) -> Section:
    """Validate one stage's section; errors name the file and ``stage.field``."""
    if stage not in STAGE_SECTIONS:
        raise ConfigError(f"unknown stage section '{stage}'")
    where = f"{getattr(experiment, '_path', experiment.name)}: section '{stage}'"
    return parse_model(model, getattr(experiment, stage), where)
