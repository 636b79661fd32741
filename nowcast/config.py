"""Configuration models (pydantic) and safe YAML loading.

Every config error is raised as :class:`ConfigError` with a one-line message that names the file,
the entry and the field, so a user can fix the YAML without reading a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UserError(Exception):
    """A failure the user can fix: bad input, an unknown name, a full or read-only disk.

    The command line prints its message as one line on stderr (it names the file, field or value
    and what to do) and exits with :attr:`exit_code`; anything else is a bug and keeps its
    traceback.
    """

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A configuration file or entry is invalid."""


#: The environment variable naming the sample-data folder (see :func:`default_data_root`).
DATA_ROOT_VARIABLE = "NOWCAST_DATA_ROOT"


def default_data_root() -> Path:
    """Where ``nowcast data`` puts the sample data when ``NOWCAST_DATA_ROOT`` is not set.

    In a development checkout (the package next to ``Makefile`` and ``pyproject.toml``) it is
    the Makefile's default, ``../shared/data/pysteps-data`` from the checkout; in an installed
    package, ``pysteps-data`` in the user's cache folder (pooch's ``os_cache``).
    """
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "Makefile").is_file() and (checkout / "pyproject.toml").is_file():
        return checkout.parent / "shared" / "data" / "pysteps-data"
    import pooch  # lazy: only when the data root is needed

    return Path(pooch.os_cache("nowcast")) / "pysteps-data"


def data_root() -> Path:
    """``$NOWCAST_DATA_ROOT``, else :func:`default_data_root`."""
    return Path(os.environ.get(DATA_ROOT_VARIABLE) or default_data_root())


def expand_env(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in a string.

    Unlike :func:`os.path.expandvars`, an unset variable without default is an error instead of
    being left in place, so a path never silently points at ``${NOWCAST_DATA_ROOT}/...``.
    ``NOWCAST_DATA_ROOT`` itself defaults to :func:`default_data_root`.
    """

    def _sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name, default)
        if value is None and name == DATA_ROOT_VARIABLE:
            value = str(default_data_root())
        if value is None:
            raise ConfigError(f"environment variable {name} is not set (used in {text!r})")
        return value

    return _ENV_PATTERN.sub(_sub, text)


def load_yaml(path: str | Path) -> dict:
    """Load a YAML mapping with ``yaml.safe_load``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file (give a YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())  # pyyaml's message spans lines
        raise ConfigError(f"{path}: invalid YAML: {problem}") from err
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (give a YAML file)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem: ``where: field.path: message``."""
    lines = []
    for problem in err.errors():
        loc = ".".join(str(part) for part in problem["loc"]) or "(root)"
        lines.append(f"{where}: field '{loc}': {problem['msg']}")
    return "; ".join(lines)


class StrictModel(BaseModel):
    """Base model that rejects unknown keys (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_model(model: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Validate ``data`` against ``model``; errors name ``where`` and the field."""
    try:
        return model(**data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where)) from None


# Experiment configs
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
