"""Dask cluster handling shared by the stages, and the executor of a stage's tasks.

By default a stage starts a ``LocalCluster`` with one single-threaded worker process per core
(HDF5 and netCDF decoders hold a global lock, so threads would serialise them). ``scheduler``
may instead be the address of an existing cluster (``tcp://host:8786``) to scale out, or
``"threads"`` for an in-process cluster (tests, notebooks).

:func:`task_executor` hands a stage a :class:`concurrent.futures.Executor` instead of a client:
a thread pool of this process (``scheduler="in-process"``: no cluster to start, which is most
of a small job's time) or the executor of a distributed client (:meth:`Client.get_executor`).
The stage's task loop (:func:`bounded_results`) is then one code path for both.

A local cluster never spills to disk (``distributed.worker.memory.target/spill: False``): the
stages keep their working set bounded instead, and a spilled archive would fill the disk. Its
workers' scratch space lives in a directory of this run, ``<tmp>/nowcast-dask-scratch-<uid>/
run-<pid>-<id>``, removed when the cluster closes; directories of runs whose process is gone
(killed) are removed when the next cluster starts. distributed itself only purges stale worker
directories inside the one ``local_directory`` a new worker uses, and never the directory
itself, so the run directories are ours to clean.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask
from distributed import Client, LocalCluster, as_completed, futures_of, get_client

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: ``scheduler`` value of :func:`task_executor` for a thread pool of this process.
IN_PROCESS = "in-process"
#: Seconds between redraws of a live progress bar on a terminal.
TERMINAL_PROGRESS_INTERVAL = 0.1
#: Seconds between progress lines when the output is not a terminal (a log file, CI): each
#: update there is a new line, so a live bar's redraws would flood the log.
LOG_PROGRESS_INTERVAL = 5.0


def default_n_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None):
    """Yield a :class:`distributed.Client`, creating (and closing) a cluster if needed.

    Parameters
    ----------
    scheduler : str, optional
        ``None`` or ``"processes"`` for a local process cluster, ``"threads"`` for an
        in-process cluster, or a scheduler address. An already active client is reused when
        ``scheduler`` is None (``"processes"`` always starts a new cluster).
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
        active = active_client()
        if active is not None:
            yield active
            return
    # distributed's nannies set OMP_NUM_THREADS=1 (and friends) in *this* process's environment
    # before spawning workers; restore it so later stages (training) keep their threads.
    saved = {key: os.environ.get(key) for key in _THREAD_VARIABLES}
    scratch = run_scratch_directory()
    try:
        # Workers of a process cluster get this config from their nanny at start. The scheduler
        # and nannies put their work space in distributed's temporary directory, which is
        # pointed into this run's scratch directory too, so nothing is left in the temp folder.
        with dask.config.set({**NO_SPILL, "temporary-directory": str(scratch)}):
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
        try:
            scratch.parent.rmdir()  # the per-user root, unless another run still uses it
        except OSError:
            pass


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
    path.mkdir(parents=True)  # parents: another run may just have removed the empty root
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def active_client() -> Client | None:
    """The Dask client this process already has (``Client(...)`` made earlier), or None."""
    try:
        return get_client()
    except ValueError:
        return None


@dataclass
class TaskExecutor:
    """Where a stage's tasks run.

    Attributes
    ----------
    executor : concurrent.futures.Executor
        A thread pool of this process, or a distributed client's executor.
    n_threads : int
        Worker threads in all (sizes how many tasks to keep in flight).
    share : callable
        ``share(obj)`` returns what to pass to every task instead of ``obj``: ``obj`` itself
        in-process, a future of ``obj`` already on every worker on a cluster (sent once).
    """

    executor: cf.Executor
    n_threads: int
    share: Callable[[object], object]


