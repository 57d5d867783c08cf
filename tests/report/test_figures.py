"""Report figures built from the code-built run (tests/report/conftest.py): what each one draws, per model."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from scipy import stats

from scdrugmap.report import figures
from scdrugmap.report.run import labelled_predictions, read_run_data
from scdrugmap.report.stats import NEMENYI_Q_05, friedman_nemenyi, nemenyi_q
from scdrugmap.report.style import KNOWN_MODEL_COLOURS, OKABE_ITO, model_colours
from scdrugmap.report.tables import (
    best_models,
    comparison_table,
    scalability_table,
    unscored_jobs,
    value_scores,
)

FROZEN, LORA = "frozen · MLP head", "LoRA · MLP head"


def gids(ax, prefix: str) -> Counter:
    """Count the artists of an axes whose gid starts with ``prefix``, by gid."""
    found = Counter()
    for artist in ax.findobj():
        gid = artist.get_gid()
        if gid and gid.startswith(prefix):
            found[gid] += 1
    return found


def panel(figure, title: str):
    matches = [ax for ax in figure.axes if ax.get_title(loc="left") == title or ax.get_title() == title]
    assert len(matches) == 1, [(ax.get_title(loc="left"), ax.get_title()) for ax in figure.axes]
    return matches[0]


def scored_values(run, *, model, strategy="frozen", split="sample", scenario="pooled"):
    done = run.results[(run.results["status"] == "done") & (run.results["model"] == model)
                       & (run.results["strategy"] == strategy) & (run.results["split"] == split)
                       & (run.results["scenario"] == scenario)]
    return done


# --- colours ----------------------------------------------------------------------------------------------

def test_model_colours_are_fixed_per_model_whatever_the_order_and_distinct():
    first = model_colours(["scgpt", "pca", "mymodel", "other"])
    second = model_colours(["other", "mymodel", "pca", "scgpt"])
    assert first == second
    assert list(first) == ["scgpt", "pca", "mymodel", "other"]  # keeps the given order
    assert first["scgpt"] == KNOWN_MODEL_COLOURS["scgpt"] == OKABE_ITO[5]
    assert len(set(first.values())) == 4
    assert not {first["mymodel"], first["other"]} & set(KNOWN_MODEL_COLOURS.values())


def test_every_figure_uses_the_same_colour_for_a_model(run, colours):
    bars = figures.plot_metric_bars(run.results, colours)
    leakage = figures.plot_leakage(run.results, colours)
    for figure, prefix in ((bars, "bar|"), (leakage, "leakage|")):
        for artist in figure.findobj():
            gid = artist.get_gid() or ""
            if gid.startswith(prefix):
                model = gid.split("|")[1]
                assert np.allclose(artist.get_facecolor()[:3], _rgb(colours[model]))


def _rgb(colour: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


# --- 1. grouped bars -------------------------------------------------------------------------------------------

def test_bar_chart_has_one_panel_per_setting_and_one_bar_per_scored_value(run, colours):
    figure = figures.plot_metric_bars(run.results, colours)
    frozen, lora = panel(figure, FROZEN), panel(figure, LORA)
    # split=sample: tissue 2 + cancer type 2 (Breast skipped) + therapy 2 + regimen 3 values
    assert gids(frozen, "bar|") == {"bar|pca": 9, "bar|scgpt": 9, "bar|majority": 9}
    assert gids(lora, "bar|") == {"bar|scgpt": 9}  # LoRA of pca/majority was skipped: not drawn
    labels = [t.get_text().replace("\n", " ") for t in lora.get_xticklabels()]
    assert "Breast" not in labels and "Melanoma" in labels
    assert frozen.get_ylim()[0] == 0
    assert "F1" in frozen.get_ylabel() and "SD" in frozen.get_ylabel()


def test_bar_heights_leave_out_nan_folds_and_failed_jobs(run, colours, planted):
    model, _, category, value, _, split = planted.nan_fold
    table = value_scores(run.results, split=split)
    row = table[(table["model"] == model) & (table["setting"] == FROZEN) & (table["value"] == value)].iloc[0]
    folds = scored_values(run, model=model)
    expected = folds.loc[(folds["category"] == category) & (folds["value"] == value), "f1"]
    assert expected.isna().sum() == 1
    assert row["f1_n"] == planted.folds - 1
    assert row["f1_mean"] == pytest.approx(expected.dropna().mean())
    assert row["f1_sd"] == pytest.approx(expected.dropna().std())
    failed_model, _, _, failed_value, _, _ = planted.failed_job
    failed_row = table[(table["model"] == failed_model) & (table["setting"] == FROZEN)
                       & (table["value"] == failed_value)].iloc[0]
    assert failed_row["f1_n"] == planted.folds - 1
    figure = figures.plot_metric_bars(run.results, colours)
    heights = [p.get_height() for p in panel(figure, FROZEN).patches if p.get_gid() == f"bar|{model}"]
    assert any(h == pytest.approx(expected.dropna().mean()) for h in heights)
    assert not any(np.isnan(heights))


def test_bar_chart_marks_a_value_a_model_has_no_score_for(run, colours):
    results = run.results[~((run.results["model"] == "pca") & (run.results["value"] == "Lung"))]
    figure = figures.plot_metric_bars(results, colours)
    frozen = panel(figure, FROZEN)
    assert gids(frozen, "bar|")["bar|pca"] == 8
    assert gids(frozen, "missing|") == {"missing|pca": 1}


@pytest.mark.parametrize("builder", ["plot_metric_bars", "plot_radar", "plot_circular_bars", "plot_leakage"])
def test_figure_legends_sit_outside_every_panel(run, colours, builder):
    figure = getattr(figures, builder)(run.results, colours)
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    assert len(figure.legends) == 1
    legend = figure.legends[0].get_window_extent(renderer)
    for ax in figure.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()


# --- 2. radar -----------------------------------------------------------------------------------------------------

def test_radar_is_zero_to_one_with_one_line_per_model_and_setting(run, colours):
    figure = figures.plot_radar(run.results, colours)
    titles = sorted(ax.get_title() for ax in figure.axes if ax.name == "polar")
    assert titles == ["AUROC: All categories", "AUROC: Regimen", "F1: All categories", "F1: Regimen"]
    for ax in (ax for ax in figure.axes if ax.name == "polar"):
        assert ax.get_ylim() == (0, 1)
        assert gids(ax, "radar|") == {f"radar|pca|{FROZEN}": 1, f"radar|scgpt|{FROZEN}": 1,
                                      f"radar|majority|{FROZEN}": 1, f"radar|scgpt|{LORA}": 1}
    overview = panel(figure, "F1: All categories")
    assert [t.get_text() for t in overview.get_xticklabels()] == ["Tissue", "Cancer type", "Therapy", "Regimen"]
    line = next(a for a in overview.lines if a.get_gid() == f"radar|scgpt|{LORA}")
    assert line.get_linestyle() != next(a for a in overview.lines if a.get_gid() == f"radar|scgpt|{FROZEN}"
                                        ).get_linestyle()
    assert len(line.get_xdata()) == 5  # four spokes, closed


# --- 3. violins ---------------------------------------------------------------------------------------------------

def test_violins_show_every_scored_fold_of_all_cancer_types_per_model(run, colours):
    figure = figures.plot_violins(run.results, colours)
    frozen = panel(figure, FROZEN)
    assert gids(frozen, "violin|") == {"violin|pca": 1, "violin|scgpt": 1, "violin|majority": 1}
    assert gids(frozen, "box|") == {"box|pca": 1, "box|scgpt": 1, "box|majority": 1}
    points = {a.get_gid(): len(a.get_offsets()) for a in frozen.collections if (a.get_gid() or "").startswith("points")}
    # Lung and Melanoma x 3 folds; Breast skipped; pca's NaN Melanoma fold left out
    assert points == {"points|pca": 5, "points|scgpt": 6, "points|majority": 6}
    assert gids(panel(figure, LORA), "violin|") == {"violin|scgpt": 1}
    assert "2 cancer types" in figure.get_suptitle()


# --- 4. circular bars ----------------------------------------------------------------------------------------------

def test_circular_bars_have_radius_zero_to_one_and_one_bar_per_model_and_value(run, colours):
    figure = figures.plot_circular_bars(run.results, colours)
    polar = [ax for ax in figure.axes if ax.name == "polar"]
    assert len(polar) == 8  # 4 categories x 2 settings
    for ax in polar:
        assert ax.get_ylim() == (0, 1)
    regimen = panel(figure, f"Regimen\n{FROZEN}")
    assert gids(regimen, "circular|") == {"circular|pca": 3, "circular|scgpt": 3, "circular|majority": 3}
    assert [t.get_text() for t in regimen.get_xticklabels()] == ["anti-CTLA4", "anti-PD1", "erlotinib"]


# --- 5. embeddings ---------------------------------------------------------------------------------------------------

def test_embedding_maps_colour_every_sampled_cell_by_cancer_type_and_response(run):
    made = figures.embedding_figures(run, projection="pca")
    assert [model for model, _ in made] == ["pca", "scgpt"]  # majority has no embedding
    figure = made[1][1]
    by_type, by_response = figure.axes[:2]
    type_groups = {a.get_gid(): len(a.get_offsets()) for a in by_type.collections}
    assert type_groups == {"embedding|cancer_type|Breast": 24, "embedding|cancer_type|Lung": 48,
                           "embedding|cancer_type|Melanoma": 48}
    response_groups = {a.get_gid(): len(a.get_offsets()) for a in by_response.collections}
    assert response_groups == {"embedding|response|resistant": 60, "embedding|response|sensitive": 60}
    assert "PCA 2-D" in figure.get_suptitle() and "scGPT" in figure.get_suptitle()
    assert by_type.get_xlabel().startswith("PC 1")


def test_embedding_map_title_names_the_pca_fallback_and_why(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap -> ImportError
    made = dict(figures.embedding_figures(run, projection="auto"))
    assert "PCA 2-D (fallback: umap-learn is not installed)" in made["scgpt"].get_suptitle()


# --- 6. scalability ---------------------------------------------------------------------------------------------------

def test_scalability_table_combines_models_json_and_job_timings(run, colours):
    table = scalability_table(run).set_index(["_model", "strategy"])
    assert table.loc[("scgpt", "frozen"), "parameters"] == 51_000_000
    assert table.loc[("scgpt", "frozen"), "output dim"] == 16
    assert table.loc[("scgpt", "frozen"), "inference (cells/s)"] == 20.0
    assert table.loc[("scgpt", "lora"), "training time per fold (s)"] == pytest.approx(4.0)
    assert table.loc[("scgpt", "lora"), "training (cells/s)"] == pytest.approx(80 / 4.0)
    assert ("pca", "lora") not in table.index  # LoRA of pca was skipped
    assert pd.isna(table.loc[("pca", "frozen"), "parameters"])
    figure = figures.plot_scalability(scalability_table(run), colours)
    assert [ax.get_title(loc="left") for ax in figure.axes] == [
        "Inference (embedding every cell)", "Training + prediction, per fold", "Model size"]
    assert all(ax.get_xscale() == "log" for ax in figure.axes)
    assert figures.format_si(51_000_000) == "51 M" and figures.format_seconds(2.9e-5) == "29 µs"


# --- 7. ROC, PR, calibration --------------------------------------------------------------------------------------------

def test_roc_and_pr_curves_per_category_and_model_with_legends_outside_the_data(run, colours):
    predictions = labelled_predictions(run)
    figure = figures.plot_roc_pr(predictions, colours, settings=[FROZEN, LORA])
    assert len(figure.axes) == 8
    roc = panel(figure, "Cancer type: ROC")
    expected = {f"roc|pca|{FROZEN}": 1, f"roc|scgpt|{FROZEN}": 1, f"roc|majority|{FROZEN}": 1, f"roc|scgpt|{LORA}": 1}
    assert {k: v for k, v in gids(roc, "roc|").items()} == expected
    assert gids(panel(figure, "Cancer type: Precision-recall"), "pr|") == {
        k.replace("roc|", "pr|"): 1 for k in expected}
    assert roc.get_xlim() == (0, 1)
    legend_labels = [t.get_text() for t in roc.get_legend().get_texts()]
    scgpt_auc = next(label for label in legend_labels if label.startswith(f"scGPT, {FROZEN}"))
    assert float(scgpt_auc.split(": ", 1)[1].split(" ")[0]) > 0.8  # the fixture's most separable probabilities
    assert "folds)" in scgpt_auc
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        legend = ax.get_legend()
        if legend is not None:
            assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def test_roc_curves_are_the_mean_of_per_fold_curves_so_a_constant_reference_reads_one_half(run, colours):
    """Pooling folds would rank fold priors: a reference predicting each fold's training share must read 0.5."""
    predictions = labelled_predictions(run).copy()
    majority = predictions["model"] == "majority"
    # each fold predicts its own constant (like a training prior), anti-correlated with its test labels
    share = predictions[majority].groupby("key")["label"].transform("mean")
    predictions["probability"] = np.where(majority, 1.0 - share.reindex(predictions.index), predictions["probability"])
    figure = figures.plot_roc_pr(predictions, colours, settings=[FROZEN])
    roc = panel(figure, "Tissue: ROC")
    line = next(a for a in roc.lines if a.get_gid() == f"roc|majority|{FROZEN}")
    assert np.allclose(line.get_ydata(), line.get_xdata())  # the diagonal
    label = next(t.get_text() for t in roc.get_legend().get_texts() if t.get_text().startswith("Majority"))
    assert label.startswith("Majority: 0.50")
    assert any(c.get_gid() == f"band|roc|pca|{FROZEN}" for c in roc.collections)


