"""Draw a report's figures on two CPUs: those of the job results in a worker process, the others here.

matplotlib draws in Python, on one CPU: a report's figures, in four formats, are most of its time.
`FigureDrawing` starts one worker process that reads the run itself and draws the figures of the
job results and the embedding samples (`FigureGroup.reads_predictions` False) in every format
asked for, while this process reads the per-cell predictions, draws their figures and computes
the statistics and tables; the worker sends back the files' bytes. The worker never reads the
predictions, so a full-size run's largest table is not held twice.

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


def draw_results_figures(run_dir: Path, formats: Sequence[str], projection: Projection,
                         seed: int | None) -> dict[str, list[ReportFigure]]:
    """Draw the figures of a run's job results in ``formats``; return them (files only) by group name.

    The worker's task: reads the run folder itself (results, embedding samples; not the predictions).
    """
    from scdrugmap.report.figures import figure_groups
    from scdrugmap.report.run import read_run_data

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # its INFO lines per embedded font
    run = read_run_data(run_dir)
    return {group.name: [figure.drawn(formats) for figure in group.draw()]
            for group in figure_groups(run, projection=projection, seed=seed) if not group.reads_predictions}


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
        self.run_dir, self.formats, self.projection, self.seed = run_dir, list(formats), projection, seed
        self._pool: ProcessPoolExecutor | None = None
        self._results: Future[dict[str, list[ReportFigure]]] | None = None
        if jobs > 1 and self.formats:
            import multiprocessing

            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            self._results = self._pool.submit(draw_results_figures, run_dir, self.formats, projection, seed)

    def __enter__(self) -> FigureDrawing:
        return self

    def __exit__(self, *_: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def figures(self, run: RunData) -> list[ReportFigure]:
        """Return every figure in report order: this process's drawn and saved, then the worker's added."""
        from scdrugmap.report.figures import build_figures, figure_groups, report_order

        if self._results is None:
            return build_figures(run, projection=self.projection, seed=self.seed)
        groups = figure_groups(run, projection=self.projection, seed=self.seed)
        here = {group.name: self._draw(group) for group in groups if group.reads_predictions}
        try:
            there = self._results.result()
        except BrokenProcessPool as err:  # the worker died (killed, out of memory): its figures are drawn here
            log.warning("the figure worker stopped (%s); drawing its figures here", err)
            there = {group.name: self._draw(group) for group in groups if not group.reads_predictions}
        return report_order(run, [figure for group in groups
                                  for figure in (here if group.name in here else there)[group.name]])

    def _draw(self, group: FigureGroup) -> list[ReportFigure]:
        drawn = group.draw()
        for figure in drawn:  # saved now, while the worker draws its own
            for fmt in self.formats:
                figure.save(fmt)
        return drawn
