"""Peak resident memory of a whole process tree, sampled while a command runs.

Stages start Dask clusters, so the memory a stage needs is that of the stage process plus its
worker processes (and their nannies). :func:`run_measured` starts a command, samples the RSS of
the process and all its descendants with psutil every ``interval`` seconds from a thread, and
returns the peak of the sum. The sum counts pages shared between processes (shared libraries,
copy-on-write) once per process, so it is an upper bound of the physical memory used; it is the
number an out-of-memory killer or a batch system's memory limit looks at.

:class:`TreeSampler` can also watch processes that are not children of the command (the
``dask worker`` processes of an external cluster) by passing their pids as ``extra_roots``.
"""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import psutil

#: Sampling period (seconds): short enough to catch a worker's transient peak.
INTERVAL_S = 0.05


def _tree(roots: list[psutil.Process]) -> dict[int, psutil.Process]:
    """``roots`` and all their live descendants by pid, each process once."""
    seen: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for process in [root, *root.children(recursive=True)]:
                seen.setdefault(process.pid, process)
        except psutil.Error:  # the root ended between two samples
            continue
    return seen


def tree_rss(roots: list[psutil.Process]) -> int:
    """Summed RSS (bytes) of ``roots`` and all their descendants, each process counted once."""
    total = 0
    for process in _tree(roots).values():
        try:
            total += process.memory_info().rss
        except psutil.Error:  # a child exited while we summed
            continue
    return total


class TreeSampler:
    """Peak summed RSS and CPU seconds of process trees, sampled from a background thread.

    Parameters
    ----------
    roots : dict of str to int
        Label -> pid of the root of each tree to watch (``{"stage": pid, "worker": pid}``).
    interval : float
        Seconds between samples.

    Notes
    -----
    CPU seconds are user + system time used while sampling: for a process that already existed
    at the first sample, the increase since then; for a later one, all of it. The last
    ``interval`` of a process that exits is missed.
    """

    def __init__(self, roots: dict[str, int], interval: float = INTERVAL_S):
        self.roots = {label: psutil.Process(pid) for label, pid in roots.items()}
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._label: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, first: bool) -> None:
        total = 0
        for label, root in self.roots.items():
            for pid, process in _tree([root]).items():
                try:
                    with process.oneshot():
                        total += process.memory_info().rss
                        times = process.cpu_times()
                except psutil.Error:
                    continue
                self._label.setdefault(pid, label)
                self._cpu_first.setdefault(pid, times.user + times.system if first else 0.0)
                self._cpu_last[pid] = times.user + times.system
        self.peak = max(self.peak, total)
        self.samples += 1

    def _run(self) -> None:
        self._sample(first=True)
        while not self._stop.wait(self.interval):
            self._sample(first=False)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used while sampling, per root label."""
        used = dict.fromkeys(self.roots, 0.0)
        for pid, last in self._cpu_last.items():
            used[self._label[pid]] += last - self._cpu_first[pid]
        return used

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measured:
    """What :func:`run_measured` saw: exit status, wall time, peak tree RSS, CPU and output."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    samples: int
    cpu_s: dict[str, float]
    stdout: str
    stderr: str


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill a command we started and the processes it started (a local Dask cluster)."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            continue
    process.kill()


def run_measured(
    argv: list[str],
    env: dict | None = None,
    extra: dict[str, int] | None = None,
    timeout: float | None = None,
    cwd: str | None = None,
) -> Measured:
    """Run ``argv`` to completion and measure its process tree.

    Parameters
    ----------
    argv : list of str
        Command and arguments.
    env : dict, optional
        Environment of the command (default: inherited).
    extra : dict of str to int, optional
        Other process trees counted in the peak and the CPU time, by label (e.g. the scheduler
        and workers of an external Dask cluster).
    timeout : float, optional
        Seconds after which the command (and its children) is killed and
        ``subprocess.TimeoutExpired`` raised.
    cwd : str, optional
        Working directory of the command.

    Returns
    -------
    Measured
        ``cpu_s`` has the label ``"command"`` for the command's own tree and those of ``extra``.
    """
    start = time.perf_counter()
    process = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with TreeSampler({"command": process.pid, **(extra or {})}) as sampler:
            stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        process.communicate()
        raise
    return Measured(
        returncode=process.returncode,
        wall_s=time.perf_counter() - start,
        peak_rss_bytes=sampler.peak,
        samples=sampler.samples,
        cpu_s=sampler.cpu_seconds(),
        stdout=stdout,
        stderr=stderr,
    )