def test_roc_curves_use_only_the_chosen_split(run, colours):
    predictions = labelled_predictions(run)
    sample = figures.plot_roc_pr(predictions, colours, split="sample", settings=[FROZEN])
    cell = figures.plot_roc_pr(predictions, colours, split="cell", settings=[FROZEN])
    first = next(a for a in panel(sample, "Tissue: ROC").lines if a.get_gid() == f"roc|pca|{FROZEN}")
    second = next(a for a in panel(cell, "Tissue: ROC").lines if a.get_gid() == f"roc|pca|{FROZEN}")
    assert not np.array_equal(first.get_ydata(), second.get_ydata())


def test_calibration_curves_stay_in_the_unit_square_one_per_model_and_setting(run, colours):
    figure = figures.plot_calibration(labelled_predictions(run), colours, settings=[FROZEN, LORA])
    tissue = panel(figure, "Tissue")
    assert tissue.get_xlim() == (0, 1) and tissue.get_ylim() == (0, 1)
    curves = [a for a in tissue.lines if (a.get_gid() or "").startswith("calibration|")]
    assert sorted(a.get_gid() for a in curves) == sorted(
        [f"calibration|pca|{FROZEN}", f"calibration|scgpt|{FROZEN}", f"calibration|majority|{FROZEN}",
         f"calibration|scgpt|{LORA}"])
    for curve in curves:
        assert np.all((curve.get_xdata() >= 0) & (curve.get_xdata() <= 1))
        assert np.all((curve.get_ydata() >= 0) & (curve.get_ydata() <= 1))


