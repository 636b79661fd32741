"""A ``dask scheduler`` and ``dask worker`` processes on this machine, for the benchmarks.

Started as separate commands (not a ``LocalCluster``), so a stage connects to them as it would to
a real cluster, through ``scheduler="tcp://..."``; spilling to disk is disabled by the caller's
environment and each worker's scratch space is a folder of ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

WORKER_MEMORY = "4GiB"

#: Modules a worker imports in the warm-up, as it would have on a long-lived cluster.
WARM_MODULES = (
    "pysteps",
    "nowcast.sources.ingest",
    "nowcast.patches",
    "nowcast.advection.lagrangian",
)


class DaskProcesses:
    """A ``dask scheduler`` on 127.0.0.1 and ``dask worker`` processes we start and stop.

    Parameters
    ----------
    folder : Path
        Scheduler file, logs and the workers' ``--local-directory`` go here.
    env : dict
        Environment of the processes.
    """

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env = folder, env
        self.dask = str(Path(sys.executable).with_name("dask"))
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.address = ""
        folder.mkdir(parents=True, exist_ok=True)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [self.dask, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder
        )

    def start_scheduler(self, timeout: float = 60) -> str:
        """Start the scheduler on a free port; returns its ``tcp://127.0.0.1:PORT`` address."""
        file = self.folder / "scheduler.json"
        self.scheduler = self._start(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
            + ["--scheduler-file", str(file)],
        )
        deadline = time.monotonic() + timeout
        while not file.exists():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start; see {self.folder}")
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but let the writer close it
        self.address = json.loads(file.read_text())["address"]
        return self.address

    def add_worker(self) -> subprocess.Popen:
        """Start one more single-threaded worker process (no spilling, scratch in our folder)."""
        index = len(self.workers) + 1
        worker = self._start(
            f"worker{index}",
            ["worker", self.address, "--nthreads", "1", "--nworkers", "1"]
            + ["--memory-limit", WORKER_MEMORY, "--no-dashboard", "--name", f"w{index}"]
            + ["--local-directory", str(self.folder / f"worker{index}")],
        )
        self.workers.append(worker)
        return worker

    def pids(self) -> dict[str, int]:
        """Label -> pid of the scheduler and worker processes (for the tree sampler)."""
        pids = {"scheduler": self.scheduler.pid}
        pids.update({f"worker{i + 1}": w.pid for i, w in enumerate(self.workers)})
        return pids

    def close(self) -> None:
        """Terminate the workers, then the scheduler (kill any that does not stop in 30 s)."""
        for process in [*self.workers, self.scheduler]:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in [*self.workers, self.scheduler]:
            if process is None:
                continue
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_and_warm(address: str, n_workers: int) -> None:
    """Wait until ``n_workers`` are connected and have imported the stage modules."""
    from distributed import Client

    with Client(address, timeout="60s") as client:
        client.wait_for_workers(n_workers, timeout=120)
        # exec returns None: returning the modules would import them here as well.
        client.run(exec, "import " + ", ".join(WARM_MODULES))
