"""The report's biomarker section: shown when the run folder holds one, else one line with the command."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from matplotlib.figure import Figure

import scdrugmap as sdm
from scdrugmap.data.simulate import simulated_gene_sets
from scdrugmap.evaluate.store import biomarkers_dir, read_run
from scdrugmap.report import write_report
from scdrugmap.report.biomarker_section import top_gene_rows
from scdrugmap.report.figures import FigureGroup, ReportFigure


@pytest.fixture(scope="module")
def with_biomarkers(tmp_path_factory, run_builder):
    """A fixture run with a biomarker analysis in its folder (observed labels of a small simulated collection)."""
    run_dir = run_builder(tmp_path_factory.mktemp("bio_run") / "run", simulated=False)
    adata = sdm.datasets.simulate(n_cells=400, n_genes=120, seed=0, resistance_strength=2.0)
    found = sdm.tl.biomarkers(adata, gene_sets=simulated_gene_sets(n_genes=120, seed=0), top_k=5, n_bootstrap=2,
                              n_permutations=100)
    found.write(biomarkers_dir(run_dir))
    return run_dir, found


def _one_figure(run, **_):
    figure = Figure()
    figure.add_subplot().plot([0, 1], [0, 1])
    return [ReportFigure("only", "Only", "One figure.", figure)]


def _report(run_dir, out, monkeypatch):
    monkeypatch.setattr("scdrugmap.report.figures.figure_groups",  # the run's figures: not under test
                        lambda run, **_: [FigureGroup("only", lambda: _one_figure(run), False)])
    paths = write_report(run_dir, out, formats=("html",), projection="pca", jobs=1)  # the patched figures: here
    return paths, (out / "report.html").read_text(encoding="utf-8")


def test_a_run_without_biomarkers_gets_one_line_with_the_command(tmp_path, monkeypatch, run_builder):
    run_dir = run_builder(tmp_path / "run", simulated=False)
    paths, text = _report(run_dir, tmp_path / "out", monkeypatch)
    assert "<h2 id='biomarkers'>" not in text and "href='#biomarkers'" not in text  # no empty section
    line = re.search(r"<p class='facts' id='biomarkers'>(.*?)</p>", text).group(1)
    assert f"scdrugmap biomarkers /data/real.h5ad --model pca --run {run_dir}" in line
    assert "biomarkers_top.csv" not in {p.name for p in paths}


def test_the_report_shows_the_runs_biomarkers_with_unit_n_and_comparison(with_biomarkers, tmp_path, monkeypatch):
    run_dir, found = with_biomarkers
    assert read_run(run_dir).biomarkers is not None  # the store finds it where the CLI writes it
    paths, text = _report(run_dir, tmp_path / "out", monkeypatch)
    assert "href='#biomarkers'" in text
    section = text[text.index("<h2 id='biomarkers'>"):text.index("<h2 id='scalability-table'>")]
    counts = found.table[(found.table["comparison"] == "observed") & (found.table["test"] == "pseudobulk")].iloc[0]
    assert "Compared: observed labels (obs[&#x27;response&#x27;])" in section
    assert "unit = pseudobulk sample (each sample&#x27;s raw counts summed per group)" in section
    assert f"N = {counts['n_resistant']} resistant vs {counts['n_sensitive']} sensitive" in section
    assert "Stability: share of 2 bootstrap resamples" in section and "Attribution: none" in section
    # the top genes of each direction, in order, with their test and numbers
    top = top_gene_rows(biomarkers := read_run(run_dir).biomarkers, k=10)
    for direction in ("up", "down"):
        genes = top[top["direction"] == direction]["gene"].tolist()
        assert genes == found.top_genes("observed", direction=direction, k=10)
        assert all(f"<td>{g}</td>" in section for g in genes)
    assert "<h3>Enrichment</h3>" in section and "SCDRUGMAP_SIM_RESISTANCE" in section
    figures = re.findall(r"<figure id='figure-biomarkers-([a-z_]+)'>", section)
    assert figures == [role for role in ("volcano", "dotplot", "attribution", "enrichment_figure")
                       if role in biomarkers.figures] and "volcano" in figures
    written = pd.read_csv(next(p for p in paths if p.name == "biomarkers_top.csv"))
    assert written["gene"].tolist() == top["gene"].tolist()
