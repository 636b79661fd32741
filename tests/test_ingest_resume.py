"""Ingest at archive scale: resume after a crash, the lock, the schema version, disk space."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_catalog

import nowcast.sources.ingest as ingest_module
import nowcast.storage as storage_module
from nowcast.config import ConfigError
from nowcast.sources.catalog import Catalog, list_frames
from nowcast.sources.cube import CUBE_SCHEMA_VERSION, open_cube
from nowcast.sources.ingest import ingest
from nowcast.storage import EMPTY_LOCK_STALE_SECONDS, DiskWriteError, StoreLockedError

# Frames 12..17 are one whole time chunk of gaps: no rain_rate chunk is stored for it, so only
# the block records can tell a resumed run that it is done.
GAP_BLOCK = [f"2000-01-01T02:{m:02d}" for m in range(0, 60, 10)]
KW = dict(scheduler="threads", progress=False)


def _catalog(**kwargs) -> Catalog:
    return synthetic_catalog(n_frames=40, drop_times=GAP_BLOCK, **kwargs)


def _chunk_files(cube: str) -> dict[str, bytes]:
    """Every stored chunk of every array, by key: the cube's bytes."""
    root = Path(cube)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "/c/" in f"/{p.relative_to(root)}"
    }


def _crash_after(monkeypatch, n_writes: int) -> None:
    real = ingest_module.write_frames
    calls = []

    def write_then_crash(path, start, frames):
        calls.append(start)
        if len(calls) > n_writes:
            raise RuntimeError("simulated crash")
        real(path, start, frames)

    monkeypatch.setattr(ingest_module, "write_frames", write_then_crash)


def test_resume_after_crash_equals_clean_ingest(tmp_path, monkeypatch, capsys):
    cat = _catalog()
    clean = ingest("synthetic", str(tmp_path / "clean"), catalog=cat, **KW)

    _crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest("synthetic", str(tmp_path / "out"), catalog=cat, **KW)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert not (out / "synthetic.zarr").exists()  # no cube that looks complete
    assert not (out / "synthetic.zarr.lock").exists()  # released on the error
    records = list((out / "synthetic.zarr.partial" / "blocks").glob("*.json"))
    assert 1 <= len(records) <= 3

    capsys.readouterr()
    resumed = ingest("synthetic", str(out), catalog=cat, **KW)
    assert resumed.blocks_total == 7
    assert resumed.blocks_resumed == len(records)
    assert f"{len(records)} of 7 blocks already written" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["synthetic.zarr"]

    a, b = open_cube(resumed.path), open_cube(clean.path)
    np.testing.assert_array_equal(a.rain_rate.values, b.rain_rate.values)
    np.testing.assert_array_equal(a.frame_valid.values, b.frame_valid.values)
    assert not a.frame_valid.values[12:18].any() and np.isnan(a.rain_rate.values[12:18]).all()
    assert _chunk_files(resumed.path) == _chunk_files(clean.path)  # bit for bit


def test_partial_store_of_another_digest_is_redone(tmp_path, monkeypatch):
    _crash_after(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        ingest("synthetic", str(tmp_path), catalog=_catalog(seed=1), **KW)
    monkeypatch.undo()
    other = _catalog(seed=2)
    result = ingest("synthetic", str(tmp_path), catalog=other, **KW)
    assert result.blocks_resumed == 0
    clean = ingest("synthetic", str(tmp_path / "clean"), catalog=other, **KW)
    assert _chunk_files(result.path) == _chunk_files(clean.path)


def test_second_ingest_while_locked_fails_with_the_holder(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = tmp_path / "synthetic.zarr.lock"
        lock.write_text(f'{{"host": "{socket.gethostname()}", "pid": {holder.pid}}}')
        with pytest.raises(StoreLockedError) as err:
            ingest("synthetic", str(tmp_path), catalog=_catalog(), **KW)
        message = str(err.value)
        assert str(lock) in message and f"pid {holder.pid}" in message and "\n" not in message
        assert lock.exists()  # not ours to remove
        assert not (tmp_path / "synthetic.zarr").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / "synthetic.zarr.lock"
    lock.write_text(f'{{"host": "{socket.gethostname()}", "pid": {dead.pid}}}')
    result = ingest("synthetic", str(tmp_path), catalog=_catalog(), **KW)
    assert result.n_times == 40 and not lock.exists()
    assert f"pid {dead.pid}, is gone" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\x00garbage"])
def test_an_empty_or_unreadable_lock_is_stale_only_after_a_grace_period(tmp_path, content):
    lock = tmp_path / "synthetic.zarr.lock"
    lock.write_bytes(content)  # its writer died between creating and writing it, or is writing
    with pytest.raises(StoreLockedError, match="names no holder"):
        ingest("synthetic", str(tmp_path), catalog=_catalog(), **KW)
    assert lock.read_bytes() == content
    old = time.time() - EMPTY_LOCK_STALE_SECONDS - 1
    os.utime(lock, (old, old))
    result = ingest("synthetic", str(tmp_path), catalog=_catalog(), **KW)
    assert result.n_times == 40 and not lock.exists()


def test_schema_version_is_part_of_the_digest(tmp_path, monkeypatch):
    cat = _catalog()
    monkeypatch.setattr(ingest_module, "CUBE_SCHEMA_VERSION", CUBE_SCHEMA_VERSION - 1)
    old = ingest("synthetic", str(tmp_path), catalog=cat, **KW)
    assert open_cube(old.path).attrs["cube_schema_version"] == CUBE_SCHEMA_VERSION - 1
    monkeypatch.undo()
    again = ingest("synthetic", str(tmp_path), catalog=cat, **KW)
    assert not again.up_to_date  # an older ingest's cube is rebuilt
    assert open_cube(again.path).attrs["cube_schema_version"] == CUBE_SCHEMA_VERSION
    assert ingest("synthetic", str(tmp_path), catalog=cat, **KW).up_to_date


Usage = namedtuple("Usage", "total used free")


def test_free_space_guard_stops_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**6, 10**6 - 4096, 4096))
    with pytest.raises(DiskWriteError) as err:
        ingest("synthetic", str(tmp_path), catalog=_catalog(), **KW)
    message = str(err.value)
    assert "not enough free disk space" in message and "estimated" in message
    assert "4.0 KiB free" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing written, lock released

    line = capsys.readouterr().out.splitlines()[0]
    assert "40 frames in 1 segment(s)" in line and "gap share 15.0%" in line
    assert "estimated" in line


