"""The per-image stages' one process-pool runner: order, errors, and worker logs reaching the parent."""

from __future__ import annotations

import logging
import os

import pytest

from mammoseg import parallel
from mammoseg.parallel import cpu_count, run_jobs

log = logging.getLogger(__name__)


def _square_and_warn(value: int) -> tuple[int, int]:
    """A job: its square, the process that computed it, and a warning naming the job."""
    log.warning("job %d in a worker", value)
    return value * value, os.getpid()


def _fail_on_three(value: int) -> int:
    if value == 3:
        raise ValueError("job 3 is broken")
    return value


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_back_in_job_order(workers):
    results = list(run_jobs(_square_and_warn, range(7), workers, "test"))
    assert [square for square, _ in results] == [value * value for value in range(7)]
    pids = {pid for _, pid in results}
    assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids)


def test_a_workers_log_records_reach_the_parents_handlers(caplog):
    # caplog's handler sits on the root logger of this (parent) process: a record logged in a
    # spawned worker gets there only through the runner's queue.
    with caplog.at_level(logging.WARNING):
        list(run_jobs(_square_and_warn, [4, 5], 2, "test"))
    assert sorted(r.getMessage() for r in caplog.records if r.name == __name__) == \
        ["job 4 in a worker", "job 5 in a worker"]


def test_a_workers_logger_levels_follow_the_parents(caplog):
    logging.getLogger(__name__).setLevel(logging.ERROR)
    try:
        with caplog.at_level(logging.WARNING):
            list(run_jobs(_square_and_warn, [4, 5], 2, "test"))
    finally:
        logging.getLogger(__name__).setLevel(logging.NOTSET)
    assert not [r for r in caplog.records if r.name == __name__]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_error_is_raised_and_stops_the_run(workers):
    seen = []
    with pytest.raises(ValueError, match="job 3 is broken"):
        for value in run_jobs(_fail_on_three, range(6), workers, "test"):
            seen.append(value)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("cores", [1, 2])
def test_zero_workers_means_one_per_core(monkeypatch, cores):
    # The stages pass their `workers: 0` default straight through: the runner alone decides what
    # 0 means, so the pool follows the cores this process may use.
    monkeypatch.setattr(parallel, "cpu_count", lambda: cores)
    pids = {pid for _, pid in run_jobs(_square_and_warn, range(6), 0, "test")}
    assert (pids == {os.getpid()}) if cores == 1 else (os.getpid() not in pids and 1 <= len(pids) <= cores)


def test_cpu_count_is_the_affinity_mask_not_the_machine():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no affinity mask on this platform")
    assert cpu_count() == len(os.sched_getaffinity(0))


def test_negative_workers_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        list(run_jobs(_square_and_warn, range(3), -1, "test"))
