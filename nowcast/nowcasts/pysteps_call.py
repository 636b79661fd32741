"""Calling a pysteps nowcast from inside a worker: quiet, and on a local Dask scheduler."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator

import dask

# stdout is process-global: concurrent redirects in threads could restore the wrong stream.
_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def pysteps_call(scheduler: str = "synchronous") -> Iterator[None]:
    """Run a pysteps nowcast (S-PROG, STEPS) in the block without its prints, on ``scheduler``.

    pysteps' S-PROG and STEPS advect (and STEPS draws its members) through ``dask.compute``.
    Inside a Dask task that would submit to the distributed cluster from within a task, which
    can deadlock a one-thread worker; the configured scheduler is consulted before the worker's
    client, so ``"synchronous"`` (or a local ``"threads"`` pool) runs the same functions here.
    Their per-call tables go to a discarded buffer, one caller at a time.

    Parameters
    ----------
    scheduler : str, optional
        Dask's local scheduler for the block, by default ``"synchronous"``.
    """
    with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
        previous = dask.config.get("scheduler", None)
        dask.config.set(scheduler=scheduler)
        try:
            yield
        finally:
            # Dask's config is global, not per thread: a client closed by another thread in the
            # meantime (an evaluation that failed while this task ran) has restored its own
            # setting, which must stay; putting ``previous`` back then would leave the
            # distributed scheduler configured with no client.
            if dask.config.get("scheduler", None) == scheduler:
                dask.config.set(scheduler=previous)