def test_curves_explain_a_run_without_predictions(colours):
    figure = figures.plot_roc_pr(None, colours)
    assert any("no predictions" in t.get_text() for t in figure.axes[0].texts)


# --- 8. cross-study heatmap ---------------------------------------------------------------------------------------------

def test_cross_study_heatmap_has_model_rows_and_held_out_study_columns_of_scored_jobs(run, colours):
    figure = figures.plot_cross_study_heatmap(run.results, colours)
    ax = figure.axes[0]
    image = next(a for a in ax.get_images() if a.get_gid() == "heatmap")
    matrix = image.get_array()
    assert matrix.shape == (4, 8)  # pca, scgpt, majority frozen + scgpt LoRA; 4 categories x 2 studies
    assert [t.get_text() for t in ax.get_xticklabels()] == ["GSE1", "GSE2"] * 4  # no "all" of skipped jobs
    assert image.get_clim() == (0, 1)
    done = run.results[(run.results["scenario"] == "cross") & (run.results["status"] == "done")]
    expected = done[(done["model"] == "pca") & (done["strategy"] == "frozen") & (done["category"] == "cancer_type")
                    & (done["fold"] == "GSE2")]["f1"].mean()
    assert matrix[0, 3] == pytest.approx(expected)  # row pca, column cancer type / GSE2


