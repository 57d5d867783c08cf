"""sdm.tl.biomarkers and `scdrugmap biomarkers`: from observed labels, a head, a run folder; files; same seed, same output.

One small simulated collection with planted resistance genes and its planted programs as gene sets; one
PCA head with a logistic layer (the fastest head to train). Settings are small (few cells attributed,
few genes deleted, two bootstrap resamples) so the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import scdrugmap as sdm
from scdrugmap.cli import app
from scdrugmap.data.genesets import write_gmt
from scdrugmap.data.simulate import simulated_gene_sets
from scdrugmap.errors import ConfigError, ScDrugMapError

runner = CliRunner()
N_GENES = 150
#: Settings shared by the API and CLI calls, so their outputs can be compared.
FAST = {"top_k": 10, "max_cells": 60, "max_genes": 6, "n_bootstrap": 2, "n_permutations": 100}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def collection():
    # the program acts alike in every study, so the planted genes are the truth to recover
    return sdm.datasets.simulate(n_cells=600, n_genes=N_GENES, seed=0, resistance_strength=2.0, study_program_sd=0.0)


@pytest.fixture(scope="module")
def planted(collection):
    return set(collection.uns["scdrugmap"]["simulation"]["resistance_genes"])


@pytest.fixture(scope="module")
def gmt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sets") / "planted.gmt"
    write_gmt(simulated_gene_sets(n_genes=N_GENES, seed=0), path)
    return path


@pytest.fixture(scope="module")
def head(collection, tmp_path_factory):
    trained = sdm.tl.train(collection, "pca", head="logistic")
    trained.save(tmp_path_factory.mktemp("head") / "pca")
    return trained


@pytest.fixture(scope="module")
def from_head(collection, head, gmt):
    return sdm.tl.biomarkers(collection, head=head, gene_sets=gmt, **FAST)


def test_observed_labels_find_the_planted_genes_and_program(collection, planted, gmt):
    found = sdm.tl.biomarkers(collection, gene_sets=gmt, top_k=10, n_bootstrap=0, n_permutations=100)
    assert list(found.table.columns) == list(sdm.tl.BIOMARKER_COLUMNS)
    assert found.facts["comparisons"] == ["observed"] and found.facts["tests"]["observed"] == ["pseudobulk"]
    up, down = found.top_genes(direction="up", k=5), found.top_genes(direction="down", k=5)
    assert all(g in planted for g in up) and sum(g in planted for g in up + down) >= 8
    assert found.table["attribution_abs_mean"].isna().all() and "no head" in found.facts["attribution"]["reason"]
    rank = found.enrichment[found.enrichment["method"] == "rank"]
    assert rank.iloc[0]["gene_set"].startswith("SCDRUGMAP_SIM_RESISTANCE")
    assert found.table["stability"].isna().all()  # no bootstrap: NaN, never 0


def test_a_head_predicts_attributes_and_deletes_without_changing_the_data(collection, head, from_head, planted):
    table = from_head.table
    assert set(table["comparison"]) == {"observed", "predicted"}
    assert "wilcoxon" in from_head.facts["tests"]["predicted"]  # predicted labels vary within samples
    assert not any(c.startswith("scdrugmap_pca") for c in collection.obs)  # the caller's data is left alone
    attributed = table.drop_duplicates("gene").nlargest(10, "attribution_abs_mean")["gene"]
    assert sum(g in planted for g in attributed) >= 5
    assert from_head.facts["attribution"]["n_cells"] == FAST["max_cells"]
    assert table.drop_duplicates("gene")["deletion_delta"].notna().sum() == FAST["max_genes"]
    assert table["stability"].between(0, 1).all()
    assert any("optimistic" in c or "pseudoreplication" in c for c in from_head.facts["caveats"])


def test_cli_writes_the_files_and_prints_the_top_genes_with_the_same_output_as_the_api(collection, head, gmt,
                                                                                      from_head, tmp_path):
    data = tmp_path / "cells.h5ad"
    collection.write_h5ad(data)
    out = tmp_path / "bio"
    result = runner.invoke(app, ["biomarkers", str(data), "--model", "pca", "--head", str(head.path), "--out", str(out),
                                 "--gene-sets", str(gmt), "--top-k", "10", "--cells", "60", "--genes", "6",
                                 "--bootstrap", "2"])
    assert result.exit_code == 0, result.output
    for name in ("biomarkers.parquet", "enrichment.parquet", "biomarkers.json", "volcano.png", "dotplot.png",
                 "attribution.png", "enrichment.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))
    assert "top genes higher in resistant" in result.output and "top genes lower in resistant" in result.output
    assert from_head.top_genes("predicted", direction="up", k=1)[0] in result.output
    # same seed, same output: the CLI's run equals the API's (n_permutations: the CLI's default is larger)
    written = pd.read_parquet(out / "biomarkers.parquet")
    pd.testing.assert_frame_equal(written, from_head.table)
    facts = json.loads((out / "biomarkers.json").read_text())
    assert facts["seed"] == 0 and "biomarkers.parquet" in facts["files"]


def test_same_seed_same_output_and_another_seed_another_cell_sample(collection, head, gmt, from_head):
    again = sdm.tl.biomarkers(collection, head=head, gene_sets=gmt, **FAST)
    pd.testing.assert_frame_equal(again.table, from_head.table)
    pd.testing.assert_frame_equal(again.enrichment, from_head.enrichment)
    other = sdm.tl.biomarkers(collection, head=head, comparisons=["predicted"], seed=1,
                              **{**FAST, "n_bootstrap": 0, "max_genes": 0})
    mine = from_head.table[from_head.table["comparison"] == "predicted"].set_index("gene")["attribution_abs_mean"]
    theirs = other.table.set_index("gene")["attribution_abs_mean"]
    assert not np.allclose(mine.reindex(theirs.index), theirs)


def test_a_run_folder_gives_the_predicted_groups_and_each_fold_model_explains_its_own_test_cells(collection,
                                                                                                 planted, tmp_path):
    from scdrugmap.evaluate.store import read_run

    run = tmp_path / "run"
    sdm.tl.benchmark(collection, out=str(run), models=["pca"], categories=["tissue"], scenarios=["pooled"], folds=3,
                     heads=["logistic"])
    found = sdm.tl.biomarkers(collection, "pca", run=run, **FAST)
    facts = found.facts
    assert facts["comparisons"] == ["observed", "predicted"]
    assert facts["run"]["cells_predicted"] == collection.n_obs
    assert "out-of-fold" in facts["predicted_from"]
    # each fold's model, retrained and checked against the run's predictions, on its own test cells only
    predictions = read_run(run).predictions
    n_folds = predictions["key"].nunique()  # 3 per tissue value
    assert facts["fold_models"]["n_folds"] == n_folds and facts["fold_models"]["max_difference"] <= 1e-6
    assert facts["attribution"]["model"].startswith("each fold's model")
    attributed = facts["attribution"]["folds"]
    assert sum(attributed.values()) == facts["attribution"]["n_cells"] == FAST["max_cells"]
    assert set(attributed) == set(predictions["key"])
    top = found.table.drop_duplicates("gene").nlargest(10, "attribution_abs_mean")["gene"]
    assert sum(g in planted for g in top) >= 5
    assert found.table.drop_duplicates("gene")["deletion_delta"].notna().sum() == FAST["max_genes"]
    # stability: the share of fold models (those with sampled cells) with the gene among their top_k genes
    n_ranked = facts["stability"]["n_folds"]
    assert facts["stability"]["method"] == "folds" and n_ranked == sum(n > 0 for n in attributed.values())
    shares = found.table["stability"].to_numpy() * n_ranked
    assert np.allclose(shares, np.round(shares)) and found.table["stability"].max() >= 0.5
    with pytest.raises(ConfigError, match="no scored job of model 'hvg'"):
        sdm.tl.biomarkers(collection, "hvg", run=run, n_bootstrap=0)


def test_bad_input_is_one_clear_error(collection, head, tmp_path):
    data = tmp_path / "cells.h5ad"
    collection.write_h5ad(data)
    missing = runner.invoke(app, ["biomarkers", str(data), "--model", "pca", "--label-key", "nonesuch",
                                  "--out", str(tmp_path / "o")])
    assert isinstance(missing.exception, ScDrugMapError) and "nonesuch" in str(missing.exception)
    other = runner.invoke(app, ["biomarkers", str(data), "--model", "hvg", "--head", str(head.path),
                                "--out", str(tmp_path / "o")])
    assert isinstance(other.exception, ConfigError) and "trained on pca" in str(other.exception)
    nowhere = runner.invoke(app, ["biomarkers", str(data), "--model", "pca"])
    assert isinstance(nowhere.exception, ConfigError) and "defaults to RUN/biomarkers" in str(nowhere.exception)
    with pytest.raises(ConfigError, match="needs a head"):
        sdm.tl.biomarkers(collection, comparisons=["predicted"])
    assert not (tmp_path / "o").exists()
