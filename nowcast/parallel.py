"""Dask cluster handling shared by the stages.

By default a stage starts a ``LocalCluster`` with one single-threaded worker process per core
(HDF5 and netCDF decoders hold a global lock, so threads would serialise them). ``scheduler``
may instead be the address of an existing cluster (``tcp://host:8786``) to scale out, or
``"threads"`` for an in-process cluster (tests, notebooks).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

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
    cluster = LocalCluster(
        n_workers=n_workers or default_n_workers(),
        threads_per_worker=1,
        processes=scheduler != "threads",
        dashboard_address=":0",
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