def test_cross_study_heatmap_says_why_when_no_cross_job_was_scored(run, colours):
    results = run.results.copy()
    cross = results["scenario"] == "cross"
    results.loc[cross, "status"] = "skipped"
    results.loc[cross, "reasons"] = '{"skipped": "only one study (GSE1); leave-one-study-out needs two or more"}'
    figure = figures.plot_cross_study_heatmap(results, colours)
    assert not figure.axes[0].get_images()
    assert "only one study (GSE1)" in figure.axes[0].texts[0].get_text()


# --- 9. Friedman / Nemenyi -------------------------------------------------------------------------------------------------

def test_friedman_statistic_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(rng.uniform(size=(12, 4)), columns=list("abcd"))
    test = friedman_nemenyi(scores)
    expected = stats.friedmanchisquare(*(scores[c] for c in scores))
    assert test.chi2 == pytest.approx(expected.statistic)
    assert test.p_value == pytest.approx(expected.pvalue)
    tied = scores.round(1)
    tied.iloc[:, 1] = tied.iloc[:, 0]
    assert friedman_nemenyi(tied).chi2 == pytest.approx(stats.friedmanchisquare(*(tied[c] for c in tied)).statistic)


def test_friedman_p_values_and_ranks_equal_scipy_stats():
    rng = np.random.default_rng(1)
    scores = pd.DataFrame(rng.uniform(size=(10, 5)).round(1), columns=list("abcde"))  # ties within blocks
    test = friedman_nemenyi(scores)
    assert test.p_value == stats.chi2.sf(test.chi2, 4)
    assert test.p_value_iman_davenport == stats.f.sf(test.iman_davenport, 4, 4 * 9)
    np.testing.assert_array_equal(test.average_ranks, stats.rankdata(-scores.to_numpy(), axis=1).mean(axis=0))


