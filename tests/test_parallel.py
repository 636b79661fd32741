"""The task executors and the bounded task loop the stages share."""

from __future__ import annotations

import concurrent.futures as cf
import threading

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
