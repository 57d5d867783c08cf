"""Token models: integrated gradients on Geneformer's input embeddings, and deletion as token removal."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scdrugmap.explain.attribution import (
    TokenAttributionHook,
    attribute_tokens,
    measure_deletion_effects,
    token_attribution_hook,
)
from scdrugmap.explain.token_hooks import geneformer_token_genes

pytest.importorskip("captum")


@pytest.fixture
def geneformer(shared):
    from scdrugmap.models.geneformer import GeneformerEncoder

    golden, vocab = shared("golden", "geneformer"), shared("vocab", "geneformer_v1")
    encoder = GeneformerEncoder.from_pretrained(
        golden / "checkpoint", model_version="V1", token_dictionary_file=vocab / "geneformer_token_dictionary.pkl",
        gene_median_file=vocab / "geneformer_gene_median_dictionary.pkl", gene_mapping_file=None)
    return encoder, ad.read_h5ad(golden / "cells.h5ad")


def random_head(dim: int):
    from scdrugmap.train.heads import make_mlp

    torch.manual_seed(0)
    mlp = make_mlp(dim, 16).eval()
    return lambda embeddings: torch.sigmoid(mlp(embeddings)).reshape(-1)


def test_geneformer_integrated_gradients_sum_to_the_change_from_the_padded_baseline(geneformer):
    encoder, cells = geneformer
    head = random_head(encoder.embedding_dim)
    cells = cells[:16].copy()
    result = attribute_tokens(encoder, cells, head=head, n_steps=24, max_cells=None, batch_size=6)
    tokens = encoder.tokenize(cells)
    assert result.values.shape[0] == tokens.n_cells and sp.issparse(result.values)
    assert set(result.genes) <= set(cells.var_names)
    token_genes = geneformer_token_genes(encoder, cells)
    pad = encoder.pad_token_id
    batch = encoder.collate(tokens, np.arange(tokens.n_cells))
    ids = batch["input_ids"]
    gene_token = torch.as_tensor(np.isin(ids.numpy(), list(token_genes)))
    with torch.no_grad():
        p = head(encoder.encode(batch)).numpy()
        p_base = head(encoder.encode({**batch, "input_ids": torch.where(gene_token, pad, ids)})).numpy()
    np.testing.assert_allclose(result.probability, p, atol=1e-6)
    totals = np.asarray(result.values.sum(axis=1)).ravel()
    change = p - p_base
    assert np.abs(change).max() > 1e-3
    assert np.abs(totals - change).max() < 0.05 * np.abs(change).max()  # completeness, up to the 24-step rule
    # each cell's attributed genes are exactly its tokens
    nonzero = np.diff(result.values.indptr)
    np.testing.assert_array_equal(nonzero, gene_token.sum(dim=1).numpy())
    again = attribute_tokens(encoder, cells, head=head, n_steps=24, max_cells=8, batch_size=6, seed=3)
    rows = [list(result.obs_names).index(name) for name in again.obs_names]
    np.testing.assert_allclose(again.values.toarray(), result.values[rows].toarray(), atol=1e-6)


def test_geneformer_deletion_of_a_gene_equals_removing_its_token(geneformer):
    encoder, cells = geneformer
    head = random_head(encoder.embedding_dim)

    def predict(adata):
        with torch.no_grad():
            return head(torch.as_tensor(encoder.embed(adata))).numpy()

    gene = str(cells.var_names[np.argmax(np.asarray((cells.X != 0).sum(axis=0)).ravel())])
    table = measure_deletion_effects(cells, predict, genes=[gene], max_cells=None).set_index("gene")
    tokens = encoder.tokenize(cells)
    token = next(t for t, g in geneformer_token_genes(encoder, cells).items() if g == gene)
    flat, offsets = tokens.arrays["input_ids"], tokens.arrays["offsets"]
    keep = flat != token
    lengths = np.add.reduceat(keep, offsets[:-1]) if flat.size else tokens.lengths
    removed = type(tokens)(cell_index=tokens.cell_index, lengths=lengths.astype(np.int64),
                           arrays={"input_ids": flat[keep], "offsets": np.r_[0, np.cumsum(lengths)].astype(np.int64)})
    with torch.no_grad():
        direct = head(torch.as_tensor(encoder.embed_tokens(removed))).numpy()
        before = head(torch.as_tensor(encoder.embed_tokens(tokens))).numpy()
    had = lengths != tokens.lengths
    assert table.loc[gene, "n_expressing"] == had.sum() > 0
    assert table.loc[gene, "deletion_delta"] == pytest.approx((direct - before)[had].mean(), abs=1e-6)


def test_an_encoder_can_declare_its_own_hook(geneformer):
    encoder, cells = geneformer
    own = TokenAttributionHook(gene_columns=lambda e, a, t, layer: lambda rows, batch: np.full((1, 1), -1),
                               embedding=lambda e: e.module.bert.embeddings.word_embeddings)
    encoder.attribution_hook = own
    try:
        assert token_attribution_hook(encoder) is own
    finally:
        del encoder.attribution_hook
    assert token_attribution_hook(encoder) is not own
