"""Geneformer tokenizer ranking: the vectorised path equals a plain per-cell reference, ties included.

The tokenizer packs (value, gene) into uint64 keys, sorts padded groups of cells, and only re-ranks a
cell exactly when two of its values agree in all but the last 16 bits. These tests feed it data built to
hit every branch of that logic (exact ties of equal and of unequal medians, values one ulp apart, stored
zeros, genes outside the dictionary, duplicated ids, several count dtypes) and compare it, token for
token, with `reference_tokens`: one ``np.lexsort`` per cell on the official normalisation.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdrugmap.models.geneformer_tokenizer import GeneformerTokenizer, GeneformerVocabulary, normalise_counts

N_GENES = 300


def make_vocabulary(version: str, seed: int = 0) -> GeneformerVocabulary:
    """A small dictionary whose medians tie often: shared values, exact ratios 2 and 3, and 1-ulp pairs."""
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    base = rng.uniform(0.2, 5.0, N_GENES)
    kind = rng.integers(0, 5, N_GENES)
    medians = np.where(kind == 0, 1.105969024047805, base)  # one shared median (as 72 genes of gc104M)
    medians = np.where(kind == 1, 2 * medians[rng.integers(0, N_GENES, N_GENES)], medians)  # ratio-2 pairs
    medians = np.where(kind == 2, 3 * 0.75, medians)  # ties 1:3 with the 0.75 below
    medians[::37] = 0.75
    medians[1::41] = np.nextafter(medians[::41][: medians[1::41].size], np.inf)  # 1 ulp apart
    tokens = rng.permutation(N_GENES) + 4  # token order is not gene order: ties must follow the columns
    token_ids = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3} | dict(zip(genes, tokens.tolist(), strict=True))
    mapping = {g: g for g in genes} | {"ALIAS_OF_7": genes[7], "ALIAS_OF_12": genes[12]}
    return GeneformerVocabulary(token_ids=token_ids, medians=dict(zip(genes, medians.tolist(), strict=True)),
                                mapping=mapping, version=version)


def random_cells(n_cells: int, seed: int, dtype: type = np.float32, density: float = 0.4, *,
                 duplicates: bool = True, unknown: int = 2):
    """Counts over the dictionary genes (shuffled) and ``unknown`` unknown ids; with ``duplicates``, also a
    lower-case id and two aliases of other columns (summed with them)."""
    rng = np.random.default_rng(seed)
    genes = [f"ENSG{i:011d}" for i in rng.permutation(N_GENES)] + [f"UNKNOWN_{i}" for i in range(unknown)]
    genes += [genes[5].lower(), "ALIAS_OF_7", "ALIAS_OF_12"] if duplicates else ["not-a-gene"] * 3
    counts = rng.negative_binomial(1, 0.5, (n_cells, len(genes))).astype(np.float64)
    counts[rng.random(counts.shape) > density] = 0
    counts[:, :40] = np.where(counts[:, :40] > 0, 1, 0)  # many equal counts -> exact ties
    counts[3] = 0  # a cell with nothing
    counts[4, :] = 0
    counts[4, -5:] = 2  # a cell with only unknown ids and aliases
    if dtype is np.float64:  # counts without a gap between them: no shortcut for ties
        counts *= 1 + 1e-12 * rng.integers(0, 3, counts.shape)
    return counts.astype(dtype), np.array(genes, dtype=object)


def reference_tokens(counts: np.ndarray, genes: np.ndarray, n_counts: np.ndarray, vocabulary: GeneformerVocabulary,
                     max_genes: int, dense: bool) -> list[np.ndarray]:
    """The official rank-value encoding, one cell at a time, ties in the official h5ad column order."""
    collapsed = [vocabulary.mapping.get(str(g).upper()) for g in genes]
    order: dict[str, list[int]] = {}
    for column, gene in enumerate(collapsed):
        if gene is not None:
            order.setdefault(gene, []).append(column)
    kept = [g for g, cols in order.items() if len(cols) == 1] + [g for g, cols in order.items() if len(cols) > 1]
    summed = np.stack([counts[:, order[g]].sum(axis=1, dtype=counts.dtype) for g in kept], axis=1)
    medians = np.array([vocabulary.medians[g] for g in kept])
    tokens = np.array([vocabulary.token_ids[g] for g in kept])
    cells = []
    for row in range(counts.shape[0]):
        nonzero = np.flatnonzero(summed[row])
        if nonzero.size == 0:
            cells.append(None)
            continue
        values = normalise_counts(summed[row, nonzero], n_counts[row], medians[nonzero], dense=dense)
        ranked = tokens[nonzero[np.lexsort((nonzero, -values))]][:max_genes]
        if vocabulary.special_tokens:
            ranked = np.concatenate([[vocabulary.token_ids["<cls>"]], ranked, [vocabulary.token_ids["<eos>"]]])
        cells.append(ranked)
    return cells


def assert_same_tokens(tokens, reference: list[np.ndarray | None]) -> None:
    expected_rows = [row for row, cell in enumerate(reference) if cell is not None]
    np.testing.assert_array_equal(tokens.cell_index, expected_rows)
    flat, offsets = tokens.arrays["input_ids"], tokens.arrays["offsets"]
    for k, row in enumerate(expected_rows):
        np.testing.assert_array_equal(flat[offsets[k]:offsets[k + 1]], reference[row], err_msg=f"cell {row}")


@pytest.mark.parametrize("layout", ["duplicated ids", "few unknown ids", "many unknown ids"])
@pytest.mark.parametrize(("version", "max_genes", "dtype", "n_counts_dtype"), [
    ("V1", None, np.float32, np.int64),
    ("V2", None, np.float32, np.float32),
    ("V2", 12, np.float64, np.int64),
    ("V1", 30, np.int32, np.float64),
])
def test_tokens_equal_a_per_cell_lexsort_with_many_ties(version, max_genes, dtype, n_counts_dtype, layout):
    vocabulary = make_vocabulary(version)
    counts, genes = random_cells(120, seed=1, dtype=dtype, duplicates=layout == "duplicated ids",
                                 unknown=200 if layout == "many unknown ids" else 2)
    n_counts = (counts.astype(np.float64).sum(axis=1) + 3).astype(n_counts_dtype)
    csr = sp.csr_matrix(counts)
    csr.data[::50] = 0  # stored zeros are not expressed genes
    adata = ad.AnnData(csr, obs=pd.DataFrame({"n_counts": n_counts}, index=[f"c{i}" for i in range(len(counts))]),
                       var=pd.DataFrame({"ensembl_id": genes}, index=[f"g{i}" for i in range(genes.size)]))
    size = None if max_genes is None else max_genes + (2 if version == "V2" else 0)
    tokenizer = GeneformerTokenizer(vocabulary, model_input_size=size, chunk_size=16, n_threads=2)
    reference = reference_tokens(csr.toarray(), genes, n_counts, vocabulary, tokenizer.max_genes, dense=False)
    assert_same_tokens(tokenizer.tokenize(adata), reference)


def test_dense_input_and_unsorted_sparse_rows_rank_alike():
    vocabulary = make_vocabulary("V2")
    counts, genes = random_cells(40, seed=2)
    n_counts = counts.sum(axis=1).astype(np.int64) + 5
    obs = pd.DataFrame({"n_counts": n_counts}, index=[f"c{i}" for i in range(len(counts))])
    var = pd.DataFrame({"ensembl_id": genes}, index=[f"g{i}" for i in range(genes.size)])
    tokenizer = GeneformerTokenizer(vocabulary, chunk_size=7, n_threads=1)
    dense = tokenizer.tokenize(ad.AnnData(counts, obs=obs, var=var))
    assert_same_tokens(dense, reference_tokens(counts, genes, n_counts, vocabulary, tokenizer.max_genes, dense=True))
    csr = sp.csr_matrix(counts)
    for row in range(csr.shape[0]):  # reverse each row's entries: a valid CSR with unsorted indices
        lo, hi = csr.indptr[row], csr.indptr[row + 1]
        csr.indices[lo:hi], csr.data[lo:hi] = csr.indices[lo:hi][::-1].copy(), csr.data[lo:hi][::-1].copy()
    csr.has_sorted_indices = False
    unsorted = tokenizer.tokenize(ad.AnnData(csr, obs=obs, var=var))
    assert_same_tokens(unsorted, reference_tokens(counts, genes, n_counts, vocabulary, tokenizer.max_genes,
                                                  dense=False))
