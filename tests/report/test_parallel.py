"""Figures drawn partly in a worker process make the same report as figures all drawn in one process."""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import pytest

from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.store import RunFolder
from scdrugmap.report import figures
from scdrugmap.report.parallel import FigureDrawing, draw_results_figures
from scdrugmap.report.write import write_report


def test_a_worker_draws_the_same_figures_in_the_same_order_as_one_process(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    one = write_report(copy, tmp_path / "one", formats=("html", "png"), projection="pca", jobs=1)
    two = write_report(copy, tmp_path / "two", formats=("html", "png"), projection="pca", jobs=2)
    assert [p.name for p in one] == [p.name for p in two] and len(one) > 10
    for first, second in zip(one, two, strict=True):
        if first.suffix in (".png", ".csv"):
            assert first.read_bytes() == second.read_bytes(), first.name
    pages = [(tmp_path / name / "report.html").read_text() for name in ("one", "two")]
    assert len(pages[0]) == len(pages[1])  # the same figures and tables (plotly's div ids are random)


def test_the_worker_draws_only_figures_of_the_job_results_and_never_reads_the_predictions(run, monkeypatch):
    groups = figures.figure_groups(run, projection="pca")
    reading = {group.name for group in groups if group.reads_predictions}
    assert reading == {"sample_auroc", "confounders", "roc_pr", "trust", "calibration"}

    def unread(self):
        pytest.fail("the worker read the per-cell predictions")

    monkeypatch.setattr(RunFolder, "predictions", property(unread))
    drawn = draw_results_figures(run.run_dir, ["png"], "pca", None)  # the worker's task, called here
    assert set(drawn) == {group.name for group in groups} - reading
    assert all(figure.figure is None and set(figure.saved) == {"png"} for group in drawn.values() for figure in group)
    with pytest.raises(ValueError, match="without its svg file"):
        drawn["f1_bars"][0].save("svg")


def test_figures_of_a_worker_that_died_are_drawn_here(run, caplog):
    drawing = FigureDrawing(run.run_dir, ["png"], projection="pca", seed=None, jobs=1)
    died: Future = Future()
    died.set_exception(BrokenProcessPool("killed"))
    drawing._results = died
    drawn = drawing.figures(run)
    groups = {group.name for group in figures.figure_groups(run, projection="pca")} - {"embeddings"}
    assert groups <= {f.name for f in drawn} and any(f.name.startswith("embedding_") for f in drawn)
    assert all(f.figure is not None and "png" in f.saved for f in drawn) and "drawing its figures here" in caplog.text


def test_an_error_in_the_worker_is_raised_here(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    (copy / "embeddings").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match="jobs must be 1 or more"):
        write_report(copy, tmp_path / "out", jobs=0)
    drawing = FigureDrawing(tmp_path / "missing", ["png"], projection="pca", seed=None, jobs=2)
    with drawing, pytest.raises(ConfigError):
        drawing._results.result(timeout=600)  # type: ignore[union-attr]