def test_nemenyi_table_equals_the_studentized_range_quantile():
    for k, q in NEMENYI_Q_05.items():
        assert q == float(stats.studentized_range.ppf(0.95, k, np.inf) / np.sqrt(2))
    assert nemenyi_q(25) == pytest.approx(float(stats.studentized_range.ppf(0.95, 25, np.inf) / np.sqrt(2)))


def test_nemenyi_critical_difference_follows_demsar():
    assert nemenyi_q(3) == pytest.approx(2.343, abs=1e-3)  # Demšar (2006), table 5a
    assert nemenyi_q(5) == pytest.approx(2.728, abs=1e-3)
    scores = pd.DataFrame({"a": np.arange(9) + 3.0, "b": np.arange(9) + 2.0, "c": np.arange(9) + 1.0})
    test = friedman_nemenyi(scores)
    assert list(test.average_ranks) == [1.0, 2.0, 3.0]
    assert test.critical_difference == pytest.approx(2.3437 * np.sqrt(3 * 4 / (6 * 9)), rel=1e-4)
    assert test.chi2 == pytest.approx(18.0)  # 12*9/(3*4) * (1 + 4 + 9 - 3*16/4)
    assert test.cliques() == [["a", "b"], ["b", "c"]]  # rank gaps of 1 < CD 1.10; 2 > CD


def test_critical_difference_plot_ranks_every_model_in_each_setting(run, colours):
    figure = figures.plot_critical_difference(run.results, colours, min_blocks=3)
    frozen = next(ax for ax in figure.axes if ax.get_title(loc="left").startswith(FROZEN))
    labels = {t.get_gid(): t.get_text() for t in frozen.texts if (t.get_gid() or "").startswith("cd|")}
    assert set(labels) == {"cd|pca", "cd|scgpt", "cd|majority"}
    assert labels["cd|scgpt"].endswith("(1.00)") and labels["cd|majority"].endswith("(3.00)")
    title = frozen.get_title(loc="left")
    assert "Friedman" in title and "N = 3 regimen values (independent blocks)" in title
    lora = panel(figure, LORA)  # one model only: not ranked, and the plot says why
    assert any(t.get_gid() == "message" for t in lora.texts)


