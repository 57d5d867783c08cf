"""`write_report`: figures, tables and the HTML report of one run directory."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scdrugmap.errors import ConfigError
from scdrugmap.report.parallel import FigureDrawing

if TYPE_CHECKING:
    from scdrugmap.report.run import RunData

log = logging.getLogger(__name__)

FORMATS = ("html", "png", "svg", "pdf")
IMAGE_FORMATS = ("png", "svg", "pdf")


def _check_formats(formats: Sequence[str] | str) -> list[str]:
    if isinstance(formats, str):
        formats = formats.split(",")
    chosen = [f.strip().lower().lstrip(".") for f in formats if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        msg = f"--format {','.join(unknown) or '(none)'} is not available; choose from {', '.join(FORMATS)}."
        raise ConfigError(msg)
    return list(dict.fromkeys(chosen))


@contextlib.contextmanager
def _quiet_font_subsetting() -> Iterator[None]:
    """Keep fontTools' per-font INFO lines (written while saving PDF/SVG) out of the log; restore after."""
    logger = logging.getLogger("fontTools")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 formats: Sequence[str] | str = ("html", "png"), *, projection: str = "auto",
                 seed: int | None = None, jobs: int | None = 1) -> list[Path]:
    """Write a run's figures, tables and HTML report; return the paths written.

    Parameters
    ----------
    run_dir
        The ``--out`` folder of a `scdrugmap benchmark` run (only read).
    out_dir
        Where to write; defaults to ``run_dir/report``.
    formats
        Any of ``html`` (one self-contained ``report.html``), ``png``, ``svg``, ``pdf`` (one
        file per figure, named after the figure). Tables are always written as CSV.
    projection
        2-D maps of embeddings: ``auto`` (UMAP, PCA if umap-learn is missing), ``umap`` or ``pca``.
        The map the run stored with each embedding sample is reused when it was made this way
        and with this seed; older runs (no stored map) compute it.
    seed
        Seed of the maps (None: the run's seed, which made the stored maps).
    jobs
        Processes that draw figures: 1 (the default) draws them all in this process; 2 or more starts
        one worker for the figures of the job results (`scdrugmap.report.parallel`); None: 2 where this
        process may use two CPUs or more (what ``scdrugmap report`` does). The worker is spawned, so a
        script that asks for one must keep its top level under ``if __name__ == "__main__":``, as
        `multiprocessing` requires: the worker imports the script's main module.

    Returns
    -------
    The files written: ``<figure>.<format>`` per figure and format, ``summary.csv``
    (best model per category), ``sample_level.csv`` (sample-level AUROC with its interval per
    category value), ``paired_tests.csv`` (each model against the majority reference and the best
    baseline), ``confounders.csv`` (AUROC within cell types and studies), ``scalability.csv``, ``unscored_jobs.csv``,
    ``biomarkers_top.csv`` (the top genes per comparison and direction, when the run has a biomarker analysis:
    ``scdrugmap biomarkers DATA --run RUN_DIR``) and ``report.html``.

    Raises
    ------
    ConfigError
        When a format is unknown, the run has no results, or matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        msg = "reports need matplotlib; install the report extra: pip install 'scdrugmap[report]'."
        raise ConfigError(msg) from err
    chosen = _check_formats(formats)
    if projection not in ("auto", "umap", "pca"):
        msg = f"projection {projection!r} is not available; choose from auto, umap, pca."
        raise ConfigError(msg)
    if jobs is not None and jobs < 1:
        msg = f"jobs must be 1 or more, not {jobs}."
        raise ConfigError(msg)
    if jobs is None:
        from scdrugmap.train._blocks import available_cpus

        jobs = min(2, available_cpus())
    start = time.perf_counter()
    saved = [f for f in IMAGE_FORMATS if f in chosen or (f == "png" and "html" in chosen)]  # the page shows PNGs
    with (_quiet_font_subsetting(),
          FigureDrawing(Path(run_dir), saved, projection=projection, seed=seed, jobs=jobs) as drawing):  # type: ignore[arg-type]
        return _write(run_dir, out_dir, chosen, drawing, start)


def _page_parts(run: RunData) -> tuple[list[tuple[str, object]], str]:
    """Return the HTML page's interactive figures (plotly, when installed) and its biomarker section."""
    from scdrugmap.report.biomarker_section import biomarker_section
    from scdrugmap.report.interactive import interactive_bars, plotly_available
    from scdrugmap.report.style import model_colours

    interactive: list[tuple[str, object]] = []
    if plotly_available():
        bars = interactive_bars(run.results, model_colours(run.model_list))
        if bars is not None:
            interactive.append(("Mean F1 / AUROC per category value", bars))
    return interactive, biomarker_section(run)


def _write(run_dir: str | Path, out_dir: str | Path | None, chosen: list[str], drawing: FigureDrawing,
           start: float) -> list[Path]:
    """Write the report while ``drawing`` draws the figures (the worker's, if any, are waited for last)."""
    from scdrugmap.report.run import read_run_data
    from scdrugmap.report.tables import (
        DESIGN_NOTES,
        best_models,
        comparison_table,
        confounder_table,
        job_counts,
        sample_level_table,
        scalability_table,
        unscored_jobs,
    )

    run = read_run_data(run_dir)
    drawing.submit(run)  # the worker's figures, while this process computes the tables
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    log.info("writing the report of %s into %s (%s)", run.run_dir, out, ", ".join(chosen))
    best, scalability, unscored = (best_models(run.results, run.comparisons), scalability_table(run),
                                   unscored_jobs(run.results))
    samples, tests = sample_level_table(run.sample_scores), comparison_table(run.comparisons)
    confounders = confounder_table(run.confounders)
    page_parts = _page_parts(run) if "html" in chosen else None  # made before waiting for the worker's figures
    figures = drawing.figures(run)
    written: list[Path] = []
    for fmt in (f for f in chosen if f in IMAGE_FORMATS):
        for item in figures:  # each figure is laid out once, and each format drawn once (`ReportFigure.save`)
            path = out / f"{item.name}.{fmt}"
            path.write_bytes(item.save(fmt))
            written.append(path)
    for name, table in (("summary", best), ("sample_level", samples), ("paired_tests", tests),
                        ("confounders", confounders), ("scalability", scalability), ("unscored_jobs", unscored)):
        path = out / f"{name}.csv"
        table[[c for c in table.columns if not str(c).startswith("_")]].to_csv(path, index=False)
        written.append(path)
    if run.folder.biomarkers is not None:
        from scdrugmap.report.biomarker_section import top_gene_rows

        path = out / "biomarkers_top.csv"
        top_gene_rows(run.folder.biomarkers).to_csv(path, index=False)
        written.append(path)
    if page_parts is not None:
        from scdrugmap.report.html import render_html

        interactive, biomarkers = page_parts
        document = render_html(run, figures, best=best, scalability=scalability, unscored=unscored,
                               counts=job_counts(run.results), interactive=interactive, samples=samples, tests=tests,
                               confounders=confounders, biomarkers=biomarkers,
                               design_note=DESIGN_NOTES[run.label_design])
        path = out / "report.html"
        path.write_text(document, encoding="utf-8")
        written.append(path)
    log.info("    finished the report (%d files) in %.1fs", len(written), time.perf_counter() - start)
    return written
