"""Run a numpy computation over blocks of rows on one thread per CPU, each with one BLAS thread.

Many matrix products split across BLAS threads wait for each other at the end of every product; on a
machine whose CPUs are busy with other work, a thread that is not scheduled stalls all of them (the OOD
kNN of 20,000 cells ran 2.5x slower with two BLAS threads than with one on two busy CPUs). Blocks handed
to threads of our own, each product on one BLAS thread, never wait on each other, and use every CPU on
an idle machine: scikit-learn's ``kneighbors`` works the same way. numpy releases the GIL in the
products and reductions that dominate, and a block's result does not depend on the thread that made it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


def available_cpus() -> int:
    """Return the CPUs this process may run on (its affinity where the platform says, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def map_row_blocks(work: Callable[[int, int], None], n_rows: int, block_rows: int) -> None:
    """Call ``work(start, stop)`` for each block of ``block_rows`` rows of ``n_rows``, on threads.

    ``work`` writes its block's result into an array of the caller (blocks never overlap). An error in
    any block is raised here. A single block runs here, as it is: no threads to start, and no BLAS limit
    to set (a few milliseconds each, once torch is loaded, for the many small calls of a benchmark).
    """
    starts = range(0, n_rows, block_rows)
    if len(starts) <= 1:
        for start in starts:
            work(start, n_rows)
        return
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    workers = max(1, min(len(starts), available_cpus()))
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda start: work(start, min(start + block_rows, n_rows)), starts))
