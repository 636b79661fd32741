"""Shared fixtures. Real-data fixtures fail (never skip) when the sample data is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nowcast.sources.catalog import Catalog, SourceConfig, load_catalog

REPO = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    root = os.environ.get("NOWCAST_DATA_ROOT")
    if not root:
        # Same default as the Makefile, so `pytest` works from the repo without make.
        root = str(REPO.parent / "shared" / "data" / "pysteps-data")
        os.environ["NOWCAST_DATA_ROOT"] = root
    return Path(root)


@pytest.fixture
def single_torch_thread():
    """One torch thread for the test (exact, comparable numbers; no oversubscription)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The pysteps sample data; a test that needs it fails if it is missing (CI=true or not)."""
    root = _data_root()
    if not (root / "radar").is_dir():
        pytest.fail(
            f"sample radar data not found under NOWCAST_DATA_ROOT={root}; run `make data`",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def catalog(data_root) -> Catalog:
    return load_catalog(REPO / "data_catalog.yaml")


@pytest.fixture(scope="session")
def bom_cube(catalog, tmp_path_factory) -> str:
    """The BoM day ingested once per test session (in-process Dask cluster)."""
    from nowcast.sources.ingest import ingest

    cube_dir = tmp_path_factory.mktemp("cubes")
    return ingest("bom", str(cube_dir), catalog=catalog, scheduler="threads", progress=False).path


def synthetic_catalog(**kwargs) -> Catalog:
    """A catalog with one small synthetic source; kwargs override its importer_kwargs."""
    importer_kwargs = {"shape": [64, 64], "n_frames": 30, "seed": 1, "motion": [1.5, -1.0]}
    importer_kwargs.update(kwargs)
    source = SourceConfig(
        name="synthetic", importer="synthetic", timestep=10, importer_kwargs=importer_kwargs
    )
    return Catalog(sources={"synthetic": source})


@pytest.fixture
def small_synthetic_catalog() -> Catalog:
    return synthetic_catalog()


#: The BoM day's split blocks, as in pipelines/configs/bom.yaml.
BOM_SPLIT_TIMES = {
    "test": [{"start": "2020-10-31T08:00", "end": "2020-10-31T11:50"}],
    "val": [{"start": "2020-10-31T00:00", "end": "2020-10-31T02:50"}],
}


def bom_experiment(bom_cube: str, patch_dir, name: str = "bom", **patches):
    """An experiment on the session's BoM cube with the bom.yaml splits; kwargs set ``patches``."""
    from nowcast.config import ExperimentConfig

    settings = {"split_times": BOM_SPLIT_TIMES, "buffer_minutes": 30, **patches}
    return ExperimentConfig(
        name=name,
        sources=["bom"],
        cube_dir=os.path.dirname(bom_cube),
        patch_dir=str(patch_dir),
        patches=settings,
    )


#: Checkpoint files a user may hand over by mistake -> words of the one-line error.
BAD_CHECKPOINTS = {
    "empty": "is empty",
    "truncated": "is not a readable checkpoint",
    "random bytes": "is not a readable checkpoint",
    "text": "is not a readable checkpoint",
    "bare tensor": "holds a Tensor, not a nowcast checkpoint",
    "dict without the keys": "lacks the checkpoint keys",
    "another architecture": "another model or architecture",
}


def bad_checkpoint(kind: str, good: str, folder: Path) -> str:
    """A bad checkpoint of one of the :data:`BAD_CHECKPOINTS` kinds, made from ``good``."""
    import numpy as np
    import torch

    path = Path(folder) / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = Path(good).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "text":
        path.write_text("model: convlstm\n")
    elif kind == "bare tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "dict without the keys":
        torch.save({"model_state": {}}, path)
    elif kind == "another architecture":
        checkpoint = torch.load(good, weights_only=True)
        kwargs = checkpoint["model_kwargs"]
        checkpoint["model_kwargs"] = {**kwargs, "hidden_channels": [5]}
        torch.save(checkpoint, path)
    else:
        raise ValueError(f"unknown bad checkpoint kind {kind!r}")
    return str(path)
