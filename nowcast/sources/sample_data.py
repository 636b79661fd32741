"""Fetch the pysteps sample radar data with pooch (sha256-verified).

Files already under ``NOWCAST_DATA_ROOT`` with the right hash are used as they are; missing
ones are downloaded from the public pysteps-data repository, pinned to one commit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pooch

from nowcast.config import UserError, data_root
from nowcast.sources.catalog import Catalog, list_frames, load_catalog

#: The pysteps-data commit whose files the sha256 registry describes.
PYSTEPS_DATA_REF = "eaa59fb"
URL_TEMPLATE = "https://github.com/pySTEPS/pysteps-data/raw/{ref}/"
REGISTRY_FILE = Path(__file__).with_name("sample_data_registry.txt")


class DataUnavailableError(UserError, RuntimeError):
    """Sample data is neither present locally nor downloadable."""


@dataclass
class FetchResult:
    data_root: str
    present: list[str] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"sample data in {self.data_root}: {len(self.present)} files verified, "
            f"{len(self.downloaded)} downloaded"
        )


def sample_files(catalog: Catalog, sources: list[str] | None = None) -> list[str]:
    """Registry names (paths relative to the data root) of the sources' files."""
    for name in sources or ():
        catalog[name]  # an unknown name is a ConfigError that lists the catalog's sources
    root = os.path.abspath(data_root())
    registry = _registry()
    names = []
    for name, source in catalog.sources.items():
        if source.importer == "synthetic" or (sources and name not in sources):
            continue
        for frame in list_frames(source):
            rel = os.path.relpath(os.path.abspath(frame.path), root)
            if rel in registry:
                names.append(rel)
    return names


def _registry() -> dict[str, str]:
    entries = {}
    for line in REGISTRY_FILE.read_text().splitlines():
        if line.strip():
            name, digest = line.split()
            entries[name] = digest
    return entries


def fetch_sample_data(
    sources: list[str] | None = None,
    catalog: Catalog | None = None,
    progress: bool = True,
    ref: str = PYSTEPS_DATA_REF,
) -> FetchResult:
    """Verify or download the sample files of the catalog's real sources.

    Parameters
    ----------
    sources : list of str, optional
        Catalog source names; default all sources whose files are in the registry.
    catalog : Catalog, optional
    progress : bool
        Show a download progress bar.
    ref : str, optional
        pysteps-data commit to download from, by default :data:`PYSTEPS_DATA_REF`; its files
        must match the registry's hashes.

    Raises
    ------
    DataUnavailableError
        When a file is missing (or corrupt) locally and cannot be downloaded.
    """
    catalog = catalog or load_catalog()
    root = str(data_root())
    base_url = URL_TEMPLATE.format(ref=ref)
    fetcher = pooch.create(path=root, base_url=base_url, registry=_registry(), retry_if_failed=1)
    result = FetchResult(data_root=root)
    for name in sample_files(catalog, sources):
        local = Path(root) / name
        had_it = local.exists()
        try:
            fetcher.fetch(name, progressbar=progress and not had_it)
        except Exception as err:  # requests/OS errors: no network, read-only root, 404
            state = "corrupt (hash mismatch)" if had_it else "missing"
            raise DataUnavailableError(
                f"{local} is {state} and could not be downloaded from {base_url}{name}: "
                f"{type(err).__name__}: {err}. Check the network, or copy the pysteps-data "
                f"repository into NOWCAST_DATA_ROOT={root}."
            ) from err
        (result.present if had_it else result.downloaded).append(name)
    return result
