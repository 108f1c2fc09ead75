"""The per-image stages' one process-pool runner: order, errors, and worker logs reaching the parent."""

from __future__ import annotations

import logging
import os

import pytest

from mammoseg.parallel import run_jobs

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
