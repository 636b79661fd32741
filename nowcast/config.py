"""Configuration models (pydantic) and safe YAML loading.

Every config error is raised as :class:`ConfigError` with a one-line message that names the file,
the entry and the field, so a user can fix the YAML without reading a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "data_catalog.yaml"


class ConfigError(ValueError):
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
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
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


class Conversion(StrictModel):
    """How importer output becomes rain rate in mm/h."""

    units: Literal["auto", "mm", "mm/h", "dBZ"] = Field(
        "auto", description="units delivered by the importer; auto trusts its metadata"
    )
    zr_a: float | None = Field(None, description="Z-R a for dBZ input (default: importer's)")
    zr_b: float | None = Field(None, description="Z-R b for dBZ input (default: importer's)")
    max_rain_rate: float | None = Field(
        None, gt=0, description="values above this (mm/h) are radar artefacts and become no-data"
    )


class SourceConfig(StrictModel):
    """One radar source of the data catalog."""

    name: str
    description: str = ""
    importer: str = Field(description="pysteps importer name, or 'synthetic'")
    importer_kwargs: dict[str, Any] = Field(default_factory=dict)
    decoder: Literal["pysteps", "xarray"] = Field(
        "pysteps",
        description="per-file decoder: the pysteps importer, or xarray for CF netCDF "
        "(metadata still comes from the pysteps importer, read once)",
    )
    variable: str | None = Field(None, description="data variable for decoder: xarray")
    root_path: str = ""
    path_fmt: str = ""
    fn_pattern: str = ""
    fn_ext: str = ""
    timestep: int = Field(gt=0, description="minutes between frames")
    conversion: Conversion = Field(default_factory=Conversion)
    start: str | None = Field(None, description="first time, ISO 8601 (UTC)")
    end: str | None = Field(None, description="last time, ISO 8601 (UTC)")
    max_gap_minutes: int = Field(
        360,
        gt=0,
        description="a run of missing times longer than this splits the cube's time axis into "
        "segments and is not stored; shorter runs are kept as NaN frames",
    )
    institution: str = ""

    @field_validator("importer")
    @classmethod
    def _known_importer(cls, value: str) -> str:
        if value == "synthetic":
            return value
        from pysteps.io.interface import _importer_methods

        if value not in _importer_methods:
            known = ", ".join(sorted(_importer_methods))
            raise ValueError(f"unknown pysteps importer '{value}'; known: synthetic, {known}")
        return value

    @model_validator(mode="after")
    def _files_described(self) -> SourceConfig:
        if self.importer != "synthetic":
            for field in ("root_path", "fn_pattern", "fn_ext"):
                if not getattr(self, field):
                    raise ValueError(f"'{field}' is required for importer '{self.importer}'")
        if self.decoder == "xarray" and not self.variable:
            raise ValueError("'variable' is required when decoder is 'xarray'")
        return self

    @property
    def resolved_root(self) -> str:
        return expand_env(self.root_path)


class Catalog(StrictModel):
    """The data catalog: named radar sources."""

    sources: dict[str, SourceConfig]

    def __getitem__(self, name: str) -> SourceConfig:
        if name not in self.sources:
            known = ", ".join(sorted(self.sources))
            raise ConfigError(f"unknown source '{name}'; the catalog has: {known}")
        return self.sources[name]


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate ``data_catalog.yaml``.

    Parameters
    ----------
    path : str or Path, optional
        Catalog file; default is ``$NOWCAST_CATALOG`` or the project's ``data_catalog.yaml``.

    Returns
    -------
    Catalog
    """
    path = Path(path or os.environ.get("NOWCAST_CATALOG", DEFAULT_CATALOG))
    raw = load_yaml(path)
    entries = raw.get("sources")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: expected a non-empty 'sources' mapping")
    sources = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: source '{name}': expected a mapping")
        try:
            sources[name] = SourceConfig(name=name, **entry)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{path}: source '{name}'")) from None
    return Catalog(sources=sources)


def parse_model(model: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Validate ``data`` against ``model``; errors name ``where`` and the field."""
    try:
        return model(**data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where)) from None
