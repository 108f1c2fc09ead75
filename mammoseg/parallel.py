"""The one parallel runner of the per-image stages (synth, ingest, validate, preprocess).

A process pool with a progress bar, results in job order. Workers are *spawned*, not forked: the
parent may hold thread pools (torch, BLAS, OpenMP) that a fork copies in a locked state, and a
spawned worker starts from a clean interpreter whatever the caller imported before. What a worker
logs travels back through a queue to the parent's own handlers (rich on a terminal, plain lines in
a pipe), so a warning about an image reads the same whichever process met it.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

Job = TypeVar("Job")
Result = TypeVar("Result")


def _start_worker(records: multiprocessing.Queue, levels: dict[str, int],
                  initializer: Callable[[], None] | None) -> None:
    """Send this worker's log records to the parent; copy its logger levels; run the caller's set-up."""
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(records)]
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)
    if initializer is not None:
        initializer()


def _logger_levels() -> dict[str, int]:
    """The root's level and every configured logger's (the CLI quiets a few chatty libraries)."""
    levels = {"": logging.getLogger().level}
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def cpu_count() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or `taskset`'s limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_jobs(function: Callable[[Job], Result], jobs: Iterable[Job], workers: int, desc: str,
             unit: str = "image", initializer: Callable[[], None] | None = None) -> Iterator[Result]:
    """Yield `function(job)` for every job, in job order, with a progress bar.

    `workers` 0 means one per CPU core this process may use (`cpu_count`). Runs in this process
    when `workers` or the number of jobs is 1 (no start-up cost, and a debugger sees the work),
    otherwise in a pool of `min(workers, jobs)` spawned processes. The
    first error stops the run: jobs not yet started are cancelled and the error is raised here, as it
    is when the caller stops iterating early.

    Args:
        function: a module-level function of one job (both are pickled to reach a worker).
        jobs: the work items.
        workers: processes to use; 0 = one per CPU core, 1 = this process.
        desc: the progress bar's label.
        unit: what one job is, for the progress bar.
        initializer: called once in each worker before its first job (not used inline).

    Yields:
        The results, in the order of `jobs`.
    """
    if workers < 0:
        raise ValueError(f"workers {workers}: must be >= 0 (0 = one per CPU core)")
    jobs = list(jobs)
    workers = min(workers or cpu_count(), len(jobs))
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=None) as progress:
        if workers <= 1:
            for job in jobs:
                yield function(job)
                progress.update()
            return
        context = multiprocessing.get_context("spawn")
        records = context.Queue()
        listener = logging.handlers.QueueListener(records, *logging.getLogger().handlers,
                                                  respect_handler_level=True)
        listener.start()
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                   initargs=(records, _logger_levels(), initializer))
        try:
            for result in pool.map(function, jobs):
                yield result
                progress.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            listener.stop()