def test_critical_difference_plot_uses_independent_blocks_and_says_why_it_is_not_drawn(run, colours):
    """Values of different categories share cells: never pooled into blocks; too few blocks: no ranking."""
    figure = figures.plot_critical_difference(run.results, colours)
    frozen = panel(figure, FROZEN)
    message = next(t.get_text() for t in frozen.texts if t.get_gid() == "message")
    assert "N = 3 independent blocks" in message and "at least 5" in message
    assert not [t for t in frozen.texts if (t.get_gid() or "").startswith("cd|")]


# --- 10. leakage ----------------------------------------------------------------------------------------------------------

def test_leakage_panel_puts_both_splits_of_every_model_side_by_side(run, colours):
    figure = figures.plot_leakage(run.results, colours)
    tissue = panel(figure, f"Tissue: F1\n{FROZEN}")
    bars = gids(tissue, "leakage|")
    assert bars == {f"leakage|{m}|{s}": 1 for m in ("pca", "scgpt", "majority") for s in ("sample", "cell")}
    sample = next(p for p in tissue.patches if p.get_gid() == "leakage|scgpt|sample")
    cell = next(p for p in tissue.patches if p.get_gid() == "leakage|scgpt|cell")
    assert cell.get_x() > sample.get_x() and cell.get_hatch() and not sample.get_hatch()
    assert cell.get_height() > sample.get_height()  # the fixture plants a cell-split bonus
    ticks = [t.get_text() for t in tissue.get_xticklabels()]
    assert all("Δ +" in t for t in ticks)
    assert panel(figure, f"Tissue: AUROC\n{FROZEN}")


def test_leakage_panel_compares_only_values_scored_under_both_splits(run, colours):
    """Breast is skipped under split = sample: its cell-split folds must not enter the cancer-type bars."""
    table = figures.leakage_table(run.results, "f1")
    row = table[(table["setting"] == FROZEN) & (table["model"] == "scgpt") & (table["category"] == "cancer_type")]
    assert int(row["n_values"].iloc[0]) == 2
    results = run.results
    done = results[(results["status"] == "done") & (results["setting"] == FROZEN) & (results["model"] == "scgpt")
                   & (results["category"] == "cancer_type") & (results["split"] == "cell")
                   & (results["value"] != "Breast")]
    assert row["cell_mean"].iloc[0] == pytest.approx(done["f1"].mean())


def test_leakage_panel_says_what_ran_when_a_split_is_missing(run, colours):
    figure = figures.plot_leakage(run.results[run.results["split"] == "sample"], colours)
    assert not any(gids(ax, "leakage|") for ax in figure.axes)
    text = " ".join(t.get_text() for ax in figure.axes for t in ax.texts) + figure.axes[0].get_title(loc="left")
    assert "split = cell: not run" in text and "split = sample:" in text and "scored on" in text


# --- tables ------------------------------------------------------------------------------------------------------------------

def test_best_model_per_category_and_split(run):
    table = best_models(run.results, run.comparisons)
    assert list(table["split"]) == ["sample"] * 4 + ["cell"] * 4
    assert list(table["category"][:4]) == ["Tissue", "Cancer type", "Therapy", "Regimen"]
    assert set(table["best model"]) == {"scGPT"}
    assert set(table["setting"]) == {LORA}  # the fixture gives LoRA a small bonus
    assert all(table["runner-up"].str.startswith("scGPT (frozen"))
    assert set(table["beats majority"]) == {"yes"}  # the fixture's majority trails by 0.4 on every fold
    assert table["vs majority: Δ AUROC [95% CI], p"].str.contains("folds").all()


def test_paired_tests_compare_every_model_with_the_reference_and_the_best_baseline(run):
    table = comparison_table(run.comparisons)
    assert set(table["versus"]) == {"reference", "best baseline"}
    scgpt = table[(table["model"] == "scGPT") & (table["versus"] == "best baseline")]
    assert set(scgpt["against"]) == {"PCA"}
    assert (scgpt.loc[scgpt["scenario"] == "pooled", "beats it"] == "yes").all()
    cross = scgpt[scgpt["scenario"] == "cross"]  # at most 4 held-out studies: p can never pass 1/16
    assert (cross["paired folds"] <= 4).all() and (cross["beats it"] == "no").all()
    assert not ((table["model"] == "Majority") & (table["versus"] == "reference")).any()


