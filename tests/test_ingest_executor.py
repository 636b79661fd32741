"""Where ingest runs its blocks: in this process for a small job, on Dask otherwise; the same
store either way."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_catalog

import nowcast.sources.ingest as ingest_module
from nowcast.parallel import IN_PROCESS, dask_client
from nowcast.sources.catalog import Catalog, list_frames
from nowcast.sources.cube import open_cube
from nowcast.sources.ingest import Block, ingest


def _blocks(n_frames: int) -> list[Block]:
    return [Block(index=i, start=i, items=(None,)) for i in range(n_frames)]


def _bom_hours(catalog: Catalog, n: int = 12) -> Catalog:
    """The BoM source cut to ``n`` frames (two time chunks) in the rainy afternoon."""
    source = catalog["bom"]
    frames = list_frames(source)[60 : 60 + n]
    update = {"start": frames[0].time.isoformat(), "end": frames[-1].time.isoformat()}
    return Catalog(sources={"bom": source.model_copy(update=update)})


def _store_files(cube: str) -> dict[str, bytes]:
    """Every file of a zarr store but the group's metadata (its history names the run's time)."""
    root = Path(cube)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p != root / "zarr.json"
    }


@pytest.mark.parametrize("cluster", ["processes", "threads"])
def test_in_process_and_cluster_write_the_same_store(catalog, tmp_path, cluster):
    small = _bom_hours(catalog)
    kwargs = dict(catalog=small, progress=False)
    here = ingest("bom", str(tmp_path / "here"), scheduler=IN_PROCESS, **kwargs)
    there = ingest("bom", str(tmp_path / "there"), scheduler=cluster, **kwargs)
    ours, theirs = open_cube(here.path), open_cube(there.path)
    assert ours.sizes["time"] == 12 and here.n_read == there.n_read == 12
    np.testing.assert_array_equal(ours["rain_rate"].values, theirs["rain_rate"].values)
    assert np.isfinite(ours["rain_rate"].values).any()
    np.testing.assert_array_equal(ours["frame_valid"].values, theirs["frame_valid"].values)
    assert {k: v for k, v in ours.attrs.items() if k != "history"} == {
        k: v for k, v in theirs.attrs.items() if k != "history"
    }
    here_files, there_files = _store_files(here.path), _store_files(there.path)
    assert [k for k in here_files if "rain_rate/c/" in k]  # the chunks are compared, too
    assert here_files == there_files  # byte for byte: chunks, array metadata


def test_small_job_runs_in_process_and_large_one_on_a_new_cluster():
    limit = ingest_module.IN_PROCESS_MAX_FRAMES
    assert ingest_module._executor_kind(None, _blocks(limit)) == IN_PROCESS
    assert ingest_module._executor_kind(None, _blocks(limit + 1)) is None  # LocalCluster
    # A scheduler given is used whatever the size.
    assert ingest_module._executor_kind("tcp://host:8786", _blocks(3)) == "tcp://host:8786"
    assert ingest_module._executor_kind("processes", _blocks(3)) == "processes"


def test_an_active_client_is_used_for_a_small_job():
    with dask_client("threads", n_workers=1):
        assert ingest_module._executor_kind(None, _blocks(3)) is None  # dask_client reuses it


def test_the_limit_is_an_argument(monkeypatch):
    assert ingest_module._executor_kind(None, _blocks(1), 0) is None  # always a cluster
    assert ingest_module._executor_kind(None, _blocks(50000), 100000) == IN_PROCESS
    # The environment does not change the choice: only the argument does.
    monkeypatch.setenv("NOWCAST_INGEST_IN_PROCESS_MAX_FRAMES", "0")
    assert ingest_module._executor_kind(None, _blocks(1)) == IN_PROCESS


def test_ingest_without_scheduler_follows_the_rule(tmp_path, monkeypatch):
    chosen = []
    real = ingest_module.task_executor

    @contextmanager
    def recording(scheduler=None, n_workers=None):
        chosen.append(scheduler)
        with real(IN_PROCESS if scheduler is None else scheduler, n_workers) as tasks:
            yield tasks  # never a real cluster in this test

    monkeypatch.setattr(ingest_module, "task_executor", recording)
    cat = synthetic_catalog(n_frames=30)
    ingest("synthetic", str(tmp_path / "a"), catalog=cat, progress=False, in_process_max_frames=30)
    ingest("synthetic", str(tmp_path / "b"), catalog=cat, progress=False, in_process_max_frames=29)
    assert chosen == [IN_PROCESS, None]
    a, b = (open_cube(str(tmp_path / d / "synthetic.zarr")) for d in "ab")
    np.testing.assert_array_equal(a["rain_rate"].values, b["rain_rate"].values)


def test_failed_in_process_block_leaves_a_resumable_store(tmp_path, monkeypatch):
    """A block that fails in the thread pool stops the run, the blocks written before are
    kept in the partial store, and the rerun writes only the missing ones."""
    cat = synthetic_catalog(n_frames=30)
    real = ingest_module._write_block
    calls = []

    def failing(block, *args):
        calls.append(block.index)
        if block.index == 3:
            raise OSError("disk went away")
        return real(block, *args)

    monkeypatch.setattr(ingest_module, "_write_block", failing)
    kwargs = dict(catalog=cat, scheduler=IN_PROCESS, progress=False)
    with pytest.raises(OSError, match="disk went away"):
        ingest("synthetic", str(tmp_path), **kwargs)
    assert not (tmp_path / "synthetic.zarr").exists()
    written = len(list((tmp_path / "synthetic.zarr.partial" / "blocks").glob("*.json")))
    monkeypatch.setattr(ingest_module, "_write_block", real)
    result = ingest("synthetic", str(tmp_path), **kwargs)
    assert result.blocks_resumed == written and result.blocks_total == 5
    assert result.n_read == 30
