"""A report draws each figure once per format, lays it out once, and reuses the run's stored 2-D maps."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from PIL import Image

from scdrugmap.evaluate.projection import project_embedding
from scdrugmap.evaluate.store import ResultStore, RunFolder, read_run
from scdrugmap.report import figures
from scdrugmap.report.render import RenderedFigure
from scdrugmap.report.run import read_run_data
from scdrugmap.report.style import RC_PARAMS
from scdrugmap.report.write import write_report


def _with_maps(run_dir, folder, *, seed=0):
    """Copy the fixture run and store the 2-D maps a benchmark run now writes with its embedding samples."""
    copy = shutil.copytree(run_dir, folder)
    store, run = ResultStore(copy), read_run(copy)
    for model in run.embedding_models():
        embedding, cells = run.embedding(model)
        store.save_embedding_sample(model, embedding, pd.Index(cells), seed=seed, projection="pca")
    return copy


def test_the_store_saves_the_map_of_the_embedding_sample_and_reads_it_back(tmp_path):
    embedding = np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)
    embedding[4] = np.nan
    names = pd.Index([f"c{i}" for i in range(30)])
    ResultStore(tmp_path).save_embedding_sample("pca", embedding, names, seed=3, projection="pca")
    run = RunFolder(tmp_path)  # no results: the sample alone
    stored = run.embedding_map("pca")
    expected, _ = project_embedding(embedding, method="pca", seed=3)
    assert (stored.method, stored.requested, stored.seed, stored.note) == ("pca", "pca", 3, "")
    np.testing.assert_array_equal(stored.coordinates, expected)
    assert np.isnan(stored.coordinates[4]).all()
    sample, cells = run.embedding("pca")
    assert sample.shape == (30, 6) and list(cells) == list(names)


def test_the_store_notes_why_an_automatic_map_fell_back_to_pca(tmp_path):
    embedding = np.random.default_rng(0).normal(size=(10, 6))  # fewer cells than UMAP needs
    ResultStore(tmp_path).save_embedding_sample("pca", embedding, pd.Index([str(i) for i in range(10)]), seed=0)
    stored = RunFolder(tmp_path).embedding_map("pca")  # no results: the sample alone
    assert (stored.method, stored.requested) == ("pca", "auto")
    assert stored.note == "too few cells for UMAP (10 < 20)"


def test_an_embedding_sample_of_an_older_run_has_no_map(run_dir):
    assert read_run(run_dir).embedding_map("pca") is None  # the fixture writes samples as older runs did


def test_the_report_reuses_the_stored_maps_without_projecting(run_dir, tmp_path, monkeypatch):
    run = read_run_data(_with_maps(run_dir, tmp_path / "run"))

    def no_projection(*args, **kwargs):
        raise AssertionError("the stored map should have been used")

    monkeypatch.setattr(figures, "project_embedding", no_projection)
    made = dict(figures.embedding_figures(run, projection="pca"))
    assert set(made) == {"pca", "scgpt"}
    points = sum(len(c.get_offsets()) for c in made["scgpt"].axes[0].collections)
    assert points == 120
    with pytest.raises(AssertionError, match="stored map"):  # another seed is computed again
        figures.embedding_figures(run, projection="pca", seed=5)


def test_the_report_of_an_older_run_computes_the_maps(run_dir, monkeypatch):
    run = read_run_data(run_dir)
    calls = []

    def counting(embedding, **options):
        calls.append(options)
        return project_embedding(embedding, **options)

    monkeypatch.setattr(figures, "project_embedding", counting)
    assert [model for model, _ in figures.embedding_figures(run, projection="pca")] == ["pca", "scgpt"]
    assert calls == [{"method": "pca", "seed": 0}, {"method": "pca", "seed": 0}]


def test_every_figure_is_laid_out_once_and_drawn_once_per_format(run_dir, tmp_path, monkeypatch):
    saves: list[tuple[int, str]] = []
    layouts: list[int] = []
    savefig, execute = Figure.savefig, ConstrainedLayoutEngine.execute

    def counting_savefig(self, *args, **kwargs):
        saves.append((id(self), kwargs["format"]))
        return savefig(self, *args, **kwargs)

    def counting_execute(self, figure):
        layouts.append(id(figure))
        return execute(self, figure)

    monkeypatch.setattr(Figure, "savefig", counting_savefig)
    monkeypatch.setattr(ConstrainedLayoutEngine, "execute", counting_execute)
    written = write_report(_with_maps(run_dir, tmp_path / "run"), tmp_path / "out",
                           formats=("html", "png", "svg", "pdf"), projection="pca", jobs=1)  # all drawn here
    n_figures = len([p for p in written if p.suffix == ".png"])
    assert len(saves) == 3 * n_figures and len(set(saves)) == len(saves)  # one draw per figure and format
    assert len(layouts) == n_figures and len(set(layouts)) == n_figures
    document = (tmp_path / "out" / "report.html").read_text()
    embedded = [base64.b64decode(uri) for uri in re.findall(r"src='data:image/png;base64,([^']+)'", document)]
    files = {p.read_bytes() for p in written if p.suffix == ".png"}
    assert len(embedded) == n_figures and set(embedded) == files  # the page shows the PNG files' bytes


def test_a_fixed_layout_gives_the_png_of_a_tight_savefig_for_every_figure(run):
    # two builds: a figure is laid out once in a report, and a second layout may move it by a pixel
    references, fixed = (figures.build_figures(run, projection="pca") for _ in range(2))
    for reference, item in zip(references, fixed, strict=True):
        saved = io.BytesIO()
        with mpl.rc_context(RC_PARAMS):
            reference.figure.savefig(saved, format="png", bbox_inches="tight")
        first, second = (np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                         for b in (saved.getvalue(), RenderedFigure(item.figure).save("png")))
        assert first.shape == second.shape, item.name
        assert np.array_equal(first, second), item.name


#: Modules a report of a run with stored maps never needs: no network, no projection, no estimator, no statistics
#: module (scipy.stats alone takes about a second to import).
NOT_IMPORTED_BY_REPORT = ("torch", "sklearn", "scipy.stats", "umap", "numba")


def test_a_figure_saved_twice_gives_the_same_svg_and_pdf_files(run):
    """No save time and no random SVG ids: a report made again, later, is the same files."""
    made = []
    for _ in range(2):
        figure = figures.plot_metric_bars(run.results, {"pca": "#000000", "majority": "#BBBBBB"})
        rendered = RenderedFigure(figure)
        made.append({fmt: rendered.save(fmt) for fmt in ("svg", "pdf")})
    assert made[0] == made[1]
    assert b"<dc:date>" not in made[0]["svg"] and b"/CreationDate" not in made[0]["pdf"]


def test_the_report_command_imports_no_torch_scikit_learn_scipy_stats_or_umap(run_dir, tmp_path):
    probe = ("import atexit, sys\n"
             f"NAMES = {NOT_IMPORTED_BY_REPORT!r}\n"
             "atexit.register(lambda: sys.stderr.write(f\"imported: {[n for n in NAMES if n in sys.modules]}\\n\"))\n"
             "from scdrugmap.cli import main\n"
             "sys.argv = ['scdrugmap', *sys.argv[1:]]\n"
             "main()\n")
    args = ["report", str(_with_maps(run_dir, tmp_path / "run")), "--out", str(tmp_path / "out"), "--format",
            "html,png,pdf", "--projection", "pca"]
    done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stderr, done.stderr