@contextmanager
def task_executor(scheduler: str | None = None, n_workers: int | None = None):
    """Yield a :class:`TaskExecutor`, starting (and closing) what it needs.

    Parameters
    ----------
    scheduler : str, optional
        ``"in-process"`` for a thread pool of this process; anything else as for
        :func:`dask_client` (None: an active client, else a new local process cluster).
    n_workers : int, optional
        Threads of the pool, or workers of a new local cluster; default one per core.
    """
    if scheduler == IN_PROCESS:
        n_threads = n_workers or default_n_workers()
        pool = cf.ThreadPoolExecutor(n_threads, thread_name_prefix="nowcast-task")
        try:
            yield TaskExecutor(pool, n_threads, lambda obj: obj)
        finally:
            # After an error, queued tasks are dropped; running ones finish their block.
            pool.shutdown(wait=True, cancel_futures=True)
        return
    with dask_client(scheduler, n_workers) as client:
        executor = client.get_executor(pure=False)
        yield TaskExecutor(
            executor,
            sum(client.nthreads().values()),
            lambda obj: client.scatter(obj, broadcast=True),
        )


def bounded_results(
    executor: cf.Executor, fn: Callable, items: Iterable, *args, in_flight: int
) -> Iterator[tuple[object, object]]:
    """Run ``fn(item, *args)`` for every item; yield ``(item, result)`` as each one finishes.

    At most ``in_flight`` tasks are submitted at a time and a finished future is dropped as
    soon as its result is taken, so neither the workers nor the scheduler ever hold more than
    a few results, however many items there are. A task's exception is raised here.
    """
    queue = iter(items)
    pending: dict[cf.Future, object] = {}

    def submit(item) -> None:
        pending[executor.submit(fn, item, *args)] = item

    for item in itertools.islice(queue, max(1, in_flight)):
        submit(item)
    while pending:
        finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        while finished:
            future = finished.pop()
            item, result = pending.pop(future), future.result()
            del future  # the last reference: a distributed future releases its result now
            yield item, result
            for nxt in itertools.islice(queue, 1):
                submit(nxt)


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (not a file, pipe or captured stream)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_interval(stream) -> float:
    """Seconds between progress updates written to ``stream`` (e.g. tqdm's ``mininterval``).

    :data:`TERMINAL_PROGRESS_INTERVAL` for a live bar on a terminal, else
    :data:`LOG_PROGRESS_INTERVAL`: in a log every update is a line.
    """
    return TERMINAL_PROGRESS_INTERVAL if is_terminal(stream) else LOG_PROGRESS_INTERVAL


def show_progress(futures, stream=None, interval: float | None = None) -> None:
    """Block until ``futures`` (a future or a list of them) are finished, showing progress.

    On a terminal, distributed's live text bar. Otherwise (a log file, CI) one line
    ``progress: done/total tasks (percent) after seconds`` at most every ``interval`` seconds
    and when the last task finishes, instead of a redraw per bar interval. A task's error is
    not raised here: the caller's ``gather`` or ``result`` raises it.

    Parameters
    ----------
    futures : distributed.Future or list of them
        The tasks to wait for.
    stream : file-like, optional
        Where progress goes, by default ``sys.stdout``.
    interval : float, optional
        Seconds between progress lines in a log, by default :data:`LOG_PROGRESS_INTERVAL`.
    """
    stream = sys.stdout if stream is None else stream
    if is_terminal(stream):
        _live_bar(futures)
        return
    interval = LOG_PROGRESS_INTERVAL if interval is None else interval
    pending = futures_of(futures)
    start = last = time.monotonic()
    for n_done, _ in enumerate(as_completed(pending), start=1):
        now = time.monotonic()
        if now - last >= interval or n_done == len(pending):
            share = 100 * n_done // len(pending)
            line = f"progress: {n_done}/{len(pending)} tasks ({share}%) after {now - start:.0f} s"
            print(line, file=stream, flush=True)
            last = now


def _live_bar(futures) -> None:
    """distributed's text progress bar on ``sys.stdout``, redrawn every bar interval.

    The bar is fed by a scheduler coroutine that writes every interval and only stops when its
    write fails. Closing the cluster right after the bar ends cancels that coroutine mid-sleep,
    and distributed logs the cancellation as an ERROR with a traceback; waiting a little over
    two intervals lets it find the closed connection and stop quietly.
    """
    from distributed import progress

    progress(futures, interval=f"{round(TERMINAL_PROGRESS_INTERVAL * 1000)}ms")
    time.sleep(2.5 * TERMINAL_PROGRESS_INTERVAL)
