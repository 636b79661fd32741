"""The task executors and the bounded task loop the stages share."""

from __future__ import annotations

import concurrent.futures as cf
import io
import threading
import time

import pytest

from nowcast.parallel import IN_PROCESS, bounded_results, task_executor


class CountingExecutor(cf.ThreadPoolExecutor):
    """A thread pool that records the most tasks submitted and not yet taken back."""

    def __init__(self, n_threads: int):
        super().__init__(n_threads)
        self.outstanding = 0
        self.most = 0
        self.lock = threading.Lock()

    def submit(self, fn, *args, **kwargs):
        with self.lock:
            self.outstanding += 1
            self.most = max(self.most, self.outstanding)
        return super().submit(fn, *args, **kwargs)

    def taken(self) -> None:
        with self.lock:
            self.outstanding -= 1


def test_bounded_results_keeps_at_most_in_flight_tasks_and_returns_every_item():
    with CountingExecutor(3) as executor:
        seen = {}
        for item, result in bounded_results(executor, pow, range(50), 2, in_flight=4):
            executor.taken()
            seen[item] = result
    assert seen == {i: i**2 for i in range(50)}
    assert executor.most == 4


def test_bounded_results_raises_a_task_error():
    def task(item):
        if item == 5:
            raise ValueError("bad item 5")
        return item

    with cf.ThreadPoolExecutor(2) as executor:
        with pytest.raises(ValueError, match="bad item 5"):
            list(bounded_results(executor, task, range(20), in_flight=2))


@pytest.mark.parametrize("scheduler", [IN_PROCESS, "threads"])
def test_task_executor_runs_tasks_and_shares_objects(scheduler):
    with task_executor(scheduler, n_workers=2) as tasks:
        assert tasks.n_threads == 2
        shared = tasks.share([1, 2, 3])
        results = dict(bounded_results(tasks.executor, _total, range(4), shared, in_flight=2))
    assert results == {i: i + 6 for i in range(4)}


def _total(item, values):
    return item + sum(values)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_a_line_every_interval_not_a_redraw():
    """40 tasks finishing over about 2 s: a log gets a line per 0.5 s and the final one."""
    from nowcast.parallel import dask_client, progress_interval, show_progress

    log = io.StringIO()
    with dask_client("threads", n_workers=2) as client:
        futures = client.map(time.sleep, [0.1] * 40, pure=False)
        start = time.monotonic()
        show_progress(futures, stream=log, interval=0.5)
        elapsed = time.monotonic() - start
        assert all(f.done() for f in futures)  # it blocked until every task finished
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[-1].startswith("progress: 40/40 tasks (100%)")
    assert 2 <= len(lines) <= elapsed / 0.5 + 2
    assert progress_interval(log) >= 1.0  # the default for a log: seconds, not a redraw
    assert progress_interval(FakeTerminal()) < 1.0  # a terminal keeps its live bar


def test_a_local_cluster_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    import tempfile

    import dask.array as da

    from nowcast.parallel import dask_client

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with dask_client("processes", n_workers=1) as client:
        assert client.compute(da.ones((40, 40), chunks=10).sum()).result() == 1600
        assert list(temp.iterdir())  # the run's scratch space is there while it runs
    assert list(temp.iterdir()) == []