def test_unscored_jobs_are_listed_with_their_reason(run):
    table = unscored_jobs(run.results)
    failed = table[table["status"] == "failed"]
    assert list(failed["reason"]) == ["ValueError: one class"] and list(failed["model"]) == ["scGPT"]
    skipped = table[table["status"] == "skipped"]
    assert skipped["reason"].str.contains("LoRA applies to foundation models").any()
    assert skipped["reason"].str.contains("only one study").any()


def test_read_run_fills_defaults_for_runs_without_head_or_split(tmp_path, run):
    frame = run.results.drop(columns=["head", "split", "setting"])
    frame.to_parquet(tmp_path / "results.parquet", index=False)
    older = read_run_data(tmp_path)
    assert set(older.results["head"]) == {"mlp"} and set(older.results["split"]) == {"sample"}
    assert older.predictions is None and older.cells is None and older.models == {}


def test_a_value_run_once_for_several_categories_is_shown_under_all_its_names(tmp_path, run):
    frame = run.results.drop(columns=["setting"]).assign(also="")
    frame.loc[frame["value"] == "Melanoma", "also"] = "therapy=Immunotherapy; regimen=anti-PD1"
    frame.to_parquet(tmp_path / "results.parquet", index=False)
    values = set(read_run_data(tmp_path).results["value"])
    assert "Melanoma = Immunotherapy = anti-PD1" in values and "Melanoma" not in values


def test_confounder_panel_scores_within_studies_and_each_study(run, colours):
    scores = run.confounders
    pca = scores[(scores["model"] == "pca") & (scores["setting"] == FROZEN) & (scores["scenario"] == "pooled")
                 & (scores["split"] == "sample") & (scores["category"] == "tissue")]
    assert {"all cells", "within study", "study: GSE1", "study: GSE2"} <= set(pca["scope"])
    figure = figures.plot_confounders(scores, colours)
    tissue = panel(figure, f"Tissue\n{FROZEN}")
    assert gids(tissue, "confounder|pca|within study") == {"confounder|pca|within study": 1}
    assert any(line.get_gid() == "chance" for line in tissue.lines)


def test_labelled_predictions_are_the_inner_merge_with_the_scored_jobs_without_nan_and_leave_the_run_alone(run):
    """Row for row what ``merge(on="key", how="inner")`` gives, NaN predictions dropped (done by position)."""
    from scdrugmap.report.run import scored

    before = run.predictions.copy()
    jobs = scored(run.results)[["key", "model", "setting", "strategy", "head", "scenario", "category", "value",
                                "fold", "split"]]
    expected = run.predictions.merge(jobs, on="key", how="inner")
    expected = expected[np.isfinite(expected["probability"].to_numpy(dtype=np.float64))].reset_index(drop=True)
    pd.testing.assert_frame_equal(labelled_predictions(run), expected)
    pd.testing.assert_frame_equal(run.predictions, before)  # the run's own table gains no columns


def test_labelled_predictions_leave_out_nan_predictions_and_jobs_that_were_not_scored(run):
    from types import SimpleNamespace

    from scdrugmap.report.run import scored

    predictions = run.predictions.copy()
    predictions.loc[predictions.index[:3], "probability"] = np.nan
    predictions.loc[predictions.index[3:5], "key"] = "never|scored"
    jobs = scored(run.results)[["key", "model", "setting", "strategy", "head", "scenario", "category", "value",
                                "fold", "split"]]
    expected = predictions.merge(jobs, on="key", how="inner")
    expected = expected[np.isfinite(expected["probability"].to_numpy(dtype=np.float64))].reset_index(drop=True)
    got = labelled_predictions(SimpleNamespace(predictions=predictions, results=run.results))
    assert len(got) == len(predictions) - 5
    pd.testing.assert_frame_equal(got, expected)
