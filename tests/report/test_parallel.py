"""Figures drawn partly in a worker process make the same report as figures all drawn in one process."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import pytest

from scdrugmap.errors import ConfigError
from scdrugmap.evaluate.store import RunFolder
from scdrugmap.report import figures, parallel
from scdrugmap.report.parallel import FigureDrawing
from scdrugmap.report.write import write_report


def test_a_worker_draws_the_same_figures_in_the_same_order_as_one_process(run_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(run_dir, tmp_path / "run")
    with monkeypatch.context() as patched:  # the Python API draws in its own process unless asked
        patched.setattr(parallel, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("a worker was started"))
        one = write_report(copy, tmp_path / "one", formats=("html", "png"), projection="pca")
    two = write_report(copy, tmp_path / "two", formats=("html", "png"), projection="pca", jobs=2)
    assert [p.name for p in one] == [p.name for p in two] and len(one) > 10
    for first, second in zip(one, two, strict=True):
        if first.suffix in (".png", ".csv"):
            assert first.read_bytes() == second.read_bytes(), first.name
    pages = [re.sub(r" · generated [^<]*</p>", "", (tmp_path / name / "report.html").read_text())
             for name in ("one", "two")]
    assert pages[0] == pages[1]  # the same page, but for its generation time


def test_the_worker_draws_only_figures_of_the_job_results_and_never_reads_the_predictions(run, monkeypatch):
    groups = figures.figure_groups(run, projection="pca")
    reading = {group.name for group in groups if group.reads_predictions}
    assert reading == {"sample_auroc", "confounders", "roc_pr", "trust", "calibration"}

    def unread(self):
        pytest.fail("the worker read the per-cell predictions")

    monkeypatch.setattr(RunFolder, "predictions", property(unread))
    monkeypatch.setattr(parallel, "_WORKER_GROUPS", {})
    parallel._start_worker(run.run_dir, "pca", None)  # the worker's tasks, called here
    assert set(parallel._WORKER_GROUPS) == {group.name for group in groups} - reading
    drawn = {name: parallel.draw_in_worker(name, ["png"]) for name in parallel._WORKER_GROUPS}
    assert all(figure.figure is None and set(figure.saved) == {"png"} for group in drawn.values() for figure in group)
    with pytest.raises(ValueError, match="without its svg file"):
        drawn["f1_bars"][0].save("svg")


def test_groups_the_worker_was_not_handed_or_lost_when_it_died_are_drawn_here(run, caplog):
    drawing = FigureDrawing(run.run_dir, ["png"], projection="pca", seed=None, jobs=1)
    drawing.submit(run)
    names = [group.name for group in drawing._groups if not group.reads_predictions]
    died: Future = Future()
    died.set_running_or_notify_cancel()  # started: waited for, not drawn here in its place
    died.set_exception(BrokenProcessPool("killed"))
    drawing._there = {name: died for name in names[:len(names) // 2]}
    drawing._waiting = names[len(names) // 2:]  # never handed to the worker
    drawn = drawing.figures(run)
    assert drawing._waiting == []
    assert {"f1_bars", "radar", "leakage", "roc_pr"} <= {f.name for f in drawn}
    assert any(f.name.startswith("embedding_") for f in drawn)
    assert all(f.figure is not None and "png" in f.saved for f in drawn)
    assert caplog.text.count("drawing its figures here") == 1


def test_the_worker_holds_one_group_at_a_time_and_this_process_takes_the_rest_from_the_end(run):
    """A process pool queues submitted tasks ahead of its worker, where they can no longer be cancelled."""
    with FigureDrawing(run.run_dir, ["png"], projection="pca", seed=None, jobs=2) as drawing:
        assert drawing._pool is not None
        submit = drawing._pool.submit
        unfinished_when_handing: list[int] = []
        handed_futures: list[Future] = []

        def counted_submit(function, *args):
            unfinished_when_handing.append(sum(not future.done() for future in handed_futures))
            handed_futures.append(submit(function, *args))
            return handed_futures[-1]

        drawing._pool.submit = counted_submit  # type: ignore[method-assign]
        drawing.submit(run)
        drawn = drawing.figures(run)
    worker_groups = [group.name for group in drawing._groups if not group.reads_predictions]
    handed = list(drawing._there)
    assert unfinished_when_handing and set(unfinished_when_handing) == {0}
    assert handed == worker_groups[:len(handed)]  # handed in order; the rest, from the end, drawn here
    assert sorted(f.name for f in drawn) == sorted(f.name for f in figures.build_figures(run, projection="pca"))


def test_a_worker_error_is_raised_here_and_a_worker_that_cannot_read_the_run_breaks_its_pool(run, tmp_path):
    with pytest.raises(ConfigError, match="jobs must be 1 or more"):
        write_report(run.run_dir, tmp_path / "out", jobs=0)
    with FigureDrawing(run.run_dir, ["png"], projection="pca", seed=None, jobs=2) as drawing:
        assert drawing._pool is not None
        with pytest.raises(KeyError, match="no such group"):
            drawing._pool.submit(parallel.draw_in_worker, "no such group", ["png"]).result(timeout=600)
    with FigureDrawing(tmp_path / "missing", ["png"], projection="pca", seed=None, jobs=2) as drawing:
        assert drawing._pool is not None
        with pytest.raises(BrokenProcessPool):  # its initializer could not read the run
            drawing._pool.submit(parallel._ready).result(timeout=600)
