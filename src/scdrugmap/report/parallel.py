"""Draw a report's figures on two CPUs: figures of the job results in a worker process, the others here.

matplotlib draws in Python, on one CPU: a report's figures, in four formats, are most of its time.
`FigureDrawing` starts one worker process that reads the run itself and draws, group by group,
the figures of the job results and the embedding samples (`FigureGroup.reads_predictions`
False) in every format asked for, while this process reads the per-cell predictions, computes
the statistics and tables, and draws the figures made from them; the worker sends back the
files' bytes. The worker never reads the predictions, so a full-size run's largest table is not
held twice. The worker is handed one group at a time (the next when it sends one back: a process
pool queues submitted tasks ahead, where they can no longer be cancelled), and when this process
is done first it draws the groups the worker has not been handed, from the last, so neither process
waits for the other longer than one group.

The worker is spawned, not forked: the report process may already run threads (pyarrow's, BLAS's),
which a fork does not carry safely. A worker that cannot start or dies leaves its figures to be
drawn here, as with one CPU.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from scdrugmap.evaluate.projection import Projection
    from scdrugmap.report.figures import FigureGroup, ReportFigure
    from scdrugmap.report.run import RunData

log = logging.getLogger(__name__)

#: The worker process's figure groups by name, set once by `_start_worker` (one run per worker).
_WORKER_GROUPS: dict[str, FigureGroup] = {}


def _start_worker(run_dir: Path, projection: Projection, seed: int | None) -> None:
    """Read the run in the worker and keep its figure groups of the job results (the pool's initializer)."""
    from scdrugmap.startup import imports_settled

    with imports_settled():  # a fresh process: its imports are never scanned by the collector again
        from scdrugmap.report.figures import figure_groups
        from scdrugmap.report.run import read_run_data

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # its INFO lines per embedded font
    run = read_run_data(run_dir)
    _WORKER_GROUPS.update((group.name, group) for group in figure_groups(run, projection=projection, seed=seed)
                          if not group.reads_predictions)


def _ready() -> None:
    """Nothing: submitted first, so the worker starts (and reads the run) while this process does."""


def draw_in_worker(name: str, formats: Sequence[str]) -> list[ReportFigure]:
    """Draw one group of the worker's run in ``formats``; return its figures holding the files only."""
    return [figure.drawn(formats) for figure in _WORKER_GROUPS[name].draw()]


class FigureDrawing:
    """The figures of one report, drawn here or partly in a worker (``jobs`` > 1); a context manager.

    Parameters
    ----------
    run_dir
        The run folder (read again by the worker).
    formats
        Every format the report saves (the HTML page's PNG included).
    projection, seed
        As `scdrugmap.report.figures.figure_groups`.
    jobs
        Processes that draw: 1 draws everything here; 2 or more starts one worker.
    """

    def __init__(self, run_dir: Path, formats: Sequence[str], *, projection: Projection, seed: int | None,
                 jobs: int) -> None:
        import threading

        self.formats, self.projection, self.seed = list(formats), projection, seed
        self._pool: ProcessPoolExecutor | None = None
        self._groups: list[FigureGroup] = []
        self._waiting: list[str] = []  # the worker's groups not handed to it yet, in report order
        self._there: dict[str, Future[list[ReportFigure]]] = {}
        self._lock = threading.Lock()  # `_waiting` and `_there` change in the pool's thread too (`_hand_next`)
        self._broken = False
        if jobs > 1 and self.formats:
            import multiprocessing

            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(run_dir, projection, seed))
            self._pool.submit(_ready)  # the pool starts its worker on the first task

    def __enter__(self) -> FigureDrawing:
        return self

    def __exit__(self, *_: object) -> None:
        if self._pool is not None:
            with self._lock:
                self._waiting.clear()  # nothing more is handed out
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, run: RunData) -> None:
        """Hand the worker its groups of ``run``'s figures, one at a time in report order (nothing without a worker)."""
        from scdrugmap.report.figures import figure_groups

        self._groups = figure_groups(run, projection=self.projection, seed=self.seed)
        if self._pool is not None:
            with self._lock:
                self._waiting = [group.name for group in self._groups if not group.reads_predictions]
            self._hand_next()

    def _hand_next(self, _done: Future[list[ReportFigure]] | None = None) -> None:
        """Hand the worker its next waiting group (called again when that one is done)."""
        with self._lock:
            if not self._waiting or self._pool is None:
                return
            name = self._waiting.pop(0)
            try:
                future = self._pool.submit(draw_in_worker, name, self.formats)
            except (RuntimeError, BrokenProcessPool):  # shut down or broken: the group is drawn here
                self._waiting.insert(0, name)
                return
            self._there[name] = future
        future.add_done_callback(self._hand_next)

    def _take_waiting(self) -> str | None:
        """Return the last group not handed to the worker, now this process's to draw (None: all handed)."""
        with self._lock:
            return self._waiting.pop() if self._waiting else None

    def figures(self, run: RunData) -> list[ReportFigure]:
        """Return every figure in report order: drawn here (and saved), or by the worker."""
        from scdrugmap.report.figures import report_order

        if not self._groups:
            self.submit(run)
        with self._lock:
            worker_groups = set(self._waiting) | set(self._there)
        drawn: dict[str, list[ReportFigure]] = {group.name: self._draw(group) for group in self._groups
                                                if group.name not in worker_groups}
        while (name := self._take_waiting()) is not None:  # the worker's groups it has not started: drawn here
            drawn[name] = self._draw(self._group(name))
        with self._lock:
            handed = dict(self._there)
        for name, future in handed.items():
            drawn[name] = self._result(name, future)
        return report_order(run, [figure for group in self._groups for figure in drawn[group.name]])

    def _result(self, name: str, future: Future[list[ReportFigure]]) -> list[ReportFigure]:
        try:
            return future.result()
        except BrokenProcessPool as err:  # the worker died (killed, out of memory) or could not start
            if not self._broken:
                log.warning("the figure worker stopped (%s); drawing its figures here", err)
                self._broken = True
            return self._draw(self._group(name))

    def _group(self, name: str) -> FigureGroup:
        return next(group for group in self._groups if group.name == name)

    def _draw(self, group: FigureGroup) -> list[ReportFigure]:
        drawn = group.draw()
        for figure in drawn:  # saved now, while the worker draws its own
            for fmt in self.formats:
                figure.save(fmt)
        return drawn