def test_estimate_is_close_to_the_written_size(tmp_path, monkeypatch):
    result = ingest("synthetic", str(tmp_path), catalog=_catalog(), **KW)
    stored = sum(len(v) for k, v in _chunk_files(result.path).items() if "rain_rate" in k)
    assert 0.5 * stored < result.estimated_bytes < 2 * stored


def test_fsspec_destination_only_prints_the_estimate(monkeypatch, capsys):
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(1, 1, 0))
    url = "memory://nowcast-resume-test/cubes"
    result = ingest("synthetic", url, catalog=_catalog(), **KW)
    assert open_cube(result.path).sizes["time"] == 40
    assert "estimated" in capsys.readouterr().out


def test_local_cluster_does_not_spill_and_cleans_its_scratch(tmp_path, monkeypatch):
    import tempfile

    from nowcast.parallel import dask_client, scratch_root

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    leftover = scratch_root() / "run-999999999-deadbeef"  # a killed run's (no such pid)
    leftover.mkdir(parents=True)

    def memory_settings(dask_worker):
        manager = dask_worker.memory_manager
        return manager.memory_target_fraction, manager.memory_spill_fraction

    with dask_client("threads", n_workers=1) as client:
        assert set(client.run(memory_settings).values()) == {(False, False)}
        assert not leftover.exists()
        (run_dir,) = scratch_root().iterdir()
        assert run_dir.name.startswith(f"run-{os.getpid()}-")
    assert not scratch_root().exists()  # the run's folder, and the emptied per-user one


def test_a_run_that_fails_leaves_no_empty_folder(tmp_path):
    cube_dir = tmp_path / "new" / "cubes"
    with pytest.raises(ConfigError, match="before start"):
        ingest(
            "synthetic",
            str(cube_dir),
            catalog=_catalog(),
            start="2020-10-31T10:00",
            end="2020-10-31T09:00",
            **KW,
        )
    assert list(tmp_path.iterdir()) == []
    # The folders a successful run made stay, with the cube in them.
    result = ingest("synthetic", str(cube_dir), catalog=_catalog(), **KW)
    assert Path(result.path).parent == cube_dir and not (cube_dir / "synthetic.zarr.lock").exists()


class _KilledBetweenRenames(BaseException):
    """Stands for a kill: nothing after the first rename of the swap runs."""


def test_a_kill_between_the_renames_of_an_append_keeps_every_frame(tmp_path, monkeypatch):
    """Where the filesystem cannot exchange two folders atomically (the Linux path is in
    tests/test_faults.py), the next run puts the old cube back."""
    catalog = synthetic_catalog(n_frames=40)
    times = [frame.time for frame in list_frames(catalog["synthetic"])]
    first = ingest("synthetic", str(tmp_path), catalog=catalog, end=times[23], **KW)
    assert open_cube(first.path).sizes["time"] == 24
    real_replace, renames = os.replace, []

    def replace_then_die(src, dst):
        if renames and str(renames[-1][1]).endswith(".old"):  # the new store would move in now
            raise _KilledBetweenRenames
        renames.append((src, dst))
        real_replace(src, dst)

    # The archive has moved on: the old frames' files are no longer in the source's range, so
    # only the cube still holds them.
    window = {"start": times[24].isoformat(), "end": times[-1].isoformat()}
    source = catalog["synthetic"].model_copy(update=window)
    archive = Catalog(sources={"synthetic": source})
    # A filesystem without an atomic exchange: the swap takes two renames.
    monkeypatch.setattr(storage_module, "exchange", lambda first, second: False)
    monkeypatch.setattr(storage_module.os, "replace", replace_then_die)
    with pytest.raises(_KilledBetweenRenames):
        ingest("synthetic", str(tmp_path), catalog=archive, append=True, **KW)
    monkeypatch.setattr(storage_module.os, "replace", real_replace)
    assert not Path(first.path).exists()  # the old cube is aside, under a temporary name

    again = ingest("synthetic", str(tmp_path), catalog=archive, append=True, **KW)
    reference = ingest("synthetic", str(tmp_path / "ref"), catalog=catalog, **KW)
    cube, expected = open_cube(again.path), open_cube(reference.path)
    assert cube.sizes["time"] == 40
    np.testing.assert_array_equal(cube.rain_rate.values, expected.rain_rate.values)
    assert not list(tmp_path.glob("synthetic.zarr.tmp-*"))
