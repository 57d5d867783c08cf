"""Integrated gradients on every token model's input embedding, on golden weights: complete, mapped to the genes a
cell reads, and in-silico deletion moves P(sensitive) in every model.

Each model runs on 3 cells with 32 IG steps and a smooth head scaled to its embeddings
(`token_model_cases.standardised_head`). Measured completeness errors with 32 steps (max over the cells of
|sum of attributions - (P(cell) - P(baseline))| / max |P(cell) - P(baseline)|, changes 0.38-1.0): tGPT, scBERT,
CellLM, the tiny Llama < 1e-4; MiniLM 0.15%; Geneformer, scGPT, CellPLM < 0.7%; scFoundation 0.8%; UCE 1.4%
(the ReLU kinks of the feed-forward layers). The tolerance is 2%.
"""

from __future__ import annotations

import contextlib
import functools
import types

import numpy as np
import pytest
import torch

from scdrugmap.errors import ConfigError
from scdrugmap.explain.attribution import attribute_tokens, measure_deletion_effects, token_attribution_hook
from tests_helpers import shared_path
from token_model_cases import TOKEN_MODELS, attribution_case, standardised_head

pytest.importorskip("captum")

N_CELLS = 3
N_STEPS = 32
#: Largest completeness error allowed, as a share of the largest change from the baseline (see the docstring).
COMPLETENESS = 0.02
#: scBERT and CellLM are attributed with a per-cell key maximum; predictions use the official per-batch one.
KEY_MAX_MODELS = {"scbert", "celllm"}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Load each model once per module: (encoder, 3 cells, head)."""
    @functools.cache
    def load(name: str):
        case = attribution_case(name, shared_path, tmp_path_factory.mktemp(name))
        encoder = case.load()
        cells = case.adata[:16].copy()
        return encoder, cells[:N_CELLS].copy(), standardised_head(encoder.embed(cells))

    return load


@pytest.fixture
def token_model(request, cases):
    return cases(request.param)


def _expressed(cells) -> np.ndarray:
    return np.asarray((cells.X != 0).todense() if hasattr(cells.X, "todense") else cells.X != 0)


@pytest.mark.parametrize("token_model", TOKEN_MODELS, indirect=True)
def test_integrated_gradients_sum_to_the_change_from_the_baseline_and_land_on_expressed_genes(token_model):
    encoder, cells, head = token_model
    result = attribute_tokens(encoder, cells, head=head, n_steps=N_STEPS, max_cells=None, batch_size=2)
    with torch.no_grad():
        predicted = head(torch.as_tensor(encoder.embed(cells))).numpy()
    rows = [list(cells.obs_names).index(name) for name in result.obs_names]
    tolerance = 5e-3 if encoder.name in KEY_MAX_MODELS else 1e-4
    np.testing.assert_allclose(result.probability, predicted[rows], atol=tolerance)

    change = result.probability - result.baseline_probability
    totals = np.asarray(result.values.sum(axis=1)).ravel()
    assert np.abs(change).max() > 0.05
    assert np.abs(totals - change).max() <= COMPLETENESS * np.abs(change).max()
    # positions that are no gene of the data get nothing: the per-cell error is the genes' sum alone
    np.testing.assert_allclose(result.convergence_delta, totals - change, atol=1e-5)

    hook = token_attribution_hook(encoder)
    if hook.integrate is None:  # the baseline is the batch with its gene positions replaced, nothing else
        tokens = encoder.tokenize(cells)
        every = np.arange(tokens.n_cells)
        batch = encoder.collate(tokens, every)
        columns = hook.gene_columns(encoder, cells, tokens, None)(every, batch)
        baseline = hook.baseline(encoder, batch, torch.as_tensor(columns >= 0))
        with hook.context(encoder) if hook.context else contextlib.nullcontext(), torch.no_grad():
            direct = head(encoder.encode(baseline)).numpy()
        np.testing.assert_allclose(result.baseline_probability, direct, atol=1e-5)

    expressed = _expressed(cells)[rows]
    gene_column = {gene: j for j, gene in enumerate(cells.var_names)}
    columns = np.array([gene_column[g] for g in result.genes])
    values = result.values.toarray()
    for row in range(values.shape[0]):
        reached = columns[values[row] != 0]
        # CellPLM attributes every gene of the pass (its baseline is the pass's mean cell)
        allowed = expressed.any(axis=0) if encoder.name == "cellplm" else expressed[row]
        assert reached.size and allowed[reached].all(), f"cell {row}: attributions on genes it does not read"


@pytest.mark.parametrize("token_model", TOKEN_MODELS, indirect=True)
def test_deleting_a_gene_changes_p_sensitive(token_model):
    encoder, cells, head = token_model

    def predict(adata):
        with torch.no_grad():
            return head(torch.as_tensor(encoder.embed(adata))).numpy()

    table = measure_deletion_effects(cells, predict, max_genes=3, max_cells=None,
                                     genes_per_call=None if encoder.shardable else 1)
    assert len(table) == 3 and table["n_expressing"].min() > 0
    assert np.isfinite(table["deletion_delta"]).all()
    assert table["deletion_delta"].abs().max() > 1e-3


@pytest.mark.parametrize("token_model", ["minilm"], indirect=True)
def test_a_gene_symbol_is_the_sum_of_its_sub_word_tokens(token_model):
    encoder, cells, _ = token_model
    tokens = encoder.tokenize(cells)
    rows = np.arange(tokens.n_cells)
    batch = encoder.collate(tokens, rows)
    columns = token_attribution_hook(encoder).gene_columns(encoder, cells, tokens, None)(rows, batch)
    pieces = encoder.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert columns[0, 0] == -1 and columns[0, int(batch["attention_mask"][0].sum()) - 1] == -1  # [CLS], [SEP]
    genes = [j for j in dict.fromkeys(columns[0]) if j >= 0]
    assert len(genes) == encoder.sentence_config.top_n_genes
    for j in genes:
        word = "".join(pieces[p].removeprefix("##") for p in np.flatnonzero(columns[0] == j))
        assert word == cells.var_names[j].lower()


def test_a_model_that_cannot_be_attributed_names_deletion():
    from scdrugmap.models.baselines import PCAEncoder

    with pytest.raises(ConfigError, match="measure_deletion_effects"):
        token_attribution_hook(PCAEncoder())
    slow = types.SimpleNamespace(name="minilm", tokenizer=types.SimpleNamespace(is_fast=False))
    with pytest.raises(ConfigError, match="character offsets.*measure_deletion_effects"):
        token_attribution_hook(slow)


@pytest.mark.parametrize("token_model", ["scgpt"], indirect=True)
def test_too_few_steps_for_the_attributions_to_add_up_are_named(token_model, caplog):
    encoder, cells, head = token_model
    with caplog.at_level("WARNING", logger="scdrugmap.explain.attribution"):
        attribute_tokens(encoder, cells, head=head, n_steps=2, max_cells=None)
    assert "raise n_steps (now 2)" in caplog.text
