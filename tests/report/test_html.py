"""The HTML report and `write_report`: self-contained, offline, with the run's summary, config and banner."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest
from matplotlib.figure import Figure

from scdrugmap.errors import ConfigError
from scdrugmap.report import write as write_module
from scdrugmap.report import write_report
from scdrugmap.report.figures import FigureGroup, ReportFigure
from scdrugmap.report.html import render_html
from scdrugmap.report.interactive import interactive_bars
from scdrugmap.report.run import read_run_data
from scdrugmap.report.tables import best_models, job_counts, scalability_table, unscored_jobs


class _Collector(HTMLParser):
    """Collect tags with attributes, and the cells of every table row."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    """write_report of the fixture run as HTML (PCA maps instead of UMAP to stay fast)."""
    out = tmp_path_factory.mktemp("report_out")
    paths = write_report(run_dir, out, formats=("html",), projection="pca")
    return out, paths


@pytest.fixture(scope="module")
def document(report):
    out, _ = report
    text = (out / "report.html").read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    return text, parser


def _tables_for(run):
    return {"best": best_models(run.results, run.comparisons), "scalability": scalability_table(run),
            "unscored": unscored_jobs(run.results), "counts": job_counts(run.results)}


def test_write_report_returns_every_file_it_wrote(report, document):
    out, paths = report
    assert {p.name for p in paths} == {"report.html", "summary.csv", "sample_level.csv", "paired_tests.csv",
                                       "confounders.csv", "scalability.csv", "unscored_jobs.csv"}
    assert all(p.exists() and p.parent == out for p in paths)
    _, parser = document
    figure_ids = [a["id"] for t, a in parser.tags if t == "figure" and a.get("id")]
    assert figure_ids == [f"figure-{stem}" for stem in (
        "f1_bars", "radar", "violin_cancer_type", "circular_bars", "embedding_pca", "embedding_scgpt", "scalability",
        "confounders",
        "roc_pr", "trust", "cross_study_heatmap", "critical_difference", "leakage", "calibration", "sample_auroc")]


def test_html_report_loads_nothing_from_the_network(document):
    text, parser = document
    for tag, attributes in parser.tags:
        for name in ("src", "href"):
            value = attributes.get(name) or ""
            assert not re.match(r"\s*(https?:)?//", value), (tag, value[:80])
        if tag == "script":
            assert "src" not in attributes
    images = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(images) == 15 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "@import" not in text
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js is inlined, not fetched


def test_html_report_shows_the_simulated_banner_for_demo_data(document):
    text, parser = document
    assert any(a.get("id") == "simulated-banner" for _, a in parser.tags)
    assert "SIMULATED DATA" in text


def test_html_report_of_real_data_has_no_banner(real_run_dir):
    run = read_run_data(real_run_dir)
    tables = _tables_for(run)
    text = render_html(run, [], best=tables["best"], scalability=tables["scalability"],
                       unscored=tables["unscored"], counts=tables["counts"])
    assert "SIMULATED" not in text
    assert "/data/real.h5ad" in text


def test_html_summary_table_gives_the_best_model_per_category(document):
    _, parser = document
    header = next(row for row in parser.rows if row and row[0] == "category")
    rows = [dict(zip(header, row, strict=True)) for row in parser.rows if len(row) == len(header) and row != header]
    summary = [r for r in rows if r["split"] in {"sample", "cell"}]
    assert {(r["category"], r["split"]) for r in summary} == {
        (c, s) for c in ("Tissue", "Cancer type", "Therapy", "Regimen") for s in ("sample", "cell")}
    assert {r["best model"] for r in summary} == {"scGPT"}


def test_html_report_holds_config_environment_and_unscored_jobs(document):
    text, _ = document
    assert "Config and environment" in text and "Linux-test" in text and "&quot;folds&quot;: 3" in text
    assert "ValueError: one class" in text  # the failed job's reason
    assert "51,000,000" in text  # scGPT's parameters in the scalability table


def test_every_figure_is_captioned_and_titled(document):
    text, _ = document
    assert text.count("<figcaption>") == 15 + 1  # one per static figure, one for the interactive one
    assert "Leakage: split = sample vs split = cell" in text


def test_interactive_bars_have_one_trace_per_model_setting_and_metric(run, colours):
    figure = interactive_bars(run.results, colours)
    names = [trace.name for trace in figure.data]
    # (pca, scgpt, majority) frozen + scgpt LoRA, for F1 and for AUROC
    assert sorted(names) == sorted(["PCA", "scGPT", "Majority", "scGPT"] * 2)
    assert sum(trace.visible for trace in figure.data) == 4  # F1 shown first
    buttons = figure.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["F1", "AUROC"]
    assert figure.layout.yaxis.range == (0, 1.1)
    scgpt = next(t for t in figure.data if t.name == "scGPT")
    assert scgpt.marker.color == colours["scgpt"]
    assert len(scgpt.y) == 9  # one bar per scored category value under split=sample


def test_write_report_defaults_to_the_report_folder_inside_the_run(tmp_path, monkeypatch, run_dir):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)

    def one_figure(run, **_):
        figure = Figure()
        figure.add_subplot().plot([0, 1], [0, 1])
        return [ReportFigure("only", "Only", "One figure.", figure)]

    monkeypatch.setattr("scdrugmap.report.figures.figure_groups",
                        lambda run, **_: [FigureGroup("only", lambda: one_figure(run), False)])
    paths = write_report(copy, formats="png, SVG,pdf", jobs=1)  # the patched figures: drawn in this process
    assert {p.relative_to(copy).as_posix() for p in paths} == {
        "report/only.png", "report/only.svg", "report/only.pdf", "report/summary.csv", "report/sample_level.csv",
        "report/paired_tests.csv", "report/confounders.csv", "report/scalability.csv", "report/unscored_jobs.csv"}
    assert (copy / "report" / "only.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (copy / "report" / "only.pdf").read_bytes()[:5] == b"%PDF-"
    assert ET.parse(copy / "report" / "only.svg").getroot().tag.endswith("svg")


def test_write_report_refuses_unknown_formats_and_projections(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="--format jpeg is not available; choose from html, png, svg, pdf"):
        write_report(run_dir, tmp_path, formats=("html", "jpeg"))
    with pytest.raises(ConfigError, match="projection 'tsne'"):
        write_report(run_dir, tmp_path, projection="tsne")
    assert write_module.FORMATS == ("html", "png", "svg", "pdf")


def test_write_report_refuses_a_folder_without_results(tmp_path):
    with pytest.raises(ConfigError, match="no results found"):
        write_report(tmp_path)


def test_the_report_leads_with_sample_level_results_when_labels_are_per_sample(run_dir, monkeypatch):
    from scdrugmap.report import figures as report_figures
    from scdrugmap.report.figures import build_figures
    from scdrugmap.report.tables import DESIGN_NOTES, sample_level_table

    run = read_run_data(run_dir)
    run.__dict__["label_design"] = "per-sample"  # as if every sample's cells shared one label
    tables = _tables_for(run)
    monkeypatch.setattr(report_figures, "embedding_figures", lambda *args, **kwargs: [])  # not under test: slow
    figures = build_figures(run)
    assert figures[0].name == "sample_auroc"
    samples = sample_level_table(run.sample_scores)
    text = render_html(run, figures, best=tables["best"], scalability=tables["scalability"],
                       unscored=tables["unscored"], counts=tables["counts"], samples=samples,
                       design_note=DESIGN_NOTES["per-sample"])
    headings = re.findall(r"<h2 id='([^']+)'>", text)
    assert headings[0] == "sample-level-results" and headings[1] == "summary"
    assert "Labels are given per sample" in text and "sample AUROC" in text
