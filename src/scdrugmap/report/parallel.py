"""Draw a report's figures on two CPUs: figures of the job results in a worker process, the others here.

matplotlib draws in Python, on one CPU: a report's figures, in four formats, are most of its time.
`FigureDrawing` starts one worker process that reads the run itself and draws, group by group,
the figures of the job results and the embedding samples (`FigureGroup.reads_predictions`
False) in every format asked for, while this process reads the per-cell predictions, computes
the statistics and tables, and draws the figures made from them; the worker sends back the
files' bytes. The worker never reads the predictions, so a full-size run's largest table is not
held twice. When this process is done first, it draws the groups the worker has not started
(their tasks are cancelled), so neither process waits for the other longer than one group.

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
        self.formats, self.projection, self.seed = list(formats), projection, seed
        self._pool: ProcessPoolExecutor | None = None
        self._groups: list[FigureGroup] = []
        self._there: dict[str, Future[list[ReportFigure]]] = {}
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
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, run: RunData) -> None:
        """Hand the worker its groups of ``run``'s figures, in report order (nothing without a worker)."""
        from scdrugmap.report.figures import figure_groups

        self._groups = figure_groups(run, projection=self.projection, seed=self.seed)
        if self._pool is not None:
            self._there = {group.name: self._pool.submit(draw_in_worker, group.name, self.formats)
                           for group in self._groups if not group.reads_predictions}

    def figures(self, run: RunData) -> list[ReportFigure]:
        """Return every figure in report order: drawn here (and saved), or by the worker."""
        from scdrugmap.report.figures import report_order

        if not self._groups:
            self.submit(run)
        drawn: dict[str, list[ReportFigure]] = {group.name: self._draw(group) for group in self._groups
                                                if group.name not in self._there}
        for name in reversed(list(self._there)):  # groups the worker has not started: drawn here instead
            if self._there[name].cancel():
                drawn[name] = self._draw(self._group(name))
        for name, future in self._there.items():
            if name not in drawn:
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

