"""The public API (`import scdrugmap as sdm`): scanpy conventions, one label parser, heads that travel."""

from __future__ import annotations

import doctest
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import scdrugmap as sdm
from scdrugmap.errors import CheckpointError, ConfigError, SchemaError


@pytest.fixture(scope="module")
def cells():
    return sdm.datasets.simulate(n_cells=160, n_genes=300, seed=0)


@pytest.mark.parametrize("module", ["tl", "pl", "datasets", "readwrite", "registry"])
def test_docstring_examples_run(module, monkeypatch, tmp_path):
    import importlib

    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    failures, tried = doctest.testmod(importlib.import_module(f"scdrugmap.{module}"), optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_importing_the_package_imports_no_torch():
    code = "import sys, scdrugmap as sdm; sdm.tl, sdm.pl, sdm.datasets; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_embed_writes_obsm_and_parameters_in_place_or_into_a_copy(cells):
    adata = cells.copy()
    assert sdm.tl.embed(adata, "pca", key_added="X_mine") is None
    assert adata.obsm["X_mine"].shape == (adata.n_obs, 50) and adata.obsm["X_mine"].dtype == np.float32
    facts = adata.uns["scdrugmap"]["X_mine"]
    assert facts["model"] == "pca" and facts["layer"] == "X" and len(facts["encoder_state_sha256"]) == 64
    copy = sdm.tl.embed(cells, "hvg", copy=True)
    assert "X_hvg" in copy.obsm and "X_hvg" not in cells.obsm


def test_tools_refuse_to_write_into_a_view(cells):
    with pytest.raises(SchemaError, match="view"):
        sdm.tl.embed(cells[:10], "pca")


@pytest.mark.parametrize("encode", [
    lambda s: s, lambda s: pd.Categorical(s), lambda s: s == "sensitive", lambda s: (s == "sensitive").astype(int),
    lambda s: np.where(s == "sensitive", "responder", "non-responder"),
])
def test_labels_are_read_from_strings_categoricals_booleans_and_numbers(cells, encode):
    adata = cells.copy()
    expected = (adata.obs["response"].astype(str) == "sensitive").to_numpy().astype(np.int8)
    adata.obs["label"] = encode(adata.obs["response"].astype(str).to_numpy())
    np.testing.assert_array_equal(sdm.tl.labels_of(adata, "label"), expected)
    head = sdm.tl.train(adata, "majority", label_key="label")
    assert head.meta["n_sensitive"] == int(expected.sum())


def test_bad_labels_and_missing_columns_are_one_clear_error(cells):
    adata = cells.copy()
    adata.obs["label"] = np.where(np.arange(adata.n_obs) % 2, "sensitive", "maybe")
    with pytest.raises(SchemaError, match="'maybe'"):
        sdm.tl.train(adata, "pca", label_key="label")
    with pytest.raises(SchemaError, match="no 'nope' column"):
        sdm.tl.train(adata, "pca", label_key="nope")


def test_a_head_trained_from_obsm_predicts_new_cells_in_its_own_basis(cells, tmp_path):
    train, test = cells[:100].copy(), cells[100:].copy()
    sdm.tl.embed(train, "pca")
    from_rep = sdm.tl.train(train, "pca", use_rep="X_pca", head="logistic")
    direct = sdm.tl.train(train, "pca", head="logistic")
    np.testing.assert_array_equal(from_rep.tensors["encoder.components"], direct.tensors["encoder.components"])
    loaded = sdm.read_head(from_rep.save(tmp_path / "head"))
    out = sdm.tl.predict(test, loaded, copy=True)
    sdm.tl.predict(test, direct)
    np.testing.assert_allclose(out.obs["scdrugmap_pca_prob_sensitive"], test.obs["scdrugmap_pca_prob_sensitive"],
                               atol=1e-6)
    assert "scdrugmap_pca_prob_sensitive" not in cells.obs
    assert list(out.obs["scdrugmap_pca_prediction"].cat.categories) == ["resistant", "sensitive"]
    assert out.uns["scdrugmap"]["scdrugmap_pca"]["threshold"] == 0.5


def test_predict_refuses_baseline_embeddings_fitted_on_other_cells(cells):
    train, test = cells[:100].copy(), cells[100:].copy()
    head = sdm.tl.train(train, "pca", head="logistic")
    sdm.tl.embed(test, "pca")  # a PCA fitted on the test cells: another basis than the head's
    with pytest.raises(ConfigError, match="fitted"):
        sdm.tl.predict(test, head, use_rep="X_pca")
    sdm.tl.predict(test, head, embedding_key="X_head")  # embedding in the head's basis, stored
    sdm.tl.predict(test, head, use_rep="X_head", key_added="again")
    np.testing.assert_allclose(test.obs["again_prob_sensitive"], test.obs["scdrugmap_pca_prob_sensitive"], atol=1e-6)


def test_predict_refuses_a_head_of_another_model_or_a_missing_bundle(cells, tmp_path):
    head = sdm.tl.train(cells, "majority")
    head.meta["model"] = "hvg"
    with pytest.raises(CheckpointError, match="fitted genes"):
        sdm.tl.predict(cells.copy(), head)
    with pytest.raises(CheckpointError, match="not a head bundle"):
        sdm.tl.predict(cells.copy(), tmp_path / "nothing")


def test_train_refuses_unknown_strategies_and_lora_with_logistic(cells):
    with pytest.raises(ConfigError, match="frozen or lora"):
        sdm.tl.train(cells, "pca", strategy="prompt")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head='mlp'"):
        sdm.tl.train(cells, "scgpt", strategy="lora", head="logistic")


def test_plots_draw_from_what_the_tools_wrote(cells):
    import matplotlib

    matplotlib.use("Agg")
    adata = cells.copy()
    sdm.tl.embed(adata, "pca")
    sdm.tl.predict(adata, sdm.tl.train(adata, "pca", head="logistic"))
    assert len(sdm.pl.embedding(adata, "X_pca", color="scdrugmap_pca_prob_sensitive", method="pca").collections) == 1
    assert "AUROC" in sdm.pl.roc(adata).get_legend().get_texts()[0].get_text()
    with pytest.raises(SchemaError, match="no 'X_nope'"):
        sdm.pl.embedding(adata, "X_nope")


def test_model_registry_cards_list_every_model():
    cards = {card.name: card for card in sdm.list_models()}
    assert len(cards) == 13 and cards["geneformer"].embedding_dim == 256 and cards["pca"].weights_state == "built in"
    assert cards["scgpt"].weights and cards["scgpt"].weights[0].files
    with pytest.raises(ConfigError, match="no weights to download"):
        sdm.download_weights("pca")
