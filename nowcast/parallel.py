"""Dask cluster handling shared by the stages.

By default a stage starts a ``LocalCluster`` with one single-threaded worker process per core
(HDF5 and netCDF decoders hold a global lock, so threads would serialise them). ``scheduler``
may instead be the address of an existing cluster (``tcp://host:8786``) to scale out, or
``"threads"`` for an in-process cluster (tests, notebooks).

A local cluster never spills to disk (``distributed.worker.memory.target/spill: False``): the
stages keep their working set bounded instead, and a spilled archive would fill the disk. Its
workers' scratch space lives in a directory of this run, ``<tmp>/nowcast-dask-scratch-<uid>/
run-<pid>-<id>``, removed when the cluster closes; directories of runs whose process is gone
(killed) are removed when the next cluster starts. distributed itself only purges stale worker
directories inside the one ``local_directory`` a new worker uses, and never the directory
itself, so the run directories are ours to clean.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import dask
from distributed import Client, LocalCluster

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def default_n_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None):
    """Yield a :class:`distributed.Client`, creating (and closing) a cluster if needed.

    Parameters
    ----------
    scheduler : str, optional
        ``None`` for a local process cluster, ``"threads"`` for an in-process cluster, or a
        scheduler address. An already active client is reused when ``scheduler`` is None.
    n_workers : int, optional
        Workers of a local cluster; default one per available core (at most 8).
    """
    if scheduler not in (None, "threads", "processes"):
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    if scheduler is None:
        active = _active_client()
        if active is not None:
            yield active
            return
    # distributed's nannies set OMP_NUM_THREADS=1 (and friends) in *this* process's environment
    # before spawning workers; restore it so later stages (training) keep their threads.
    saved = {key: os.environ.get(key) for key in _THREAD_VARIABLES}
    scratch = run_scratch_directory()
    try:
        # Workers of a process cluster get this config from their nanny at start.
        with dask.config.set(NO_SPILL):
            cluster = LocalCluster(
                n_workers=n_workers or default_n_workers(),
                threads_per_worker=1,
                processes=scheduler != "threads",
                dashboard_address=":0",
                local_directory=str(scratch),
            )
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


NO_SPILL = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}


def scratch_root() -> Path:
    """Parent of the per-run Dask scratch directories of this user."""
    return Path(tempfile.gettempdir()) / f"nowcast-dask-scratch-{os.getuid()}"


def run_scratch_directory() -> Path:
    """A fresh scratch directory for this run; leftovers of dead runs are removed first."""
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob("run-*"):
        pid = leftover.name.split("-")[1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    path = root / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _active_client() -> Client | None:
    from distributed import get_client

    try:
        return get_client()
    except ValueError:
        return None


def show_progress(futures) -> None:
    """Block on a text progress bar of ``futures`` (a future or a list of them).

    The bar is fed by a scheduler coroutine that writes every 100 ms and only stops when its
    write fails. Closing the cluster right after the bar ends cancels that coroutine mid-sleep,
    and distributed logs the cancellation as an ERROR with a traceback; waiting a little over
    two intervals lets it find the closed connection and stop quietly.
    """
    import time

    from distributed import progress

    progress(futures, interval="100ms")
    time.sleep(0.25)
